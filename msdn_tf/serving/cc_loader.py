"""Check a SavedModel with TensorFlow's C++ loader (the loader TF Serving uses).

A SavedModel that loads with ``tf.saved_model.load`` in Python may still fail
in TensorFlow Serving, which loads exports through the C++
``tensorflow::LoadSavedModel`` with the ``serve`` tag (for instance
``tf.saved_model.save`` of a Keras 3 model: "Could not find variable ...").
No TF Serving binary is available here, so this module compiles the small
program ``cc_loader.cc`` against the ``libtensorflow_cc.so.2`` /
``libtensorflow_framework.so.2`` and headers shipped in the tensorflow pip
wheel and drives it with subprocesses:

* :func:`compile_loader` -- build (once, cached) and return the binary path;
* :func:`inspect_saved_model` -- the signatures as the C++ loader sees them;
* :func:`run_signature` -- run one signature in C++ and return numpy outputs.

Command line::

    python -m msdn_tf.cc_loader EXPORT_DIR
    python -m msdn_tf.cc_loader EXPORT_DIR --signature serving_default \\
        --input features=x.npy [--out DIR]
    python -m msdn_tf.cc_loader EXPORT_DIR --signature serving_images \\
        --input images@cat.jpg --input images@dog.png

Numeric inputs are ``.npy`` files (float32/64, int8/16/32/64, uint8/16,
bool); a 1-D ``DT_STRING`` input (e.g. encoded JPEG/PNG bytes) is given one
file of raw bytes per batch element (``name@file``, repeated in order).

Importing this module does not import TensorFlow.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from msdn_tf.utils import subprocess_env

__all__ = [
    "CcLoaderError",
    "CcLoaderUnavailable",
    "compile_loader",
    "inspect_saved_model",
    "run_signature",
]

SOURCE = Path(__file__).with_name("cc_loader.cc")
BINARY_NAME = "cc_loader"
DEFAULT_TIMEOUT = 600.0
# Signature keys that are SavedModel internals rather than serving endpoints.
INTERNAL_SIGNATURES = ("__saved_model_init_op", "__saved_model_train_op")


class CcLoaderUnavailable(RuntimeError):
    """The C++ loader cannot be built here (no C++ compiler or no TF headers/libraries)."""


class CcLoaderError(RuntimeError):
    """The C++ loader ran but failed (load error, bad input, Session::Run error)."""


def _tensorflow_dir() -> Path:
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise CcLoaderUnavailable("tensorflow is not installed in this Python environment")
    return Path(list(spec.submodule_search_locations)[0])


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise CcLoaderUnavailable(
            f"C++ compiler {cxx!r} not found on PATH; install g++ (e.g. `apt-get install g++`) "
            "or set CXX to build the C++ SavedModel loader"
        )
    return path


def _check_tf_files(tf_dir: Path) -> None:
    missing = [
        str(p)
        for p in (
            tf_dir / "include" / "tensorflow" / "cc" / "saved_model" / "loader.h",
            tf_dir / "libtensorflow_cc.so.2",
            tf_dir / "libtensorflow_framework.so.2",
        )
        if not p.exists()
    ]
    if missing:
        raise CcLoaderUnavailable(
            "the tensorflow wheel lacks the C++ headers/libraries needed to build the loader: " + ", ".join(missing)
        )


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "msdn_tf" / "cc_loader"


def _cache_key(cxx: str, tf_dir: Path) -> str:
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(importlib.metadata.version("tensorflow").encode())
    h.update(str(tf_dir.resolve()).encode())
    h.update(cxx.encode())
    return h.hexdigest()[:16]


def _compile_command(cxx: str, tf_dir: Path, output: Path) -> list[str]:
    # tf.sysconfig gives the include dir, the C++ ABI / standard / Eigen defines and
    # the framework library; importing it imports TensorFlow, so only do it on a cache miss.
    import tensorflow as tf

    return [
        cxx,
        "-O0",  # the program only glues library calls; -O0 keeps the build short
        "-w",  # TF headers are noisy with deprecation warnings
        *tf.sysconfig.get_compile_flags(),
        str(SOURCE),
        "-o",
        str(output),
        *tf.sysconfig.get_link_flags(),
        # The kernels and the DirectSession live in libtensorflow_cc; nothing references
        # them by symbol, so keep the library even with a default --as-needed linker.
        "-Wl,--no-as-needed",
        f"-L{tf_dir}",
        "-l:libtensorflow_framework.so.2",
        "-l:libtensorflow_cc.so.2",
        f"-Wl,-rpath,{tf_dir}",
    ]


def compile_loader(cache_dir: str | os.PathLike | None = None) -> str:
    """Build the C++ loader if needed and return the binary's path.

    The binary is cached under ``cache_dir`` (default ``~/.cache/msdn_tf/cc_loader``)
    in a folder named by a hash of the source, the TensorFlow version/location and
    the compiler, so it is rebuilt only when one of them changes.  Concurrent callers
    serialise on a lock file; the binary appears by atomic rename.

    Raises:
        CcLoaderUnavailable: no C++ compiler or the wheel lacks headers/libraries.
        CcLoaderError: the compiler failed (its output is in the message).
    """
    cxx = _compiler()
    tf_dir = _tensorflow_dir()
    _check_tf_files(tf_dir)
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target_dir = root / _cache_key(cxx, tf_dir)
    binary = target_dir / BINARY_NAME
    if binary.exists():
        return str(binary)
    target_dir.mkdir(parents=True, exist_ok=True)
    with open(target_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():  # another process built it while we waited
            return str(binary)
        fd, tmp = tempfile.mkstemp(prefix=".cc_loader.", dir=target_dir)
        os.close(fd)
        try:
            cmd = _compile_command(cxx, tf_dir, Path(tmp))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CcLoaderError(
                    f"compiling {SOURCE} failed (exit {proc.returncode}):\n"
                    + " ".join(cmd)
                    + "\n"
                    + proc.stderr[-4000:]
                )
            os.chmod(tmp, 0o755)
            os.replace(tmp, binary)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return str(binary)


def _env() -> dict:
    return subprocess_env()


def _call(args: list[str], timeout: float) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=timeout)
    if proc.returncode != 0:
        msgs = [ln[len("cc_loader error: ") :] for ln in proc.stderr.splitlines() if ln.startswith("cc_loader error: ")]
        detail = "\n".join(msgs) if msgs else proc.stderr[-4000:]
        raise CcLoaderError(f"C++ SavedModel loader failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def inspect_saved_model(
    export_dir: str | os.PathLike,
    *,
    binary: str | None = None,
    include_internal: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict:
    """Load ``export_dir`` with the C++ loader (tag ``serve``) and describe it.

    Returns ``{"export_dir", "tags", "signatures": {name: {"method_name", "inputs",
    "outputs"}}}`` where inputs/outputs map each key to ``{"name", "dtype"
    ("DT_FLOAT", ...), "shape" (list with -1 for unknown dims, or None for unknown
    rank)}``.  SavedModel-internal entries such as ``__saved_model_init_op`` are
    dropped unless ``include_internal``.

    Raises:
        CcLoaderError: the C++ loader cannot load the export.
    """
    binary = binary or compile_loader()
    info = json.loads(_call([binary, "inspect", os.fspath(export_dir)], timeout))
    if not include_internal:
        for key in INTERNAL_SIGNATURES:
            info["signatures"].pop(key, None)
    return info


def _read_strings(path: str, shape: list[int]) -> np.ndarray:
    data = Path(path).read_bytes()
    count = int.from_bytes(data[:8], "little")
    out = np.empty(count, dtype=object)
    pos = 8
    for i in range(count):
        n = int.from_bytes(data[pos : pos + 8], "little")
        pos += 8
        out[i] = data[pos : pos + n]
        pos += n
    return out.reshape(shape)


def _is_string_input(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (bytes, bytearray)) for v in value)
    arr = np.asarray(value)
    return arr.dtype.kind in "OS"


def run_signature(
    export_dir: str | os.PathLike,
    signature: str,
    inputs: dict,
    *,
    binary: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, np.ndarray]:
    """Run ``signature`` of ``export_dir`` through the C++ loader.

    Args:
        inputs: signature input key -> numpy array of the signature's dtype (no
            implicit casts, as in TF Serving), or -- for a 1-D ``DT_STRING`` input --
            a list / 1-D object array of ``bytes`` (e.g. encoded images).

    Returns:
        output key -> numpy array (``DT_STRING`` outputs as object arrays of bytes).

    Raises:
        CcLoaderError: load failure, unknown signature/input, dtype mismatch, or an
            error while running the graph (e.g. wrong shape, undecodable image).
    """
    binary = binary or compile_loader()
    with tempfile.TemporaryDirectory(prefix="msdn_cc_loader_") as tmp:
        args = [binary, "run", os.fspath(export_dir), signature, tmp]
        for i, (name, value) in enumerate(inputs.items()):
            if "=" in name or "@" in name:
                raise ValueError(f"input name {name!r} must not contain '=' or '@'")
            if _is_string_input(value):
                elems = list(value) if isinstance(value, (list, tuple)) else np.asarray(value, dtype=object)
                if isinstance(elems, np.ndarray):
                    if elems.ndim != 1:
                        raise ValueError(f"string input {name!r} must be 1-D, got shape {elems.shape}")
                    elems = list(elems)
                for j, elem in enumerate(elems):
                    path = os.path.join(tmp, f"in{i}_{j}.bin")
                    Path(path).write_bytes(bytes(elem))
                    args.append(f"{name}@{path}")
            else:
                arr = np.ascontiguousarray(value)
                if arr.dtype.byteorder == ">":
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                path = os.path.join(tmp, f"in{i}.npy")
                np.save(path, arr, allow_pickle=False)
                args.append(f"{name}={path}")
        summary = json.loads(_call(args, timeout))
        outputs = {}
        for key, meta in summary["outputs"].items():
            if meta["file"].endswith(".strs"):
                outputs[key] = _read_strings(meta["file"], meta["shape"])
            else:
                outputs[key] = np.load(meta["file"], allow_pickle=False)
        return outputs


def outputs_report(outputs: dict, out_dir=None) -> dict:
    """What ``python -m msdn_tf.cc_loader --signature`` prints for :func:`run_signature`'s outputs:
    key -> dtype, shape and (numeric outputs) values; with ``out_dir`` numeric outputs are also
    saved there as ``<key>.npy``."""
    report = {}
    for key, arr in outputs.items():
        entry = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
        if arr.dtype != object:
            entry["values"] = arr.tolist()
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            if arr.dtype != object:
                np.save(os.path.join(out_dir, f"{key}.npy"), arr)
        report[key] = entry
    return report
