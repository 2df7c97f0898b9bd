"""A prepared feature cache for datasets larger than memory.

The reference feature-map HDF5 (docs/reference.md §1.1) is channel-first
``(N, 2048, 14, 14)`` float32, often gzip-compressed: AWA2 is 60 GB, and every
batch needs 50 scattered rows, each decompressed and transposed. The cache is the
same data prepared once for training:

* channel-last ``(N, R, F)`` (R = H * W regions, row-major), the layout the model reads;
* every region vector L2-normalised over the F channels (eps 1e-12). The model
  normalises every region again (§3), so this changes nothing but the rounding;
* stored as ``float16`` by default (half the size: AWA2 30 GB). After the
  normalisation every value is in [-1, 1], so float16 cannot overflow; the
  rounding error is at most 2**-12 (2.4e-4) absolute per value, and the
  re-normalised region vector differs from the float32 one by less than 5e-4
  relative (measured ~3e-4 at most on random maps, see tests/test_cache.py);
* a plain ``.npy`` file (any numpy can ``np.load(path, mmap_mode="r")`` it), with a
  JSON sidecar ``<cache>.json`` naming the source file, its size and mtime, the
  dtype and the shape, so a cache of an older or different source is detected.

The file is written in chunks of rows (memory stays bounded whatever ``N``),
to a temporary name that is renamed into place only when complete; the sidecar
is written last, so a cache without a matching sidecar is never used.

:class:`MemmapFeatures` reads batches from the cache. By default it reads each
requested row (one contiguous ``R * F`` block) with ``os.preadv`` into the output
array, in ascending row order: the reads release the GIL (tf.data can run
several at once) and the page cache is not mapped into the process, so the
resident set stays small however much of the file has been read (memory-mapped
pages count in the process RSS until the kernel reclaims them). ``mode="memmap"``
fancy-indexes an ``np.memmap`` instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional

import numpy as np

from msdn_tf.data.base import ZSLData
from msdn_tf.errors import DataError
from msdn_tf.limits import MAX_JSON_BYTES, check_hdf5_dataset

CACHE_VERSION = 1
DTYPES = ("float16", "float32")
NORM_EPS = 1e-12


def normalize_regions(x: np.ndarray) -> np.ndarray:
    """L2-normalise every region vector of ``(n, R, F)`` over ``F`` (eps 1e-12, as the model)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("nrf,nrf->nr", x, x, dtype=np.float64)).astype(np.float32)
    return x / np.maximum(norm, NORM_EPS)[..., None]


def _check_dtype(dtype) -> np.dtype:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise DataError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return np.dtype(name)


def cache_path_for(source_path: str, cache_dir: Optional[str] = None, dtype="float16") -> str:
    """Default cache file of a feature file: ``<cache_dir>/<stem>.regions_<dtype>.npy``."""
    source_path = os.path.abspath(str(source_path))
    stem = os.path.splitext(os.path.basename(source_path))[0]
    folder = cache_dir or os.path.dirname(source_path)
    return os.path.join(str(folder), f"{stem}.regions_{_check_dtype(dtype).name}.npy")


def sidecar_path(cache_path: str) -> str:
    return str(cache_path) + ".json"


