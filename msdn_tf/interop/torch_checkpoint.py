"""Read PyTorch ``state_dict`` checkpoints (``torch.save`` zip format) without torch.

The authors of MSDN released ``{CUB,SUN,AWA2}_MSDN_{CZSL,GZSL}.pth``: state_dicts
written by ``torch.save`` in torch's zip format (docs/reference.md §2 and §9). This
module reads such files with :mod:`zipfile` and a *restricted* unpickler, so the
checkpoints can be converted without installing torch and without trusting them.

File layout (one top-level folder ``<archive>``, named after the file by torch)::

    <archive>/data.pkl      pickle (protocol 2) of the OrderedDict of tensors
    <archive>/data/<key>    raw bytes of one storage, one record per storage
    <archive>/byteorder     "little" or "big" (absent in old files: little)
    <archive>/version       serialization format version, e.g. "3"

Safety: ``data.pkl`` may only name the globals in :data:`ALLOWED_GLOBALS` (the
tensor/parameter rebuild functions, ``collections.OrderedDict`` and the typed
storage classes). Each is mapped to a small function or marker of this module;
nothing named in the file is ever imported or executed. Any other global
(``os.system``, ``builtins.eval``, ``posix.system``, ...) makes the whole load
fail with :class:`~msdn_tf.errors.DataError` before anything it names is
called. Objects produced while unpickling are frozen holders, so pickle
``BUILD`` instructions cannot alter them or this module's functions.

Budgets (checked before the work, each refusal a :class:`~msdn_tf.errors.DataError`
naming the file and the limit; docs/reliability.md, "Limits"): ``data.pkl`` is at most
:data:`MAX_PICKLE_BYTES` and is scanned opcode by opcode before anything is unpickled
(:func:`msdn_tf.interop.pickle_scan.scan_pickle`: nesting at most :data:`MAX_PICKLE_DEPTH`,
string dict keys, sane memo indices); the bytes materialised, storages read plus
arrays returned, are at most ``max_bytes`` (default: the larger of
:data:`MIN_BYTES_BUDGET` and :data:`BYTES_BUDGET_FACTOR` times the file's size: a legal
file needs about twice its size, while a small file whose tensors all view one
compressed storage would need thousands of times its size). Messages never show more
than a short summary of a value read from the file.

Only dense CPU tensors of the dtypes in :data:`STORAGE_DTYPES` are supported;
bfloat16 is widened to float32 exactly (bit shift), everything else keeps its
dtype. Arrays are returned in native byte order.

This module does not import tensorflow or keras.

Example:
    >>> from msdn_tf.interop.torch_checkpoint import read_torch_state_dict, split_state_dict
    >>> state = read_torch_state_dict("CUB_MSDN_GZSL.pth")      # doctest: +SKIP
    >>> msdn, ignored, backbone = split_state_dict(state)       # doctest: +SKIP
    >>> msdn["W_1"].shape                                        # doctest: +SKIP
    (300, 2048)
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from msdn_tf.errors import DataError
from msdn_tf.interop.pickle_scan import PickleRefused, scan_pickle

__all__ = [
    "ALLOWED_GLOBALS",
    "STORAGE_DTYPES",
    "MAX_PICKLE_BYTES",
    "MAX_PICKLE_DEPTH",
    "MIN_BYTES_BUDGET",
    "BYTES_BUDGET_FACTOR",
    "MSDN_KEY_MAP",
    "IGNORED_KEYS",
    "read_torch_state_dict",
    "split_state_dict",
    "backbone_prefixes",
]

_LOG = logging.getLogger(__name__)

#: Typed storage class name (``torch.<Name>``) -> numpy dtype of one element
#: (little-endian form; the byte order record can switch it to big-endian).
#: ``BFloat16Storage`` is read as raw uint16 and widened to float32.
STORAGE_DTYPES: Dict[str, str] = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

#: The only globals ``data.pkl`` may reference, as ``module.name``.
ALLOWED_GLOBALS = frozenset(
    [
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "collections.OrderedDict",
        "torch.storage.UntypedStorage",
    ]
    + ["torch." + name for name in STORAGE_DTYPES]
)

#: Reference state_dict key -> (msdn-tf Keras layer, weight name in that layer,
#: role). The weight names are identical to the reference keys. ``bias`` and
#: ``mask_bias`` are the model's own non-trainable margin weights, not layer weights
#: (docs/reference.md §2).
MSDN_KEY_MAP: Dict[str, Tuple[Optional[str], str, str]] = {
    "V": ("AttributeEmbedding", "V", "attribute word vectors (K, D), shared by both sub-nets"),
    "att": ("AttributeEmbedding", "att", "class attribute matrix (C, K)"),
    "W_1": ("AttributeToVisual", "W_1", "A->V attribute score (D, F)"),
    "W_2": ("AttributeToVisual", "W_2", "A->V attention (D, F)"),
    "W_1_1": ("VisualToAttribute", "W_1_1", "V->A attribute score (F, D)"),
    "W_2_1": ("VisualToAttribute", "W_2_1", "V->A attention (D, F)"),
    "bias": (None, "bias", "margin size (scalar; the reference code creates it as 1)"),
    "mask_bias": (None, "mask_bias", "self-calibration margin sign (1, C): +1 unseen, -1 seen"),
}

#: Reference keys that are present in the released files but carry nothing the
#: port needs -> why they are skipped.
IGNORED_KEYS: Dict[str, str] = {
    "weight_ce": "identity matrix of the reference loss, not a parameter",
    "W_3": "dead code in the reference, always zero",
    "W_3_1": "dead code in the reference, always zero",
}

#: Largest ``data.pkl`` record read (bytes, uncompressed). A state_dict's pickle holds
#: only names, shapes and storage keys: ResNet-101 with the MSDN weights is about 16 KB.
MAX_PICKLE_BYTES = 16 << 20
#: Deepest nesting of objects in ``data.pkl`` (a state_dict needs about 6 levels).
MAX_PICKLE_DEPTH = 64
#: Bytes materialised (storages read plus arrays returned) are at most the larger of
#: this and ``BYTES_BUDGET_FACTOR`` times the checkpoint's size on disk.
MIN_BYTES_BUDGET = 64 << 20
BYTES_BUDGET_FACTOR = 3

# Refuse to materialise a tensor bigger than this when it is larger than its
# storage (only possible with zero/overlapping strides, i.e. a crafted file).
_MAX_EXPANDED_BYTES = 1 << 28
_MAX_NAME_IN_MESSAGE = 120


def _short(text: str) -> str:
    """``text`` cut to a message-sized prefix (``text`` must already be a str)."""
    if not isinstance(text, str):
        return _describe(text)
    if len(text) > _MAX_NAME_IN_MESSAGE:
        return text[:_MAX_NAME_IN_MESSAGE] + "..."
    return text


def _describe(value, _level: int = 0) -> str:
    """A short summary of an untrusted value, built in bounded time and memory.

    Strings and bytes are cut before ``repr``; integers with more than 64 bits are
    described by their size (``str`` of a huge int is quadratic and may raise); a
    container shows at most 6 items, 2 levels deep. Never calls ``repr`` on a container
    or on an object of unknown type.
    """
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 64:
            return "an integer of %d bits" % value.bit_length()
        return repr(value)
    if isinstance(value, (str, bytes, bytearray)):
        if len(value) > 60:
            return "%s... (%d long)" % (repr(value[:60]), len(value))
        return repr(value)
    if isinstance(value, (tuple, list)):
        if _level >= 2:
            return "a %s of %d items" % (type(value).__name__, len(value))
        items = [_describe(v, _level + 1) for v in value[:6]]
        if len(value) > 6:
            items.append("... %d items" % len(value))
        if isinstance(value, tuple):
            return "(" + ", ".join(items) + ("," if len(value) == 1 else "") + ")"
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        return "a %s of %d items" % (type(value).__name__, len(value))
    if isinstance(value, (_StorageType, _Callable)):
        return repr(value)
    return "a %s object" % type(value).__name__


def _exception_text(exc: BaseException) -> str:
    """``Type: message`` of an exception raised while unpickling, without repr-ing its arguments."""
    args = getattr(exc, "args", ())
    if len(args) == 1 and isinstance(args[0], str):
        return "%s: %s" % (type(exc).__name__, _short(args[0]))
    return "%s: %s" % (type(exc).__name__, ", ".join(_describe(a) for a in args[:3]))


class _Budget:
    """Bytes this load may still materialise; charged before each allocation."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.limit:
            raise _OverBudget(self.limit, self.used, nbytes, what)
        self.used += nbytes


