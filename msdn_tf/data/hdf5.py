"""Reader for the feature-map HDF5 layout (docs/reference.md §1.1).

Keys: ``feature_map`` (N, F, H, W) channel-first float, ``labels`` (N,),
``trainval_loc``/``test_seen_loc``/``test_unseen_loc`` (0-based), ``att`` (C, K),
``original_att`` (C, K), ``w2v_att`` (K, D). Optional keys written by msdn-tf:
``allclasses_names`` (C,), ``attribute_names`` (K,), ``train_loc``/``val_loc``.

The feature maps stay on disk; :class:`HDF5Features` reads the rows a batch needs.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from msdn_tf.data.base import ZSLData, check_feature_dtype, class_attributes_for_model
from msdn_tf.errors import DataError
from msdn_tf.limits import check_hdf5_dataset

REQUIRED_KEYS = ("feature_map", "labels", "trainval_loc", "test_seen_loc", "test_unseen_loc", "att", "w2v_att")


def _h5py():
    import h5py

    return h5py


class HDF5Features:
    """Feature maps read on demand from an HDF5 ``feature_map`` dataset.

    Args:
        path: the HDF5 file.
        key: dataset name, ``feature_map`` by default; its shape is (N, F, H, W).

    The file handle is opened lazily and re-opened after a fork, so the object
    can be used from tf.data worker threads and child processes.
    """

    def __init__(self, path: str, key: str = "feature_map"):
        self.path = str(path)
        self.key = key
        self._file = None
        self._pid = None
        ds = self._dataset()
        if ds.ndim != 4:
            raise DataError(f"{self.path}: '{key}' must be (N, channels, H, W), got shape {ds.shape}")
        check_feature_dtype(ds.dtype, f"{self.path}: '{key}'")
        check_hdf5_dataset(ds, self.path)  # never-written (fill value) or over-compressed maps are refused
        n, f, h, w = ds.shape
        self.map_shape = (int(h), int(w))
        self.shape = (int(n), int(h) * int(w), int(f))

    def _dataset(self):
        if self._file is None or self._pid != os.getpid():
            h5py = _h5py()
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise DataError(f"{self.path}: cannot open as HDF5 ({exc})") from exc
            self._pid = os.getpid()
        try:
            return self._file[self.key]
        except KeyError as exc:
            raise DataError(f"{self.path}: no key '{self.key}'") from exc

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        ds = self._dataset()
        n, f = indices.size, self.shape[2]
        out = np.empty((n, f, self.shape[1]), dtype=np.float32)
        try:
            # One read per row: h5py's fancy indexing is ~70x slower for scattered rows.
            for i, row in enumerate(indices):
                out[i] = ds[int(row)].reshape(f, -1)
        except (OSError, ValueError, IndexError) as exc:
            raise DataError(f"{self.path}: failed to read rows of '{self.key}' ({exc})") from exc
        return np.ascontiguousarray(out.transpose(0, 2, 1))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state


def _read_key(f, path: str, key: str, required: bool = True) -> Optional[np.ndarray]:
    if key not in f:
        if required:
            raise DataError(f"{path}: missing key '{key}'; a feature-map file needs {', '.join(REQUIRED_KEYS)}")
        return None
    check_hdf5_dataset(f[key], path)  # declared size against stored bytes, before reading it whole
    return np.asarray(f[key][()])


def _strings(values) -> list:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]


def _read_feature_map_keys(path: str) -> tuple:
    """``(required arrays, optional arrays)`` of a §1.1 file; ``feature_map`` stays on disk, only checked."""
    if not os.path.exists(path):
        raise DataError(f"{path}: feature-map file not found")
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with f:
        arrays = {key: _read_key(f, path, key) for key in REQUIRED_KEYS if key != "feature_map"}
        if "feature_map" not in f:
            raise DataError(f"{path}: missing key 'feature_map' (N, 2048, H, W)")
        optional = {
            key: _read_key(f, path, key, required=False)
            for key in ("original_att", "train_loc", "val_loc", "allclasses_names", "attribute_names")
        }
    return arrays, optional


def _names(optional: dict, class_names, attribute_names, c: int, k: int) -> tuple:
    """Class and attribute names: the file's, else the given ones, else ``class_000``/``attribute_000``..."""
    if optional["allclasses_names"] is not None:
        class_names = _strings(optional["allclasses_names"])
    if optional["attribute_names"] is not None:
        attribute_names = _strings(optional["attribute_names"])
    if class_names is None:
        class_names = [f"class_{i:03d}" for i in range(c)]
    if attribute_names is None:
        attribute_names = [f"attribute_{i:03d}" for i in range(k)]
    return class_names, attribute_names


