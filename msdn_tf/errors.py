"""Exceptions with messages that tell the user what to fix."""


class MSDNError(Exception):
    """Base class for errors the command-line tools report without a traceback."""


class ConfigError(MSDNError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type)."""


class DataError(MSDNError, ValueError):
    """A data file is missing, corrupt or inconsistent.

    The message always names the file (and the key, where there is one) and
    what was expected.
    """
