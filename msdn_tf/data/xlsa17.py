"""Readers for the standard zero-shot benchmark metadata (docs/reference.md §1.2, §1.3).

Files handled:

* ``att_splits.mat`` (xlsa17): ``att``/``original_att`` (K x C), ``allclasses_names``
  (C x 1 cell), 1-based ``trainval_loc``/``test_seen_loc``/``test_unseen_loc`` and,
  in the original files, ``train_loc``/``val_loc``. MATLAB v5 files are read with
  ``scipy.io.loadmat``, v7.3 (HDF5) files with ``h5py``.
* ``sent_splits.mat`` (CUB): the same image order, holds CUB's ``train_loc``/``val_loc``.
* ``res101.mat`` (xlsa17): ``image_files`` (N x 1 cell), 1-based ``labels``,
  ``features`` (2048 x N, skipped unless asked for).
* ``image_list.npz``: ``labels`` (0-based) and ``image_files``, same row order as
  ``res101.mat``.
* ``{DS}_attribute.pkl``: a pickled float64 array (K, 300) of attribute word
  vectors. It is read with a restricted unpickler that admits only the globals a
  numpy array pickle needs; anything else is refused without being executed.
  ``.npy`` files are accepted too (``allow_pickle=False``).
* attribute names: CUB ``attributes.txt`` (``"1 has_bill_shape::dagger"``), AWA2
  ``predicates.txt`` (``"1\\tblack"``), SUN ``attributes.mat`` (cell ``attributes``)
  or a plain one-name-per-line text file.

Everything returned is 0-based and in the orientation the rest of msdn-tf uses:
class attributes ``(C, K)``, word vectors ``(K, D)``. Every problem is reported
as a :class:`~msdn_tf.errors.DataError` that names the file and the key.

Note on ``train_loc``/``val_loc``: in the xlsa17 files they split *all* images of
the seen classes (trainval plus test_seen) into two class-disjoint parts. By
default :func:`load_xlsa17_dataset` keeps only their rows that are in
``trainval_loc`` (so hyper-parameter search never touches test_seen images);
``train_val="raw"`` keeps them as in the file and ``train_val="none"`` drops them.
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import re
from typing import Optional, Sequence

import numpy as np

from msdn_tf.data.base import FeatureSource, ZSLData, class_attributes_for_model, validate
from msdn_tf.data.datasets import BENCHMARKS, folder_name, nonnegative_att
from msdn_tf.errors import DataError
from msdn_tf.interop.pickle_scan import PickleRefused, scan_pickle
from msdn_tf.limits import (
    check_array_bytes,
    check_file_size,
    check_hdf5_dataset,
    check_npz,
    check_text_file,
    short_text,
)

SPLIT_KEYS = ("trainval_loc", "test_seen_loc", "test_unseen_loc")
OPTIONAL_SPLIT_KEYS = ("train_loc", "val_loc")

# Folder and file names of the three standard benchmarks.
#: Upstream folder of each benchmark (read from :mod:`msdn_tf.data.datasets`; other names are upper-cased).
DATASET_DIRS = {name: facts.folder for name, facts in BENCHMARKS.items()}
ATTRIBUTE_NAME_FILES = ("attributes.txt", "predicates.txt", "attributes.mat", "attribute_names.txt")


# ---------------------------------------------------------------------------------------------
# .mat reading (scipy for v4/v5/v7, h5py for v7.3)


def _require_file(path: str, what: str) -> str:
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: {what} not found")
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} is not a regular file")
    return path


#: Most elements a MATLAB v7.3 variable may expand to through cell references (each
#: reference counted at each use: cells of cells that share their items would otherwise
#: take exponential time), and the deepest nesting of cells.
MAX_MAT_ELEMENTS = 50_000_000
MAX_MAT_DEPTH = 8


def _h5_matlab_value(f, obj, budget=None, depth=0):
    """Convert one h5py object of a MATLAB v7.3 file to numpy in MATLAB orientation.

    Each dataset's declared size is checked against the bytes it stores before it is read
    (:func:`msdn_tf.limits.check_hdf5_dataset`); cell references count against
    :data:`MAX_MAT_ELEMENTS` and :data:`MAX_MAT_DEPTH` before they are followed.
    """
    import h5py

    budget = [MAX_MAT_ELEMENTS] if budget is None else budget
    if isinstance(obj, h5py.Group):
        raise DataError(f"{f.filename}: '{short_text(obj.name, 80)}' is a MATLAB struct; not supported here")
    if depth > MAX_MAT_DEPTH:
        raise DataError(f"{f.filename}: cells nested deeper than {MAX_MAT_DEPTH} levels (MAX_MAT_DEPTH)")
    budget[0] -= 1 + int(obj.size or 0)
    if budget[0] < 0:
        raise DataError(
            f"{f.filename}: '{short_text(obj.name, 80)}' expands to more than {MAX_MAT_ELEMENTS} elements "
            "through cell references (MAX_MAT_ELEMENTS)"
        )
    check_hdf5_dataset(obj, f.filename)
    mclass = obj.attrs.get("MATLAB_class", b"")
    if isinstance(mclass, bytes):
        mclass = mclass.decode("ascii", "replace")
    data = obj[()]
    if mclass == "cell" or (isinstance(data, np.ndarray) and data.dtype == h5py.ref_dtype):
        refs = np.asarray(data)
        out = np.empty(refs.shape, dtype=object)
        for idx in np.ndindex(refs.shape):
            out[idx] = _h5_matlab_value(f, f[refs[idx]], budget, depth + 1)
        return out.T
    if mclass == "char":
        codes = np.asarray(data).T  # MATLAB (rows, chars)
        if codes.ndim == 2 and codes.shape[0] == 1:
            return "".join(map(chr, codes[0]))
        return np.array(["".join(map(chr, row)) for row in np.atleast_2d(codes)])
    if obj.attrs.get("MATLAB_empty", 0):
        return np.zeros((0, 0))
    return np.asarray(data).T  # h5py sees MATLAB's column-major arrays transposed


def _load_mat(path: str, what: str = "MATLAB file", variable_names: Optional[Sequence[str]] = None) -> dict:
    """Read a .mat file into ``{key: value}`` (MATLAB orientation), v5 or v7.3."""
    path = _require_file(path, what)
    import scipy.io

    _check_mat_v5_sizes(path, what, variable_names)
    try:
        return scipy.io.loadmat(path, variable_names=variable_names)
    except NotImplementedError:
        pass  # MATLAB v7.3: an HDF5 file
    except Exception as exc:  # scipy raises many types (ValueError, TypeError, zlib.error, ...)
        raise DataError(f"{path}: cannot read {what} (corrupt or truncated?): {type(exc).__name__}: {exc}") from exc
    import h5py

    try:
        with h5py.File(path, "r") as f:
            keys = [k for k in f.keys() if not k.startswith("#")]
            if variable_names is not None:
                keys = [k for k in keys if k in variable_names]
            return {k: _h5_matlab_value(f, f[k]) for k in keys}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read {what} as MATLAB v7.3/HDF5 (corrupt or truncated?): {exc}") from exc


#: Bytes per element of each MATLAB v5 array class (cells, structs and objects count 8 per
#: element: their contents are bounded by zlib's inflation ratio, about 1000, instead).
_MAT_CLASS_BYTES = {1: 8, 2: 8, 3: 8, 4: 2, 5: 8, 6: 8, 7: 4, 8: 1, 9: 1, 10: 2, 11: 2, 12: 4, 13: 4, 14: 8, 15: 8}


def _mat_v5_arrays(path: str):
    """``[(name, dims, class code)]`` of a MATLAB v5 file, read from each variable's header only.

    A compressed variable is inflated only as far as its header (a few hundred bytes);
    ``None`` for a file that is not v5 (v7.3 is HDF5) or that cannot be parsed (``loadmat``
    then reports it in its own words).
    """
    import struct
    import zlib

    out = []
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(128)
        if len(head) < 128 or head[126:128] not in (b"IM", b"MI"):
            return None
        order = "<" if head[126:128] == b"IM" else ">"
        if struct.unpack(order + "H", head[124:126])[0] != 0x0100:
            return None  # v7.3 (0x0200) and others
        pos = 128
        while pos + 8 <= size:
            fh.seek(pos)
            dtype, nbytes = struct.unpack(order + "II", fh.read(8))
            if dtype >> 16:  # small data element: 4 bytes of data in the tag
                pos += 8
                continue
            if dtype == 15:  # miCOMPRESSED
                inflater = zlib.decompressobj()
                try:
                    body = inflater.decompress(fh.read(min(nbytes, 1 << 16)), 512)
                except zlib.error:
                    return None
                pos += 8 + nbytes
            else:
                body = struct.pack(order + "II", dtype, nbytes) + fh.read(min(nbytes, 512))
                pos += 8 + nbytes + (-nbytes % 8)
            parsed = _parse_mat_matrix_header(body, order)
            if parsed is not None:
                out.append(parsed)
    return out


def _parse_mat_matrix_header(body: bytes, order: str):
    """``(name, dims, class)`` from the start of a miMATRIX element, or ``None``."""
    import struct

    def element(at):
        if at + 8 > len(body):
            return None, None, at
        dtype, nbytes = struct.unpack(order + "II", body[at : at + 8])
        if dtype >> 16:  # small element
            n = dtype >> 16
            return dtype & 0xFFFF, body[at + 4 : at + 4 + n], at + 8
        return dtype, body[at + 8 : at + 8 + nbytes], at + 8 + nbytes + (-nbytes % 8)

    kind, _, at = element(0)
    if kind != 14:  # miMATRIX
        return None
    at = 8  # the sub-elements start after the matrix tag
    _, flags, at = element(at)
    _, dims_raw, at = element(at)
    _, name, at = element(at)
    if not flags or len(flags) < 4 or dims_raw is None or len(dims_raw) % 4:
        return None
    mclass = struct.unpack(order + "I", flags[:4])[0] & 0xFF
    dims = struct.unpack(order + "%di" % (len(dims_raw) // 4), dims_raw)
    return (name or b"").decode("latin-1"), dims, mclass


def _check_mat_v5_sizes(path: str, what: str, variable_names) -> None:
    """Before ``loadmat`` of a v5 file: the variables' declared sizes against the file's size.

    Reads only each variable's header (:func:`_mat_v5_arrays`), so a small file that
    declares or inflates to gigabytes is refused before anything is allocated (budget:
    :func:`msdn_tf.limits.array_budget` of the file's size). v7.3 (HDF5) files are checked
    dataset by dataset when read.
    """
    arrays = _mat_v5_arrays(path)
    if not arrays:
        return
    declared = 0
    for name, dims, mclass in arrays:
        if variable_names is not None and name not in variable_names:
            continue
        count = 1
        for n in dims:
            count *= max(int(n), 0)
        declared += count * _MAT_CLASS_BYTES.get(mclass, 8)
    check_array_bytes(declared, os.path.getsize(path), path, what + " (all its variables)")


def _get(mat: dict, path: str, key: str, required: bool = True):
    if key not in mat:
        if required:
            present = sorted(k for k in mat if not k.startswith("__"))
            raise DataError(f"{path}: missing key '{key}' (keys present: {present})")
        return None
    return mat[key]


def _cell_strings(value, path: str, key: str) -> list:
    """A MATLAB cell array of strings (or a char matrix / string array) -> list of str."""
    if isinstance(value, str):
        return [value]
    arr = np.asarray(value)
    out = []
    if arr.ndim > 1 and 1 not in arr.shape and arr.dtype == object:
        raise DataError(f"{path}: '{key}' must be a cell vector of strings, got shape {arr.shape}")
    for item in arr.reshape(-1):
        while isinstance(item, np.ndarray) and item.dtype == object and item.size == 1:
            item = item.reshape(-1)[0]
        if isinstance(item, np.ndarray):
            if item.size == 0:
                item = ""
            elif item.dtype.kind in "US":
                item = item.reshape(-1)[0] if item.size == 1 else "".join(item.reshape(-1).tolist())
            else:
                raise DataError(f"{path}: '{key}' must be a cell array of strings, found an element {item!r}")
        if isinstance(item, bytes):
            item = item.decode("utf-8", "replace")
        if not isinstance(item, str):
            raise DataError(f"{path}: '{key}' must be a cell array of strings, found an element {item!r}")
        out.append(item.strip())
    return out


def _one_based(value, path: str, key: str, n: Optional[int] = None) -> np.ndarray:
    """A 1-based MATLAB index vector -> 0-based int64, with range checks."""
    arr = np.asarray(value)
    if arr.ndim > 2 or (arr.ndim == 2 and 1 not in arr.shape):
        raise DataError(f"{path}: '{key}' must be a vector of 1-based indices, got shape {arr.shape}")
    arr = arr.reshape(-1)
    if arr.size and arr.dtype.kind not in "iuf":
        raise DataError(f"{path}: '{key}' must hold integer indices, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise DataError(f"{path}: '{key}' must hold integer indices, found non-integer values")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 1:
        raise DataError(f"{path}: '{key}' holds index {int(arr.min())}, but MATLAB indices are 1-based (must be >= 1)")
    if n is not None and arr.size and arr.max() > n:
        raise DataError(f"{path}: '{key}' holds index {int(arr.max())} but there are only {n} entries (1-based)")
    return arr - 1


def _float_matrix(value, path: str, key: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 2 or arr.dtype.kind not in "iuf" or arr.size == 0:
        raise DataError(
            f"{path}: '{key}' must be a non-empty 2-D numeric matrix, got shape {arr.shape} dtype {arr.dtype}"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: '{key}' holds NaN or infinite values")
    return arr


# ---------------------------------------------------------------------------------------------
# att_splits.mat, sent_splits.mat, res101.mat, image_list.npz


def load_att_splits(path: str, num_images: Optional[int] = None) -> dict:
    """Read an xlsa17 ``att_splits.mat``.

    Args:
        path: the file (MATLAB v5 or v7.3).
        num_images: the number of images of the image list, when known; every
            ``*_loc`` index must then be ``<= num_images`` (1-based).

    Returns:
        ``{"att": (C, K) float64, "original_att": (C, K) float64 or None,
        "allclasses_names": [C str], "trainval_loc", "test_seen_loc",
        "test_unseen_loc": 0-based int64, "train_loc", "val_loc": 0-based or None,
        "path": path}``.

    Raises:
        DataError: missing/unreadable file, missing key, wrong shapes, an index
        0 or beyond ``num_images``.
    """
    path = str(path)
    mat = _load_mat(path, "att_splits.mat")
    names = _cell_strings(_get(mat, path, "allclasses_names"), path, "allclasses_names")
    c = len(names)
    att_kc = _float_matrix(_get(mat, path, "att"), path, "att")
    if att_kc.shape[1] != c:
        raise DataError(
            f"{path}: 'att' must be (attributes K, classes C) with C = {c} entries of 'allclasses_names', "
            f"got shape {att_kc.shape}"
        )
    out = {"path": path, "att": np.ascontiguousarray(att_kc.T), "allclasses_names": names}
    original = _get(mat, path, "original_att", required=False)
    if original is not None:
        original = _float_matrix(original, path, "original_att")
        if original.shape != att_kc.shape:
            raise DataError(f"{path}: 'original_att' has shape {original.shape} but 'att' has {att_kc.shape}")
        original = np.ascontiguousarray(original.T)
    out["original_att"] = original
    for key in SPLIT_KEYS:
        out[key] = _one_based(_get(mat, path, key), path, key, num_images)
        if out[key].size == 0:
            raise DataError(f"{path}: '{key}' is empty")
    for key in OPTIONAL_SPLIT_KEYS:
        value = _get(mat, path, key, required=False)
        out[key] = None if value is None else _one_based(value, path, key, num_images)
    return out


def load_train_val_splits(
    path: str, num_images: Optional[int] = None, trainval_loc: Optional[np.ndarray] = None
) -> dict:
    """``train_loc``/``val_loc`` (0-based) from a file of the xlsa17 family (e.g. CUB ``sent_splits.mat``).

    If ``trainval_loc`` (0-based) is given and the file has its own ``trainval_loc``,
    the two must agree, which shows the file uses the same image order.
    """
    path = str(path)
    mat = _load_mat(path, "split file")
    out = {key: _one_based(_get(mat, path, key), path, key, num_images) for key in OPTIONAL_SPLIT_KEYS}
    if trainval_loc is not None and "trainval_loc" in mat:
        theirs = _one_based(mat["trainval_loc"], path, "trainval_loc", num_images)
        if not np.array_equal(np.sort(theirs), np.sort(np.asarray(trainval_loc))):
            raise DataError(
                f"{path}: 'trainval_loc' differs from the one of att_splits.mat, so this file does not "
                "use the same image order"
            )
    return out


def load_res101(path: str, features: bool = False) -> dict:
    """Read an xlsa17 ``res101.mat``: ``image_files`` (list of str), 0-based ``labels``.

    Args:
        path: the file.
        features: also return ``features`` as ``(N, 2048)`` float32 (skipped by default).
    """
    path = str(path)
    names = ["image_files", "labels"] + (["features"] if features else [])
    mat = _load_mat(path, "res101.mat", variable_names=names)
    files = _cell_strings(_get(mat, path, "image_files"), path, "image_files")
    labels = np.asarray(_get(mat, path, "labels"))
    if labels.size != len(files):
        raise DataError(f"{path}: 'labels' has {labels.size} entries but 'image_files' has {len(files)}")
    labels = _one_based(labels, path, "labels")
    out = {"path": path, "image_files": files, "labels": labels}
    if features:
        feats = np.asarray(_get(mat, path, "features"))
        if feats.ndim != 2 or len(files) not in feats.shape:
            raise DataError(f"{path}: 'features' must be (D, {len(files)}), got shape {feats.shape}")
        out["features"] = np.ascontiguousarray((feats.T if feats.shape[1] == len(files) else feats), dtype=np.float32)
    return out


def load_image_list(path: str) -> dict:
    """Read an ``image_list.npz`` (``labels`` 0-based, ``image_files`` relative paths)."""
    path = _require_file(path, "image list")
    check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            for key in ("labels", "image_files"):
                if key not in keys:
                    raise DataError(f"{path}: missing key '{key}' (keys present: {sorted(keys)})")
            labels = np.asarray(z["labels"])
            files = np.asarray(z["image_files"])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read as .npz (corrupt or truncated?): {type(exc).__name__}: {exc}") from exc
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if files.ndim != 1 or files.dtype.kind not in "US":
        raise DataError(
            f"{path}: 'image_files' must be a 1-D string array, got shape {files.shape} dtype {files.dtype}"
        )
    if labels.shape != files.shape:
        raise DataError(f"{path}: 'labels' has {labels.size} entries but 'image_files' has {files.size}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: 'labels' must be 0-based class ids (>= 0), found {int(labels.min())}")
    files = [f.decode("utf-8") if isinstance(f, bytes) else str(f) for f in files.tolist()]
    return {"path": path, "image_files": files, "labels": labels.astype(np.int64)}


def load_images(path: str) -> dict:
    """``image_files``/``labels`` from either a ``res101.mat`` or an ``image_list.npz``."""
    path = str(path)
    if path.lower().endswith(".npz"):
        return load_image_list(path)
    return load_res101(path)


# ---------------------------------------------------------------------------------------------
# Attribute word vectors and names


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("multiarray", "scalar"),
    # numpy >= 1.16 writes arrays with pickle protocol 5 through _frombuffer
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    # Python 3 pickles with protocol <= 2 spell bytes as _codecs.encode(str, "latin1")
    ("_codecs", "encode"): ("codecs", "encode"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` limited to what pickle protocol <= 2 uses for bytes (latin-1 text)."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only admitted as encode(str, 'latin1')")
    return obj.encode("latin-1", errors)


def _numpy_global(kind: str, name: str):
    if kind == "codecs":
        return _latin1_encode
    if kind == "numpy":
        return getattr(np, name)
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return getattr(multiarray if kind == "multiarray" else numeric, name)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the globals a plain numpy array pickle refers to."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module, name):
        target = _NUMPY_GLOBALS.get((module, name))
        if target is None:
            raise DataError(
                f"{self._path}: refused to load pickle global '{short_text(module + '.' + name, 120)}'; "
                "an attribute-vector pickle "
                "may only contain a numpy array (nothing in the file was executed)"
            )
        return _numpy_global(*target)

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: refused a pickle persistent id; expected a plain numpy array")


#: Largest attribute word-vector pickle read (``{DS}_attribute.pkl``: 312 x 300 float64 is 750 KB).
MAX_VECTOR_PICKLE_BYTES = 256 << 20


def load_attribute_vectors(path: str) -> np.ndarray:
    """Read attribute word vectors ``(K, D)`` from a ``{DS}_attribute.pkl`` or ``.npy`` file.

    The pickle is read with an unpickler that admits only numpy array globals
    (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``, ``_frombuffer``); any other
    global is refused with a :class:`DataError` before anything is called. Protocol <= 2
    pickles written by Python 3 also need ``_codecs.encode(str, "latin1")``, admitted only
    in that form.

    Returns:
        ``(K, D)`` float64.
    """
    path = _require_file(path, "attribute word-vector file")
    if path.lower().endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{path}: cannot read as .npy without pickle ({type(exc).__name__}: {exc})") from exc
    else:
        check_file_size(path, MAX_VECTOR_PICKLE_BYTES, "attribute-vector pickle", setting="MAX_VECTOR_PICKLE_BYTES")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_VECTOR_PICKLE_BYTES + 1)
        try:
            scan_pickle(raw, max_depth=32)
        except PickleRefused as exc:
            raise DataError(f"{path}: not a plain numpy array pickle: {exc}; nothing was unpickled") from None
        try:
            arr = _NumpyOnlyUnpickler(io.BytesIO(raw), path).load()
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"{path}: cannot unpickle a numpy array (corrupt or truncated?): {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected a numpy array, found {type(arr).__name__}")
    if arr.ndim != 2 or arr.dtype.kind != "f" or arr.size == 0:
        raise DataError(f"{path}: expected a non-empty 2-D float array (K, D), got shape {arr.shape} dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: word vectors hold NaN or infinite values")
    return arr


_NUMBERED_LINE = re.compile(r"^\s*\d+\s+(\S.*?)\s*$")


def load_attribute_names(path: str) -> list:
    """Attribute names: CUB ``attributes.txt``, AWA2 ``predicates.txt``, SUN ``attributes.mat``, plain txt.

    Text files: when every non-empty line is ``<number><whitespace><name>`` the
    number is dropped, otherwise every line is a name.
    """
    path = _require_file(path, "attribute-name file")
    if path.lower().endswith(".mat"):
        mat = _load_mat(path, "attribute-name file")
        keys = [k for k in mat if not k.startswith("__")]
        key = "attributes" if "attributes" in mat else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise DataError(f"{path}: missing key 'attributes' (keys present: {sorted(keys)})")
        names = _cell_strings(mat[key], path, key)
    else:
        check_text_file(path, "attribute-name file")
        try:
            with open(path, "r", encoding="utf-8") as fh:
                lines = [line.strip() for line in fh]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read attribute names as UTF-8 text ({exc})") from exc
        lines = [line for line in lines if line]
        matches = [_NUMBERED_LINE.match(line) for line in lines]
        names = [m.group(1) for m in matches] if lines and all(matches) else lines
    if not names:
        raise DataError(f"{path}: no attribute names found")
    return names


# ---------------------------------------------------------------------------------------------
# Consistency and assembly


def restrict_to(loc: Optional[np.ndarray], allowed: np.ndarray) -> Optional[np.ndarray]:
    """Rows of ``loc`` that are also in ``allowed`` (order of ``loc`` kept)."""
    if loc is None:
        return None
    loc = np.asarray(loc, dtype=np.int64)
    return loc[np.isin(loc, allowed)]


def check_consistency(
    splits: dict,
    labels: np.ndarray,
    *,
    labels_path: str = "<labels>",
    w2v: Optional[np.ndarray] = None,
    w2v_path: str = "<w2v>",
    attribute_names: Optional[Sequence[str]] = None,
    names_path: str = "<names>",
) -> None:
    """Cross-file checks of xlsa17 metadata; each failure names the file and the key.

    Args:
        splits: the result of :func:`load_att_splits` (0-based; its ``path`` names the file).
        labels: 0-based image labels of the image list at ``labels_path``.
        w2v, attribute_names: optional word vectors / names, checked against K.

    Checks: labels within ``[0, C)``, every split index within ``[0, N)``, the
    three test/train splits are row-disjoint, seen (trainval) and unseen
    (test_unseen) classes are disjoint, test_seen only holds seen classes,
    ``w2v`` has K rows and there are K attribute names.
    """
    spath = splits.get("path", "<att_splits>")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    k = splits["att"].shape[1]
    _check_labels(splits, labels, spath, labels_path)
    _check_split_rows(splits, labels.shape[0], spath, labels_path)
    _check_split_classes(splits, labels, spath)
    if w2v is not None and (np.ndim(w2v) != 2 or np.shape(w2v)[0] != k):
        raise DataError(
            f"{w2v_path}: word vectors must be ({k}, D) to match {k} attributes in 'att' of {spath}, "
            f"got shape {np.shape(w2v)}"
        )
    if attribute_names is not None and len(attribute_names) != k:
        raise DataError(f"{names_path}: {len(attribute_names)} attribute names but 'att' of {spath} has {k} attributes")


def _check_labels(splits: dict, labels: np.ndarray, spath: str, labels_path: str) -> None:
    """One class name per row of ``att``, and every label a class id in ``[0, C)``."""
    c = splits["att"].shape[0]
    if len(splits["allclasses_names"]) != c:
        raise DataError(
            f"{spath}: 'allclasses_names' has {len(splits['allclasses_names'])} names but 'att' has {c} classes"
        )
    if labels.shape[0] and (labels.min() < 0 or labels.max() >= c):
        raise DataError(
            f"{labels_path}: 'labels' must be class ids in [0, {c}) ({c} classes in 'att' of {spath}), "
            f"found range [{int(labels.min())}, {int(labels.max())}]"
        )


def _check_split_rows(splits: dict, n: int, spath: str, labels_path: str) -> None:
    """Every split index within ``[0, n)``, no repeats in the main splits, and those three row-disjoint."""
    for key in SPLIT_KEYS + OPTIONAL_SPLIT_KEYS:
        loc = splits.get(key)
        if loc is None:
            continue
        if loc.size and (loc.min() < 0 or loc.max() >= n):
            raise DataError(
                f"{spath}: '{key}' holds 1-based index {int(loc.max()) + 1 if loc.max() >= n else int(loc.min()) + 1}"
                f" outside [1, {n}] ({n} images in {labels_path})"
            )
        dup = loc.size - np.unique(loc).size
        if dup and key in SPLIT_KEYS:
            raise DataError(f"{spath}: '{key}' lists {dup} image(s) more than once")
    for a, b in (
        ("trainval_loc", "test_seen_loc"),
        ("trainval_loc", "test_unseen_loc"),
        ("test_seen_loc", "test_unseen_loc"),
    ):
        both = np.intersect1d(splits[a], splits[b])
        if both.size:
            raise DataError(f"{spath}: '{a}' and '{b}' share {both.size} image(s), e.g. 1-based row {int(both[0]) + 1}")


def _check_split_classes(splits: dict, labels: np.ndarray, spath: str) -> None:
    """Seen (trainval) and unseen (test_unseen) classes are disjoint; test_seen holds only seen classes."""
    seen = np.unique(labels[splits["trainval_loc"]])
    unseen = np.unique(labels[splits["test_unseen_loc"]])
    both = np.intersect1d(seen, unseen)
    if both.size:
        names = [splits["allclasses_names"][i] for i in both[:5]]
        raise DataError(
            f"{spath}: seen and unseen classes overlap: {both.size} class(es) of 'test_unseen_loc' "
            f"(unseen) also appear in 'trainval_loc' (seen), e.g. {names}"
        )
    stray = np.setdiff1d(np.unique(labels[splits["test_seen_loc"]]), seen)
    if stray.size:
        raise DataError(
            f"{spath}: 'test_seen_loc' holds {stray.size} class(es) not in 'trainval_loc', "
            f"e.g. {[splits['allclasses_names'][i] for i in stray[:5]]}"
        )


def _dataset_dir(data_dir: str, name: str) -> str:
    data_dir = str(data_dir)
    if os.path.exists(os.path.join(data_dir, "att_splits.mat")):
        return data_dir
    for sub in (folder_name(name), name, name.upper(), name.lower()):
        cand = os.path.join(data_dir, sub)
        if os.path.exists(os.path.join(cand, "att_splits.mat")):
            return cand
    raise DataError(f"{data_dir}: no att_splits.mat there nor in a '{folder_name(name)}' sub-folder")


def _first_existing(folder: str, names: Sequence[str]) -> Optional[str]:
    for n in names:
        p = os.path.join(folder, n)
        if os.path.exists(p):
            return p
    return None


def find_xlsa17_files(data_dir: str, name: str) -> dict:
    """Locate ``att_splits.mat``, the image list, word vectors, names (and CUB's sent_splits.mat)."""
    folder = _dataset_dir(data_dir, name)
    ds = folder_name(name)
    pkl = _first_existing(folder, (f"{ds}_attribute.pkl", f"{name}_attribute.pkl", f"{ds}_attribute.npy"))
    if pkl is None:
        found = sorted(glob.glob(os.path.join(folder, "*_attribute.pkl")))
        pkl = found[0] if len(found) == 1 else None
    return {
        "att_splits": os.path.join(folder, "att_splits.mat"),
        "image_list": _first_existing(folder, ("image_list.npz", "res101.mat")),
        "attribute_vectors": pkl,
        "attribute_names": _first_existing(folder, ATTRIBUTE_NAME_FILES),
        "sent_splits": _first_existing(folder, ("sent_splits.mat",)),
        "folder": folder,
    }


def load_xlsa17_dataset(
    data_dir: str,
    name: str,
    features: FeatureSource,
    *,
    att_splits: Optional[str] = None,
    image_list: Optional[str] = None,
    attribute_vectors: Optional[str] = None,
    attribute_names: Optional[str] = None,
    sent_splits: Optional[str] = None,
    train_val: str = "trainval",
) -> ZSLData:
    """Assemble a :class:`ZSLData` from the xlsa17 metadata and a feature source.

    Args:
        data_dir: the dataset folder (holding ``att_splits.mat``) or its parent
            (holding ``CUB/``, ``SUN/``, ``AWA2/``).
        name: ``cub``, ``sun``, ``awa2`` (or another name; the sign rule of its
            :mod:`~msdn_tf.data.datasets` entry: AWA2 gets non-negative attributes, §1.4).
        features: a feature source with one row per image of the image list, in
            its order (e.g. :class:`~msdn_tf.data.hdf5.HDF5Features` of an extracted file).
        att_splits, image_list, attribute_vectors, attribute_names, sent_splits:
            explicit files, overriding what is found in the folder. The image list
            is ``image_list.npz`` or ``res101.mat``; the word vectors
            ``{DS}_attribute.pkl`` or ``.npy``; CUB's ``train_loc``/``val_loc`` come from
            ``sent_splits.mat`` when ``att_splits.mat`` lacks them.
        train_val: ``"trainval"`` (default) keeps the ``train_loc``/``val_loc`` rows
            that are in trainval (the xlsa17 files also list test_seen images there),
            ``"raw"`` keeps them as in the file, ``"none"`` drops them.

    Returns:
        A validated :class:`ZSLData`; ``att`` is ``class_attributes_for_model(att,
        nonnegative=nonnegative_att(name))``.
    """
    if train_val not in ("trainval", "raw", "none"):
        raise ValueError(f"train_val must be 'trainval', 'raw' or 'none', got {train_val!r}")
    att_splits, image_list, attribute_vectors, attribute_names, sent_splits = _xlsa17_files(
        data_dir, name, att_splits, image_list, attribute_vectors, attribute_names, sent_splits
    )
    images = load_images(image_list)
    labels = images["labels"]
    n = labels.shape[0]
    splits = load_att_splits(att_splits, num_images=n)
    if (splits["train_loc"] is None or splits["val_loc"] is None) and sent_splits and train_val != "none":
        extra = load_train_val_splits(sent_splits, num_images=n, trainval_loc=splits["trainval_loc"])
        splits["train_loc"], splits["val_loc"] = extra["train_loc"], extra["val_loc"]
    w2v = load_attribute_vectors(attribute_vectors)
    k = splits["att"].shape[1]
    names = load_attribute_names(attribute_names) if attribute_names else [f"attribute_{i:03d}" for i in range(k)]
    check_consistency(
        splits,
        labels,
        labels_path=str(image_list),
        w2v=w2v,
        w2v_path=str(attribute_vectors),
        attribute_names=names,
        names_path=str(attribute_names),
    )
    n_feat = int(features.shape[0])
    if n_feat != n:
        where = getattr(features, "path", type(features).__name__)
        raise DataError(f"{where}: the feature source has {n_feat} images but the image list {image_list} has {n}")
    train_loc, val_loc = _train_val_rows(splits, train_val)
    data = ZSLData(
        name=name.lower(),
        features=features,
        labels=labels,
        trainval_loc=splits["trainval_loc"],
        test_seen_loc=splits["test_seen_loc"],
        test_unseen_loc=splits["test_unseen_loc"],
        att=class_attributes_for_model(splits["att"], nonnegative=nonnegative_att(name)),
        w2v=w2v,
        class_names=splits["allclasses_names"],
        attribute_names=names,
        train_loc=train_loc,
        val_loc=val_loc,
        original_att=splits["original_att"],
        source=str(att_splits),
    )
    validate(data)
    return data


def _xlsa17_files(
    data_dir: str, name: str, att_splits, image_list, attribute_vectors, attribute_names, sent_splits
) -> tuple:
    """The five metadata files: each explicit one, else what :func:`find_xlsa17_files` finds.

    Raises:
        DataError: no image list or no attribute word vectors, naming the folder.
    """
    files = find_xlsa17_files(data_dir, name) if (att_splits is None or image_list is None) else {}
    att_splits = att_splits or files.get("att_splits")
    image_list = image_list or files.get("image_list")
    attribute_vectors = attribute_vectors or files.get("attribute_vectors")
    attribute_names = attribute_names or files.get("attribute_names")
    sent_splits = sent_splits or files.get("sent_splits")
    if image_list is None:
        raise DataError(f"{files.get('folder', data_dir)}: no image list (image_list.npz or res101.mat)")
    if attribute_vectors is None:
        raise DataError(f"{files.get('folder', data_dir)}: no attribute word vectors ({name.upper()}_attribute.pkl)")
    return att_splits, image_list, attribute_vectors, attribute_names, sent_splits


def _train_val_rows(splits: dict, train_val: str) -> tuple:
    """``(train_loc, val_loc)`` as ``train_val`` asks: restricted to trainval, as in the file, or none."""
    train_loc, val_loc = splits["train_loc"], splits["val_loc"]
    if train_val == "none":
        return None, None
    if train_val == "trainval":
        return restrict_to(train_loc, splits["trainval_loc"]), restrict_to(val_loc, splits["trainval_loc"])
    return train_loc, val_loc