class _OverBudget(Exception):
    def __init__(self, limit, used, nbytes, what):
        super().__init__(what)
        self.args_ = (limit, used, nbytes, what)


# ---------------------------------------------------------------------------
# Frozen holders produced while unpickling
# ---------------------------------------------------------------------------


class _Frozen:
    """Base for objects handed to the unpickler: no ``__dict__``, no setattr."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise TypeError("read-only object")

    def __delattr__(self, name):
        raise TypeError("read-only object")

    def __reduce__(self):
        raise TypeError("not picklable")


class _StorageType(_Frozen):
    """Marker standing in for ``torch.FloatStorage`` etc. Not callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self):
        return "<storage type %s>" % self.name


class _Storage(_Frozen):
    """One storage record read from the zip: a flat numpy array."""

    __slots__ = ("key", "type_name", "array", "budget")

    def __init__(self, key: str, type_name: str, array: np.ndarray, budget: _Budget):
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "type_name", type_name)
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "budget", budget)


class _Tensor(_Frozen):
    """A rebuilt tensor (numpy array) and whether it was an ``nn.Parameter``."""

    __slots__ = ("array", "is_parameter")

    def __init__(self, array: np.ndarray, is_parameter: bool = False):
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "is_parameter", is_parameter)


class _Callable(_Frozen):
    """What the unpickler gets for an allowed function: a frozen wrapper."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn):
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return "<restricted %s>" % self.qualname


# ---------------------------------------------------------------------------
# Replacements for the allowed torch functions
# ---------------------------------------------------------------------------


def _is_int(value) -> bool:
    """An int that fits torch's int64 (larger ones would make the arithmetic on sizes slow)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < (1 << 63)