def source_signature(path: str) -> dict:
    """What identifies the source file: absolute path, size and modification time."""
    st = os.stat(path)
    return {"path": os.path.abspath(str(path)), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _npy_layout(path: str) -> tuple:
    """``(shape, dtype, data_offset)`` of a ``.npy`` file, with clear errors."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: feature cache not found") from exc
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from exc
    if fortran or len(shape) != 3:
        raise DataError(
            f"{path}: the cache must be a C-ordered (N, R, F) array, got shape {shape}"
            f"{' (Fortran order)' if fortran else ''}"
        )
    if dtype.name not in DTYPES:
        raise DataError(f"{path}: the cache dtype must be float16 or float32, got {dtype}")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    size = os.path.getsize(path)
    if size != expected:
        raise DataError(
            f"{path}: the file has {size} bytes but its header {shape} {dtype} needs {expected} "
            "(truncated?); delete it and prepare the cache again"
        )
    return tuple(int(s) for s in shape), dtype, offset


class MemmapFeatures:
    """A :class:`~msdn_tf.data.base.FeatureSource` over a prepared ``(N, R, F)`` ``.npy`` cache.

    Args:
        path: the ``.npy`` file (float16 or float32, C order).
        mode: ``"pread"`` (default: one ``os.preadv`` per row, in ascending row
            order, straight into the output array) or ``"memmap"`` (fancy indexing
            of an ``np.memmap`` with the sorted indices).

    ``read(indices)`` returns float32 in the order of ``indices``;
    ``read_native(indices)`` returns the stored dtype (the tf.data pipeline
    casts in TensorFlow, which moves half the bytes through Python for float16).
    The object can be pickled and used after a fork (the file is re-opened).
    """

    def __init__(self, path: str, mode: str = "pread"):
        if mode not in ("pread", "memmap"):
            raise ValueError(f"mode must be 'pread' or 'memmap', got {mode!r}")
        self.path = str(path)
        self.mode = mode
        self.shape, self.dtype, self.offset = _npy_layout(self.path)
        self.row_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        self._fd = None
        self._map = None
        self._pid = None

    def _reopen_if_forked(self):
        if self._pid != os.getpid():
            self._fd, self._map, self._pid = None, None, os.getpid()

    def _file(self) -> int:
        self._reopen_if_forked()
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"{self.path}: cannot open the feature cache ({exc})") from exc
        return self._fd

    @property
    def memmap(self) -> np.memmap:
        """The whole cache as a read-only ``np.memmap`` (nothing is read until indexed)."""
        self._reopen_if_forked()
        if self._map is None:
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return self._map

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise DataError(
                f"{self.path}: row indices must be in [0, {self.shape[0]}), got range [{idx.min()}, {idx.max()}]"
            )
        return idx

    def read_native(self, indices, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows ``indices`` in the stored dtype; ``out``: an array to fill (reused buffers avoid page faults)."""
        idx = self._indices(indices)
        shape = (idx.size,) + self.shape[1:]
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.dtype} array of shape {shape}")
        if idx.size == 0:
            return out
        order = np.argsort(idx, kind="stable")  # ascending file offsets: sequential-ish disk access
        if self.mode == "memmap":
            out[order] = self.memmap[idx[order]]
            return out
        flat = out.reshape(idx.size, self.row_bytes // self.dtype.itemsize)
        fd = self._file()
        rb = self.row_bytes
        for j in order:
            buf = memoryview(flat[j]).cast("B")
            pos, off = 0, self.offset + int(idx[j]) * rb
            while pos < rb:
                got = os.preadv(fd, [buf[pos:]], off + pos)
                if got <= 0:
                    raise DataError(f"{self.path}: short read at row {int(idx[j])} (file truncated?)")
                pos += got
        return out

    def read(self, indices) -> np.ndarray:
        return self.read_native(indices).astype(np.float32, copy=False)

    def close(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._map = None, None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_fd=None, _map=None, _pid=None)
        return state

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- staleness
def read_sidecar(cache_path: str) -> Optional[dict]:
    """The cache's metadata, or ``None`` when absent, unreadable or over ``MAX_JSON_BYTES`` (then stale)."""
    try:
        if os.path.getsize(sidecar_path(cache_path)) > MAX_JSON_BYTES:
            return None
        with open(sidecar_path(cache_path)) as fh:
            return json.load(fh)
    except (OSError, ValueError, RecursionError):
        return None


def cache_status(cache_path: str, source_path: Optional[str] = None, dtype="float16") -> tuple:
    """``(usable, reason)``: is ``cache_path`` a complete cache of ``source_path`` as it is now?"""
    cache_path = str(cache_path)
    if not os.path.exists(cache_path):
        return False, "no cache file"
    meta = read_sidecar(cache_path)
    if meta is None:
        return False, f"no readable sidecar {sidecar_path(cache_path)} (incomplete or foreign cache)"
    if meta.get("version") != CACHE_VERSION:
        return False, f"cache format version {meta.get('version')} != {CACHE_VERSION}"
    try:
        shape, dt, _ = _npy_layout(cache_path)
    except DataError as exc:
        return False, str(exc)
    if list(shape) != list(meta.get("shape", [])) or dt.name != meta.get("dtype"):
        return False, f"the sidecar says {meta.get('shape')} {meta.get('dtype')}, the file is {list(shape)} {dt.name}"
    if dtype is not None and dt.name != _check_dtype(dtype).name:
        return False, f"the cache is {dt.name}, {np.dtype(dtype).name} was asked for"
    if source_path is not None:
        if not os.path.exists(source_path):
            return False, f"the source {source_path} does not exist"
        now = source_signature(source_path)
        was = meta.get("source", {})
        for key in ("size", "mtime_ns"):
            if was.get(key) != now[key]:
                return False, (
                    f"stale: the source {source_path} changed since the cache was made "
                    f"({key} {was.get(key)} -> {now[key]})"
                )
    return True, "up to date"


# --------------------------------------------------------------------------- writing
def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, file=sys.stderr)


