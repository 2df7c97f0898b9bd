"""Every flag of every command is documented: a help text, its default, ``--verbose``, the right usage name.

The parsers are taken from the commands themselves (``main([])`` is stopped where it parses its
arguments), so a parser built anywhere in a command is walked, sub-commands included. The list of
commands is the console scripts of setup.cfg; every module of msdn_tf/cli/ must be one of them.
"""

import argparse
import configparser
import importlib
import pkgutil
import sys

import pytest

import msdn_tf.cli
from msdn_tf.cli.common import CommandParser
from tests.helpers import REPO


def _console_scripts():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = {}
    for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (part.strip() for part in line.split("="))
        module, func = target.split(":")
        scripts[name] = module
    return scripts


SCRIPTS = _console_scripts()


class _Parsed(BaseException):
    def __init__(self, parser):
        self.parser = parser


def _command_parser(module_name, monkeypatch, argv0):
    """The parser that ``module.main([])`` builds, with ``sys.argv[0] = argv0``."""

    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
    module = importlib.import_module(module_name)
    with pytest.raises(_Parsed) as caught:
        module.main([])
    return caught.value.parser


def _walk(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def test_every_cli_module_is_a_console_script():
    modules = {f"msdn_tf.cli.{m.name}" for m in pkgutil.iter_modules(msdn_tf.cli.__path__) if m.name != "common"}
    assert modules == set(SCRIPTS.values())


def _flat(text):
    return "".join(text.split())


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_flag_has_help_and_shows_its_default(script, monkeypatch):
    module = SCRIPTS[script]
    command = module.rsplit(".", 1)[1]
    parser = _command_parser(module, monkeypatch, f"/venv/bin/{script}")
    assert parser.prog == script, "usage names the console script as invoked"
    assert isinstance(parser, CommandParser)
    problems = []
    for path, p in _walk(parser):
        where = " ".join((script,) + path)
        assert isinstance(p, CommandParser), where
        assert "--verbose" in p._option_string_actions, f"{where}: --verbose is accepted everywhere, so listed"
        text = _flat(p.format_help())
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help or action.help is argparse.SUPPRESS:
                problems.append(f"{where} {name}: no help text")
                continue
            default = action.default
            if default is None or default is False or default == [] or default is argparse.SUPPRESS:
                continue
            if "".join(f"default: {default}".split()) not in text:
                problems.append(f"{where} {name}: default {default!r} not shown")
    assert not problems, "\n".join(problems)
    monkeypatch.setattr(sys, "argv", ["/repo/msdn_tf/x.py"])
    assert _command_parser(module, monkeypatch, f"/repo/msdn_tf/{command}.py").prog == f"python -m msdn_tf.{command}"