def _int_tuple(value, what: str) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64 or not all(_is_int(v) for v in value):
        raise _Corrupt("%s must be a short tuple of 64-bit ints, got %s" % (what, _describe(value)))
    return tuple(value)


class _Corrupt(Exception):
    """Internal: data.pkl is well-formed pickle but not a sane state_dict."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Numpy version of ``torch._utils._rebuild_tensor_v2`` (dense CPU tensors)."""
    if not isinstance(storage, _Storage):
        raise _Corrupt("tensor storage is %s, not a storage record" % type(storage).__name__)
    if not _is_int(storage_offset) or storage_offset < 0:
        raise _Corrupt("bad storage offset %s" % _describe(storage_offset))
    size = _int_tuple(size, "tensor size")
    stride = _int_tuple(stride, "tensor stride")
    if len(size) != len(stride):
        raise _Corrupt("tensor size %s and stride %s differ in length" % (_describe(size), _describe(stride)))
    if len(size) > 32:
        raise _Corrupt("tensor has %d dimensions; at most 32 are supported" % len(size))
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise _Corrupt("negative size or stride (%s, %s)" % (_describe(size), _describe(stride)))
    if backward_hooks:
        raise _Corrupt("tensor has backward hooks")
    flat = storage.array
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:
        out = np.zeros(size, dtype=flat.dtype)
    else:
        last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= flat.size:
            raise _Corrupt(
                "tensor of size %s, stride %s at offset %s reaches element %s but storage "
                "'%s' holds only %d"
                % (
                    _describe(size),
                    _describe(stride),
                    _describe(storage_offset),
                    _describe(last),
                    storage.key,
                    flat.size,
                )
            )
        if numel * flat.itemsize > _MAX_EXPANDED_BYTES and numel > flat.size:
            raise _Corrupt(
                "tensor of size %s expands its storage beyond %d bytes" % (_describe(size), _MAX_EXPANDED_BYTES)
            )
        out_itemsize = 4 if storage.type_name == "BFloat16Storage" else flat.itemsize
        storage.budget.charge(numel * out_itemsize, "a tensor of size %s" % _describe(size))
        base = flat[storage_offset:]
        view = np.lib.stride_tricks.as_strided(
            base, shape=size, strides=tuple(st * flat.itemsize for st in stride), writeable=False
        )
        out = np.array(view, copy=True, order="C")
    if storage.type_name == "BFloat16Storage":
        out = (out.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if not out.dtype.isnative:
        out = out.astype(out.dtype.newbyteorder("="))
    return _Tensor(out)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
    """Numpy version of ``torch._utils._rebuild_parameter``: marks the tensor."""
    if not isinstance(data, _Tensor):
        raise _Corrupt("parameter data is %s, not a tensor" % type(data).__name__)
    if backward_hooks:
        raise _Corrupt("parameter has backward hooks")
    return _Tensor(data.array, is_parameter=True)


def _rebuild_parameter_with_state(data, requires_grad=True, backward_hooks=None, state=None):
    """Like :func:`_rebuild_parameter`; the Python attribute ``state`` is dropped."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _ordered_dict(*args):
    """``OrderedDict(items)``; keys must be strings (checked before any key is hashed)."""
    if len(args) > 1:
        raise _Corrupt("OrderedDict called with %d arguments" % len(args))
    if not args:
        return collections.OrderedDict()
    items = args[0]
    if isinstance(items, dict):
        pairs = list(items.items())  # keys were checked by the scan: dict keys are strings
    elif isinstance(items, (list, tuple)):
        pairs = items
    else:
        raise _Corrupt("OrderedDict called with %s" % _describe(items))
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise _Corrupt("OrderedDict item %s is not a (string, value) pair" % _describe(pair))
    return collections.OrderedDict(pairs)


_FUNCTIONS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "collections.OrderedDict": _ordered_dict,
}


def _resolve(qualname: str):
    """Object the unpickler receives for an allowed global (fresh each load)."""
    if qualname in _FUNCTIONS:
        return _Callable(qualname, _FUNCTIONS[qualname])
    if qualname == "torch.storage.UntypedStorage":
        return _StorageType("UntypedStorage", "u1")
    name = qualname[len("torch.") :]
    return _StorageType(name, STORAGE_DTYPES[name])


# ---------------------------------------------------------------------------
# Restricted unpickler
# ---------------------------------------------------------------------------


class _Refused(Exception):
    """Internal: data.pkl named a global outside the allow-list."""

    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` admits only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, big_endian: bool, budget: _Budget):
        super().__init__(file)
        self._zf = zf
        self._prefix = prefix
        self._big_endian = big_endian
        self._budget = budget
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module, name):  # noqa: D401 - pickle API
        qualname = "%s.%s" % (module, name)
        if qualname not in ALLOWED_GLOBALS:
            raise _Refused(qualname)
        return _resolve(qualname)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise _Corrupt("unknown persistent id %s" % _describe(pid))
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Corrupt("persistent id names storage type %s" % _describe(storage_type))
        if not isinstance(key, str) or not key or "/" in key or "\\" in key or ".." in key:
            raise _Corrupt("bad storage key %s" % _describe(key))
        if not isinstance(location, str):
            raise _Corrupt("bad storage location %s" % _describe(location))
        if not _is_int(numel) or numel < 0:
            raise _Corrupt("bad storage size %s" % _describe(numel))
        cached = self._storages.get(key)
        if cached is not None:
            if cached.type_name != storage_type.name:
                raise _Corrupt("storage '%s' is used as both %s and %s" % (key, cached.type_name, storage_type.name))
            return cached
        dtype = np.dtype(storage_type.dtype)
        if self._big_endian and dtype.itemsize > 1:
            dtype = dtype.newbyteorder(">")
        record = "%sdata/%s" % (self._prefix, key)
        try:
            info = self._zf.getinfo(record)
        except KeyError:
            raise _MissingRecord(record) from None
        needed = numel * dtype.itemsize
        if info.file_size < needed:
            raise _ShortRecord(record, info.file_size, needed, numel, storage_type.name)
        self._budget.charge(needed, "storage record '%s'" % record)
        with self._zf.open(info) as fh:
            raw = fh.read(needed)
        if len(raw) < needed:
            raise _ShortRecord(record, len(raw), needed, numel, storage_type.name)
        array = np.frombuffer(raw, dtype=dtype, count=numel)
        storage = _Storage(key, storage_type.name, array, self._budget)
        self._storages[key] = storage
        return storage


class _MissingRecord(Exception):
    def __init__(self, record: str):
        super().__init__(record)
        self.record = record


class _ShortRecord(Exception):
    def __init__(self, record, got, needed, numel, type_name):
        super().__init__(record)
        self.args_ = (record, got, needed, numel, type_name)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _not_zip_message(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        return "cannot read %s: %s" % (path, exc)
    if head[:2] == b"PK":
        return "%s is a truncated or corrupt zip archive (no readable central directory); download it again" % path
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return (
            "%s is a legacy (pre-zip) PyTorch file, written by torch < 1.6 or with "
            "_use_new_zipfile_serialization=False; this reader only supports the zip "
            "format: re-save it with torch.save(torch.load(...), path) in a trusted "
            "environment" % path
        )
    if head[257:262] == b"ustar":
        return (
            "%s is a legacy tar-format PyTorch file (torch < 0.4); re-save it with a "
            "current torch.save in a trusted environment" % path
        )
    if not head:
        return "%s is empty; expected a PyTorch zip checkpoint" % path
    return "%s is not a PyTorch zip checkpoint (torch.save format)" % path


def _find_prefix(zf: zipfile.ZipFile, path: str) -> str:
    candidates = [n for n in zf.namelist() if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if len(candidates) != 1:
        if not candidates:
            raise DataError("%s is a zip file but not a PyTorch checkpoint: no '<archive>/data.pkl' record" % path)
        raise DataError(
            "%s holds %d 'data.pkl' records (%s); expected exactly one"
            % (path, len(candidates), ", ".join(_short(c) for c in candidates[:5]))
        )
    return candidates[0][: -len("data.pkl")]


def _read_text_record(zf: zipfile.ZipFile, name: str, path: str) -> Optional[str]:
    try:
        info = zf.getinfo(name)
    except KeyError:
        return None
    if info.file_size > 64:
        raise DataError("%s: record '%s' is %d bytes, expected a short text" % (path, name, info.file_size))
    try:
        return zf.read(info).decode("ascii").strip()
    except (UnicodeDecodeError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError("%s: record '%s' is unreadable (%s)" % (path, name, exc)) from None


def read_torch_state_dict(path, max_bytes: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Read a ``torch.save``-d state_dict into numpy arrays, without torch.

    Nothing referenced by the file is imported or run: ``data.pkl`` is read by a
    restricted unpickler that only admits :data:`ALLOWED_GLOBALS`, each replaced
    by a function of this module.

    Args:
        path: path of a ``.pth``/``.pt`` file in torch's zip format
            (``torch.save`` of torch >= 1.6).
        max_bytes: most bytes this call may materialise (storage records read plus
            the arrays returned), checked before each allocation; default the larger of
            :data:`MIN_BYTES_BUDGET` and :data:`BYTES_BUDGET_FACTOR` times the file's size.

    Returns:
        ``dict`` mapping each state_dict key to a numpy array, in file order.
        Arrays are C-contiguous copies in native byte order with the tensor's
        dtype (float32, float64, float16, int64, int32, int16, int8, uint8,
        bool), except bfloat16 which becomes float32 (exact). 0-d tensors
        become 0-d arrays. Whether a tensor was an ``nn.Parameter`` is not kept.

    Raises:
        DataError: the file is missing or unreadable; not a zip (a legacy
            torch file gets its own message); a truncated or corrupt zip; a
            storage record missing or shorter than the tensor needs;
            ``data.pkl`` references any global outside the allow-list (the
            message names it, e.g. ``'os.system'``; nothing was executed);
            or the pickle is not a mapping of string keys to tensors; or a budget is
            exceeded (``data.pkl`` larger than :data:`MAX_PICKLE_BYTES`, nested deeper
            than :data:`MAX_PICKLE_DEPTH` or otherwise refused by the pickle scan; more
            than ``max_bytes`` to materialise).

    Example:
        >>> state = read_torch_state_dict("tests/fixtures/tiny_msdn.pth")  # doctest: +SKIP
        >>> list(state)[:3], state["V"].dtype                             # doctest: +SKIP
        (['V', 'att', 'W_1'], dtype('float32'))
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("checkpoint %s does not exist or is not a file" % path)
    if not zipfile.is_zipfile(path):
        raise DataError(_not_zip_message(path))
    if max_bytes is None:
        max_bytes = max(MIN_BYTES_BUDGET, BYTES_BUDGET_FACTOR * os.path.getsize(path))
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_open_zip(zf, path, _Budget(int(max_bytes)))
    except DataError:
        raise
    except zipfile.BadZipFile as exc:
        raise DataError(
            "%s is a truncated or corrupt zip archive (%s); download it again" % (path, _exception_text(exc))
        ) from None
    except (OSError, EOFError) as exc:
        raise DataError("%s could not be read: %s" % (path, _exception_text(exc))) from None
    except (NotImplementedError, RuntimeError, UnicodeDecodeError, ValueError) as exc:
        # zipfile: an unsupported compression method, zip version or encryption, names that are not UTF-8
        raise DataError(
            "%s is not a zip archive torch.save writes (%s); re-save it with torch.save" % (path, _exception_text(exc))
        ) from None


def _read_pickle_record(zf: zipfile.ZipFile, name: str, path: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > MAX_PICKLE_BYTES:
        raise DataError(
            "%s: record '%s' is %d bytes, over the limit of %d for a state_dict's pickle "
            "(MAX_PICKLE_BYTES; a state_dict's pickle holds only names and shapes)"
            % (path, _short(name), info.file_size, MAX_PICKLE_BYTES)
        )
    with zf.open(info) as fh:
        data = fh.read(info.file_size + 1)
    if len(data) > info.file_size:  # the zip header lied about the size
        raise DataError("%s: record '%s' is over the limit of %d bytes" % (path, _short(name), MAX_PICKLE_BYTES))
    try:
        scan_pickle(data, max_depth=MAX_PICKLE_DEPTH)
    except PickleRefused as exc:
        raise DataError(
            "refusing to load %s: its '%s' is not a state_dict pickle: %s; nothing was unpickled"
            % (path, _short(name), exc)
        ) from None
    return data


def _read_open_zip(zf: zipfile.ZipFile, path: str, budget: _Budget) -> Dict[str, np.ndarray]:
    prefix = _find_prefix(zf, path)
    byteorder = _read_text_record(zf, prefix + "byteorder", path)
    if byteorder not in (None, "little", "big"):
        raise DataError(
            "%s: record '%sbyteorder' says %r, expected 'little' or 'big'" % (path, prefix, _short(byteorder))
        )
    version = _read_text_record(zf, prefix + "version", path)
    if version is not None and not version.isdigit():
        raise DataError("%s: record '%sversion' is %r, expected an integer" % (path, prefix, _short(version)))
    data = _read_pickle_record(zf, prefix + "data.pkl", path)
    with io.BytesIO(data) as fh:
        unpickler = _StateDictUnpickler(fh, zf, prefix, big_endian=(byteorder == "big"), budget=budget)
        try:
            obj = unpickler.load()
        except DataError:
            raise
        except _Refused as exc:
            name = _short(exc.qualname)
            if exc.qualname.startswith("torch."):
                raise DataError(
                    "refusing to load %s: it references '%s', which this reader does not "
                    "allow (it rebuilds only dense CPU tensors of the dtypes in "
                    "STORAGE_DTYPES); nothing was executed" % (path, name)
                ) from None
            raise DataError(
                "refusing to load %s: it references '%s', which a state_dict never needs; "
                "nothing was executed" % (path, name)
            ) from None
        except _MissingRecord as exc:
            raise DataError("%s is incomplete: storage record '%s' is missing" % (path, exc.record)) from None
        except _ShortRecord as exc:
            record, got, needed, numel, type_name = exc.args_
            raise DataError(
                "%s is truncated: storage record '%s' has %d bytes but %d %s "
                "elements need %d" % (path, record, got, numel, type_name, needed)
            ) from None
        except _Corrupt as exc:
            raise DataError("%s: data.pkl is not a valid state_dict: %s" % (path, exc)) from None
        except _OverBudget as exc:
            limit, used, nbytes, what = exc.args_
            raise DataError(
                "refusing to load %s: %s needs %d more bytes after %d already read, over this "
                "load's budget of %d bytes (max_bytes; by default %d times the file's size, at "
                "least %d): a file whose tensors expand far beyond its size is crafted or corrupt"
                % (path, what, nbytes, used, limit, BYTES_BUDGET_FACTOR, MIN_BYTES_BUDGET)
            ) from None
        except zipfile.BadZipFile:
            raise
        except Exception as exc:  # nothing from the file ran: any failure means corrupt
            raise DataError("%s: data.pkl is corrupt or not a state_dict (%s)" % (path, _exception_text(exc))) from None
    return _to_arrays(obj, path)


def _to_arrays(obj: Any, path: str) -> Dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise DataError(
            "%s holds a pickled %s, not a state_dict (a mapping of names to tensors)" % (path, type(obj).__name__)
        )
    out: Dict[str, np.ndarray] = {}
    bad = []
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, _Tensor):
            out[key] = value.array
        else:
            bad.append(key)
    if bad:
        nested = [k for k in bad if isinstance(obj.get(k), dict)]
        hint = ""
        if nested:
            hint = (
                " (entries %s are nested mappings: this looks like a training checkpoint; "
                "save only its state_dict)" % ", ".join(_describe(k) for k in nested[:5])
            )
        raise DataError(
            "%s is not a plain state_dict: %d entries are not named tensors, e.g. "
            "%s%s" % (path, len(bad), ", ".join(_describe(k) for k in bad[:5]), hint)
        )
    return out


def backbone_prefixes(backbone: Mapping[str, Any]) -> Dict[str, int]:
    """Count backbone keys by their first dotted component.

    Args:
        backbone: the third value returned by :func:`split_state_dict`.

    Returns:
        ``{prefix: count}`` in first-seen order; the prefix keeps its trailing
        dot (``"backbone."``); keys without a dot are counted under ``""``.

    Example:
        >>> backbone_prefixes({"backbone.conv1.weight": 0, "backbone.fc.bias": 0, "x": 0})
        {'backbone.': 2, '': 1}
    """
    counts: Dict[str, int] = {}
    for key in backbone:
        prefix = key.split(".", 1)[0] + "." if "." in key else ""
        counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def split_state_dict(
    state: Mapping[str, np.ndarray], source: str = "state_dict"
) -> Tuple[Dict[str, np.ndarray], Dict[str, str], Dict[str, np.ndarray]]:
    """Split a reference MSDN state_dict into MSDN weights, ignored keys and backbone.

    Classification (module constants):

    ============  =====================================================
    key           goes to
    ============  =====================================================
    V, att, W_1,  ``msdn_weights`` (:data:`MSDN_KEY_MAP`: reference key
    W_2, W_1_1,   -> Keras layer, weight name, role; names are kept)
    W_2_1, bias,
    mask_bias
    weight_ce     ``ignored``: identity matrix of the reference loss
    W_3, W_3_1    ``ignored``: dead code in the reference, always zero
    anything else ``backbone`` (e.g. ``backbone.*``, ``resnet101.*``)
    ============  =====================================================

    Shapes are checked for consistency: ``V`` (K, D), ``att`` (C, K),
    ``W_1``/``W_2``/``W_2_1`` (D, F), ``W_1_1`` (F, D), ``bias`` one element,
    ``mask_bias`` C elements. A short summary is logged at INFO level.

    Args:
        state: mapping of key -> array, e.g. from :func:`read_torch_state_dict`.
        source: name used in error messages (usually the checkpoint path).

    Returns:
        ``(msdn_weights, ignored, backbone)``: ``msdn_weights`` maps the eight
        MSDN keys to their arrays (unchanged); ``ignored`` maps each present
        key of :data:`IGNORED_KEYS` to its reason; ``backbone`` holds every
        other key and array, in input order (see :func:`backbone_prefixes`).

    Raises:
        DataError: an MSDN key is missing or the shapes disagree.

    Example:
        >>> import numpy as np
        >>> K, D, F, C = 5, 4, 6, 7
        >>> state = {"V": np.zeros((K, D)), "att": np.zeros((C, K)),
        ...          "W_1": np.zeros((D, F)), "W_2": np.zeros((D, F)),
        ...          "W_1_1": np.zeros((F, D)), "W_2_1": np.zeros((D, F)),
        ...          "bias": np.zeros(()), "mask_bias": np.ones((1, C)),
        ...          "weight_ce": np.eye(C), "backbone.fc.weight": np.zeros((2, 2))}
        >>> msdn, ignored, backbone = split_state_dict(state)
        >>> sorted(msdn) == sorted(MSDN_KEY_MAP), list(ignored), list(backbone)
        (True, ['weight_ce'], ['backbone.fc.weight'])
    """
    msdn: Dict[str, np.ndarray] = {}
    ignored: Dict[str, str] = {}
    backbone: Dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key in MSDN_KEY_MAP:
            msdn[key] = value
        elif key in IGNORED_KEYS:
            ignored[key] = IGNORED_KEYS[key]
        else:
            backbone[key] = value
    missing = [k for k in MSDN_KEY_MAP if k not in msdn]
    if missing:
        raise DataError(
            "%s lacks the MSDN key(s) %s (has %s)"
            % (source, ", ".join(missing), ", ".join(_short(k) for k in list(state)[:20]) or "nothing")
        )
    _check_shapes(msdn, source)
    prefixes = backbone_prefixes(backbone)
    _LOG.info(
        "%s: %d MSDN weights, ignored %s, backbone %s",
        source,
        len(msdn),
        sorted(ignored) or "nothing",
        ", ".join("%d under %r" % (n, p) for p, n in prefixes.items()) or "none",
    )
    return msdn, ignored, backbone


def _check_shapes(msdn: Mapping[str, np.ndarray], source: str) -> None:
    shapes = {k: tuple(np.shape(v)) for k, v in msdn.items()}

    def fail(key, expected):
        raise DataError(
            "%s: '%s' has shape %s, expected %s (V %s, att %s, W_1 %s)"
            % (source, key, shapes[key], expected, shapes["V"], shapes["att"], shapes["W_1"])
        )

    for key in ("V", "att", "W_1", "W_2", "W_1_1", "W_2_1"):
        if len(shapes[key]) != 2:
            fail(key, "a matrix")
    K, D = shapes["V"]
    C = shapes["att"][0]
    F = shapes["W_1"][1]
    expected = {"att": (C, K), "W_1": (D, F), "W_2": (D, F), "W_1_1": (F, D), "W_2_1": (D, F)}
    for key, shape in expected.items():
        if shapes[key] != shape:
            fail(key, shape)
    if int(np.prod(shapes["bias"], dtype=np.int64)) != 1:
        fail("bias", "a scalar")
    if int(np.prod(shapes["mask_bias"], dtype=np.int64)) != C:
        fail("mask_bias", "(1, %d)" % C)