def write_cache(
    out_path: str,
    shape: tuple,
    read_chunk: Callable[[int, int], np.ndarray],
    *,
    dtype="float16",
    chunk_rows: int = 256,
    source: Optional[dict] = None,
    normalize: bool = True,
    progress: bool = True,
    extra: Optional[dict] = None,
) -> str:
    """Write a ``(N, R, F)`` cache from ``read_chunk(start, stop) -> (stop-start, R, F)`` rows.

    Rows are normalised per region (unless ``normalize=False``: the chunks are then
    stored as given), cast to ``dtype`` and appended to ``out_path + ".tmp-<pid>"``;
    only a complete file is renamed to ``out_path``, then the sidecar is written.
    On any exception the temporary file is removed and an existing cache is left as it was.

    Returns:
        ``out_path``.
    """
    dt = _check_dtype(dtype)
    n, r, f = (int(s) for s in shape)
    out_path = str(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    side = sidecar_path(out_path)
    bar = _progress(n, f"cache {os.path.basename(out_path)}", progress)
    started = time.time()
    try:
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_2_0(
                fh, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": (n, r, f)}
            )
            for start in range(0, n, chunk_rows):
                stop = min(n, start + chunk_rows)
                x = _checked_chunk(read_chunk, start, stop, (r, f), normalize, source)
                fh.write(np.ascontiguousarray(x, dtype=dt).tobytes())
                if bar is not None:
                    bar.update(stop - start)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(side):
            os.remove(side)  # the old sidecar must not vouch for the new file
        os.replace(tmp, out_path)
        meta = {
            "version": CACHE_VERSION,
            "shape": [n, r, f],
            "dtype": dt.name,
            "layout": "channel-last (N, R, F)",
            "normalized": bool(normalize),
            "norm_eps": NORM_EPS,
            "source": source or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - started, 2),
            **(extra or {}),
        }
        _write_sidecar(side, meta)
    except OSError as exc:
        if exc.filename is None:  # e.g. ENOSPC from write/fsync: name the file being written
            raise OSError(exc.errno, exc.strerror or str(exc), tmp) from exc
        raise
    finally:
        if bar is not None:
            bar.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def _checked_chunk(
    read_chunk, start: int, stop: int, row_shape: tuple, normalize: bool, source: Optional[dict]
) -> np.ndarray:
    """Rows ``start:stop`` from ``read_chunk``: shape checked, normalised per region if asked, all finite."""
    x = np.asarray(read_chunk(start, stop))
    if x.shape != (stop - start,) + tuple(row_shape):
        raise DataError(f"rows {start}:{stop} have shape {x.shape}, expected {(stop - start,) + tuple(row_shape)}")
    if normalize:
        x = normalize_regions(x)
    finite = np.isfinite(x.reshape(stop - start, -1)).all(axis=1)
    if not finite.all():
        rows = start + np.flatnonzero(~finite)
        where = (source or {}).get("path", "the source")
        raise DataError(
            f"{where}: feature row(s) {rows[:10].tolist()}"
            f"{' ...' if rows.size > 10 else ''} hold NaN or infinite values; "
            "fix or drop these images (no cache was written)"
        )
    return x


def _write_sidecar(side: str, meta: dict) -> None:
    """Write the JSON sidecar through a temporary file renamed into place."""
    side_tmp = f"{side}.tmp-{os.getpid()}"
    with open(side_tmp, "w") as fh:
        json.dump(meta, fh, indent=2)
    os.replace(side_tmp, side)