def load_feature_map_hdf5(
    path: str,
    name: str = "custom",
    nonnegative_att: bool = False,
    class_names=None,
    attribute_names=None,
) -> ZSLData:
    """Read a feature-map HDF5 file (docs/reference.md §1.1) into a :class:`ZSLData`.

    Args:
        path: the HDF5 file.
        name: dataset name recorded in the result.
        nonnegative_att: clip negative class attributes to 0 before the row
            normalisation (the reference does so for AWA2, §1.4).
        class_names, attribute_names: names to use when the file has none.

    Returns:
        A validated :class:`ZSLData` whose features stay on disk.

    Raises:
        DataError: the file is missing, unreadable, lacks a key or is inconsistent.
    """
    path = str(path)
    arrays, optional = _read_feature_map_keys(path)
    att_raw = arrays["att"]
    c, k = att_raw.shape if att_raw.ndim == 2 else (None, None)
    if c is None:
        raise DataError(f"{path}: 'att' must be (classes, attributes), got shape {att_raw.shape}")
    class_names, attribute_names = _names(optional, class_names, attribute_names, c, k)
    return ZSLData(
        name=name,
        features=HDF5Features(path),
        labels=arrays["labels"],
        trainval_loc=arrays["trainval_loc"],
        test_seen_loc=arrays["test_seen_loc"],
        test_unseen_loc=arrays["test_unseen_loc"],
        att=class_attributes_for_model(att_raw, nonnegative=nonnegative_att),
        w2v=arrays["w2v_att"],
        class_names=class_names,
        attribute_names=attribute_names,
        train_loc=optional["train_loc"],
        val_loc=optional["val_loc"],
        original_att=optional["original_att"],
        source=path,
    )


def write_feature_map_hdf5(
    path: str,
    *,
    feature_map: np.ndarray,
    labels,
    trainval_loc,
    test_seen_loc,
    test_unseen_loc,
    att,
    w2v_att,
    original_att=None,
    class_names=None,
    attribute_names=None,
    train_loc=None,
    val_loc=None,
    compression=None,
) -> str:
    """Write the §1.1 layout atomically (a temporary file renamed into place).

    Args:
        path: destination file.
        feature_map: ``(N, F, H, W)`` channel-first maps.
        labels, *_loc: 0-based labels and row indices.
        att: ``(C, K)`` class attributes; ``w2v_att``: ``(K, D)`` word vectors.
        original_att, class_names, attribute_names, train_loc, val_loc: optional extras.
        compression: ``None`` or ``"gzip"``.

    Returns:
        ``path``.
    """
    h5py = _h5py()
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(
                "feature_map",
                data=np.asarray(feature_map, dtype=np.float32),
                compression=compression,
                chunks=(1,) + tuple(np.shape(feature_map)[1:]),
            )
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            for key, value in (
                ("trainval_loc", trainval_loc),
                ("test_seen_loc", test_seen_loc),
                ("test_unseen_loc", test_unseen_loc),
                ("train_loc", train_loc),
                ("val_loc", val_loc),
            ):
                if value is not None:
                    f.create_dataset(key, data=np.asarray(value, dtype=np.int64))
            f.create_dataset("att", data=np.asarray(att, dtype=np.float64))
            f.create_dataset(
                "original_att", data=np.asarray(att if original_att is None else original_att, dtype=np.float64)
            )
            f.create_dataset("w2v_att", data=np.asarray(w2v_att, dtype=np.float64))
            if class_names is not None:
                f.create_dataset("allclasses_names", data=np.asarray([s.encode() for s in class_names]))
            if attribute_names is not None:
                f.create_dataset("attribute_names", data=np.asarray([s.encode() for s in attribute_names]))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