def _hdf5_reader(path: str, key: str = "feature_map"):
    """``(shape (N, R, F), read_chunk)`` of a channel-first ``(N, F, H, W)`` HDF5 dataset."""
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open as HDF5 ({exc})") from exc
    if key not in fh:
        fh.close()
        raise DataError(f"{path}: no key '{key}' (N, channels, H, W)")
    ds = fh[key]
    if ds.ndim != 4:
        fh.close()
        raise DataError(f"{path}: '{key}' must be (N, channels, H, W), got shape {ds.shape}")
    n, f, h, w = (int(s) for s in ds.shape)
    done = int(fh.attrs.get("done_count", n)) if "job_fingerprint" in fh.attrs else n
    if done < n:
        fh.close()
        raise DataError(f"{path}: an incomplete extraction ({done} of {n} rows); finish it with msdn_tf.extract")
    try:
        check_hdf5_dataset(ds, path)  # a never-written dataset would fill the disk with its fill value
    except DataError:
        fh.close()
        raise

    def read_chunk(start, stop):
        try:
            x = np.asarray(ds[start:stop], dtype=np.float32)  # contiguous slice: one read per chunk
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{path}: failed to read rows {start}:{stop} of '{key}' ({exc}); corrupt or truncated file?"
            ) from exc
        return x.reshape(stop - start, f, h * w).transpose(0, 2, 1)

    return fh, (n, h * w, f), read_chunk


def build_cache_from_hdf5(
    source_path: str,
    cache_path: Optional[str] = None,
    *,
    dtype="float16",
    key: str = "feature_map",
    chunk_rows: int = 64,
    progress: bool = True,
) -> str:
    """Convert a §1.1 feature-map HDF5 into a normalised channel-last cache (see module docstring)."""
    source_path = str(source_path)
    if not os.path.isfile(source_path):
        raise DataError(f"{source_path}: feature file not found")
    cache_path = cache_path or cache_path_for(source_path, dtype=dtype)
    sig = source_signature(source_path)
    fh, shape, read_chunk = _hdf5_reader(source_path, key)
    try:
        return write_cache(
            cache_path,
            shape,
            read_chunk,
            dtype=dtype,
            chunk_rows=chunk_rows,
            source={**sig, "key": key},
            progress=progress,
        )
    finally:
        fh.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user
    return True


def remove_stale_temporaries(cache_path: str, log: Callable[[str], None]) -> list:
    """Remove ``<cache>.tmp-<pid>`` files (and sidecar temporaries) left by a killed build.

    A build killed before its rename leaves a temporary file as large as the cache
    (30 GB for AWA2). Each one whose process is dead is reported and removed; one
    whose process still runs (another build right now) is reported and left alone.
    Returns the removed paths.
    """
    import glob

    removed = []
    for tmp in sorted(
        glob.glob(glob.escape(str(cache_path)) + ".tmp-*") + glob.glob(glob.escape(sidecar_path(cache_path)) + ".tmp-*")
    ):
        tail = tmp.rsplit(".tmp-", 1)[1]
        if not tail.isdigit():
            continue
        pid = int(tail)
        size = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if pid != os.getpid() and _pid_alive(pid):
            log(f"msdn-tf: {tmp} ({size / 1e9:.2f} GB) is being written by running process {pid}; left alone")
            continue
        try:
            os.remove(tmp)
        except FileNotFoundError:
            continue
        log(
            f"msdn-tf: removed {tmp} ({size / 1e9:.2f} GB), left by process {pid} that was killed while "
            "building the cache"
        )
        removed.append(tmp)
    return removed


def ensure_cache(
    source_path: str,
    cache_dir: Optional[str] = None,
    dtype="float16",
    *,
    rebuild: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = None,
    mode: str = "pread",
) -> MemmapFeatures:
    """The cache of ``source_path`` as a :class:`MemmapFeatures`, (re)built when absent or stale."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    path = cache_path_for(source_path, cache_dir, dtype)
    remove_stale_temporaries(path, log)
    ok, reason = cache_status(path, source_path, dtype)
    if rebuild or not ok:
        log(f"msdn-tf: preparing feature cache {path} ({'rebuild requested' if rebuild else reason})")
        build_cache_from_hdf5(source_path, path, dtype=dtype, progress=progress)
    return MemmapFeatures(path, mode=mode)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def use_cache(data: ZSLData, source_path, config, log=_log) -> ZSLData:
    """Swap ``data.features`` for the prepared cache of ``source_path`` when ``data.cache`` is on.

    An HDF5 source gets a cache built (or rebuilt when stale) on first use; a
    ``.npy`` feature file already is a cache and is read as it is.
    """
    if str(source_path).lower().endswith(".npy") or not config.data.cache:
        return data
    cached = ensure_cache(str(source_path), config.data.cache_dir, config.data.cache_dtype, log=log)
    if tuple(cached.shape) != tuple(data.features.shape):
        raise DataError(
            f"{cached.path}: the cache holds {cached.shape} but {source_path} has "
            f"{tuple(data.features.shape)}; delete the cache"
        )
    data.features = cached
    return data
