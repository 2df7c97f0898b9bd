"""Feature-map extraction into the feature-map HDF5 layout (docs/reference.md §1.1): the library.

The command is ``python -m msdn_tf.extract`` (:mod:`msdn_tf.cli.extract`); this module holds
the work behind it: reading an image list, building the §1.1 metadata, batching images
through a backbone (:mod:`msdn_tf.backbones.keras_resnet` or
:mod:`msdn_tf.backbones.torchvision_resnet`) and writing the rows resumably.

``LIST`` is an xlsa17 ``res101.mat``, an ``image_list.npz`` or a text/CSV file of
image paths relative to ``--images-root`` (CSV: first column the path, an optional
second column a 0-based label). The output rows follow the order of the list.

For training, write the file next to the xlsa17 metadata as
``DIR/features_resnet101_448.hdf5`` (the default ``data.feature_file``; layout (b) of
docs/data.md) and run ``python -m msdn_tf.train --dataset cub --data-dir DIR``.

Two backbones (``--backbone``):

* ``torchvision_resnet101`` (default; **the paper's features**): the reference pipeline
  of TransZero/MSDN. Each image is decoded with Pillow and ``convert("RGB")``, resized
  with torchvision's ``Resize(448)`` rule and Pillow's bilinear resampling, centre
  cropped, ``/255`` and ImageNet mean/std -- bit-exact in numpy
  (:mod:`msdn_tf.backbones.preprocessing`) -- then run through the torchvision-layout
  ResNet-101 trunk in Keras (:mod:`msdn_tf.backbones.torchvision_resnet`) with weights
  from ``--weights FILE.pth``: torchvision's ``resnet101-63fe2227.pth`` (ImageNet V1, what
  the reference used) or a released MSDN checkpoint (its ``resnet101.*`` tensors). No
  torch needed.
* ``keras_resnet101``: ``keras.applications.ResNet101(include_top=False)`` (stride in the
  first 1x1 convolution, caffe weights) with TF decoding, antialiased bilinear resize,
  centre crop and ``keras.applications.resnet.preprocess_input``. **Not the reference
  features**: results will not match the paper exactly.

Both store layer4 after the final ReLU channel-first as ``feature_map``
``(N, 2048, 14, 14)`` float32 for 448-pixel inputs.

The run is resumable and crash-safe: rows are written to ``OUT.partial`` (the
``feature_map`` dataset is preallocated; the attribute ``done_count`` is flushed
after every batch). Re-running the same job continues at the first row not
done. Only a complete file, with the metadata keys added, is renamed to ``OUT``
(atomically), so a killed run never leaves a partial ``OUT``. With the Keras
backbone and more than one visible GPU the batches are split over them with
``tf.distribute.MirroredStrategy``; the torchvision path decodes and preprocesses
with a small thread pool, one batch ahead, and runs the network compiled
(``predict_on_batch``) on the default device.

Example::

    from msdn_tf.data.extraction import extract_features, read_image_list

    files, labels = read_image_list("image_list.txt")
    extract_features(files, "features_resnet101_448.hdf5", images_root="images/",
                     weights="resnet101-63fe2227.pth", preprocessing="torchvision")

Reference: Chen et al., "MSDN: Mutually Semantic Distillation Network for Zero-Shot
Learning", CVPR 2022, §4 (ResNet-101 feature maps of 448x448 images).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from msdn_tf.backbones.keras_resnet import build_backbone, call_backbone, load_image
from msdn_tf.backbones.torchvision_resnet import TORCHVISION_WEIGHTS_HINT, build_torchvision_backbone
from msdn_tf.errors import DataError, MSDNError
from msdn_tf.limits import check_text_file

#: ``--backbone`` choices -> what they compute.
BACKBONES = {
    "torchvision_resnet101": "torchvision ResNet-101 trunk + PIL-exact reference preprocessing (the paper's features)",
    "keras_resnet101": "keras.applications.ResNet101 + caffe preprocessing (not the paper's features)",
}

PARTIAL_SUFFIX = ".partial"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Image lists


def read_image_list(path: str) -> tuple:
    """Image paths (as stored) and 0-based labels (or ``None``) from a list file.

    Accepts ``res101.mat``, ``image_list.npz``, or a ``.txt``/``.csv`` file: one path
    per line (CSV: first column the path, an optional integer second column the
    0-based label; a header row is skipped).
    """
    from msdn_tf.data import xlsa17

    path = str(path)
    low = path.lower()
    if low.endswith(".mat") or low.endswith(".npz"):
        info = xlsa17.load_images(path)
        return list(info["image_files"]), np.asarray(info["labels"], dtype=np.int64)
    if not os.path.exists(path):
        raise DataError(f"{path}: image list not found")
    check_text_file(path, "image list")
    try:
        with open(path, "r", encoding="utf-8", newline="") as fh:
            if low.endswith(".csv"):
                rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
            else:
                rows = [[line.rstrip("\r\n")] for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read image list ({exc})") from exc

    def is_int(s: str) -> bool:
        try:
            int(s.strip())
            return True
        except ValueError:
            return False

    if (
        rows
        and low.endswith(".csv")
        and rows[0][0].strip().lower() in ("path", "image", "file", "image_file", "image_files", "filename")
    ):
        rows = rows[1:]
    files = [r[0].strip() for r in rows]
    labels = None
    if rows and all(len(r) > 1 and is_int(r[1]) for r in rows):
        labels = np.asarray([int(r[1]) for r in rows], dtype=np.int64)
        if labels.min() < 0:
            raise DataError(f"{path}: labels (second column) must be 0-based class ids, found {labels.min()}")
    if not files:
        raise DataError(f"{path}: the image list is empty")
    return files, labels


def resolve_image_paths(images_root: Optional[str], files: Sequence[str]) -> list:
    """Map listed image paths to files on disk.

    A listed path is tried as given (if absolute), then under ``images_root``; if
    that fails, leading components are dropped one at a time (xlsa17's
    ``res101.mat`` stores absolute paths of the authors' machines). The number of
    dropped components that worked is tried first for the following images.

    Raises:
        DataError: naming the first missing images.
    """
    out, missing = [], []
    skip_hint = 0
    for f in files:
        f = str(f)
        if os.path.isabs(f) and os.path.isfile(f):
            out.append(f)
            continue
        if images_root is None:
            if os.path.isfile(f):
                out.append(f)
            else:
                missing.append(f)
            continue
        parts = [p for p in f.replace("\\", "/").split("/") if p not in ("", ".")]
        tries = [skip_hint] + [k for k in range(len(parts)) if k != skip_hint]
        for k in tries:
            if k >= len(parts):
                continue
            cand = os.path.join(images_root, *parts[k:])
            if os.path.isfile(cand):
                out.append(cand)
                skip_hint = k
                break
        else:
            missing.append(f)
    if missing:
        where = f" under {images_root}" if images_root else ""
        raise DataError(f"{len(missing)} image(s) not found{where}, e.g. {missing[:5]}")
    return out


# ---------------------------------------------------------------------------------------------
# Metadata for a complete §1.1 file


def build_metadata(
    labels: Optional[np.ndarray],
    num_images: int,
    att_splits: Optional[str] = None,
    attributes_pkl: Optional[str] = None,
    sent_splits: Optional[str] = None,
    attribute_names: Optional[str] = None,
) -> dict:
    """The non-feature keys of a §1.1 file, checked for consistency before extraction.

    ``train_loc``/``val_loc`` (from ``att_splits.mat`` or CUB's ``sent_splits.mat``)
    are restricted to trainval rows, as :func:`msdn_tf.data.xlsa17.load_xlsa17_dataset`
    does by default.
    """
    from msdn_tf.data import xlsa17

    meta = {}
    if labels is not None:
        meta["labels"] = np.asarray(labels, dtype=np.int64)
    if att_splits is None:
        if attributes_pkl is not None:
            meta["w2v_att"] = xlsa17.load_attribute_vectors(attributes_pkl)
        return meta
    if labels is None:
        raise DataError(f"{att_splits}: the image list has no labels, so the splits cannot be stored")
    splits = xlsa17.load_att_splits(att_splits, num_images=num_images)
    if (splits["train_loc"] is None or splits["val_loc"] is None) and sent_splits:
        extra = xlsa17.load_train_val_splits(sent_splits, num_images=num_images, trainval_loc=splits["trainval_loc"])
        splits.update(extra)
    w2v = xlsa17.load_attribute_vectors(attributes_pkl) if attributes_pkl else None
    names = xlsa17.load_attribute_names(attribute_names) if attribute_names else None
    xlsa17.check_consistency(
        splits,
        labels,
        labels_path="image list",
        w2v=w2v,
        w2v_path=str(attributes_pkl),
        attribute_names=names,
        names_path=str(attribute_names),
    )
    for key in xlsa17.SPLIT_KEYS:
        meta[key] = splits[key]
    for key in xlsa17.OPTIONAL_SPLIT_KEYS:
        if splits[key] is not None:
            meta[key] = xlsa17.restrict_to(splits[key], splits["trainval_loc"])
    meta["att"] = splits["att"]
    meta["original_att"] = splits["original_att"] if splits["original_att"] is not None else splits["att"]
    if w2v is not None:
        meta["w2v_att"] = w2v
    meta["allclasses_names"] = [s for s in splits["allclasses_names"]]
    if names is not None:
        meta["attribute_names"] = names
    return meta


def write_metadata(f, meta: dict) -> None:
    """Write the §1.1 metadata keys into the open HDF5 file ``f``, replacing existing ones."""
    for key, value in meta.items():
        if key in f:
            del f[key]
        if key in ("allclasses_names", "attribute_names"):
            f.create_dataset(key, data=np.asarray([str(s).encode("utf-8") for s in value]))
        elif key.endswith("_loc") or key == "labels":
            f.create_dataset(key, data=np.asarray(value, dtype=np.int64))
        else:
            f.create_dataset(key, data=np.asarray(value, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# Input pipelines and batches


def make_dataset(paths: Sequence[str], start: int, image_size: int, batch_size: int):
    """tf.data pipeline of ``(row_index, preprocessed_image_batch)`` for rows ``start..N-1``."""
    import keras
    import tensorflow as tf

    idx = np.arange(start, len(paths), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((idx, np.asarray(list(paths[start:]), dtype=object).astype(str)))
    ds = ds.map(lambda i, p: (i, load_image(p, image_size)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda i, x: (i, keras.applications.resnet.preprocess_input(x)))
    return ds.prefetch(2)


def _bad_image_error(paths: Sequence[str], lo: int, hi: int, image_size: int, exc: Exception) -> DataError:
    """Find which image of rows ``lo..hi-1`` cannot be read and name it."""
    import tensorflow as tf

    for p in paths[lo:hi]:
        try:
            load_image(tf.constant(p), image_size)
        except (tf.errors.OpError, ValueError) as err:
            msg = getattr(err, "message", str(err)).strip().splitlines()[0]
            return DataError(f"{p}: cannot read or decode the image ({msg})")
    msg = getattr(exc, "message", str(exc)).strip().splitlines()[0]
    return DataError(f"cannot read or decode one of the images {list(paths[lo:hi])} ({msg})")


def _to_numpy(value) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(value))


def _torchvision_batches(backbone, paths, start, batch_size, image_size):
    """Yield ``(row_indices, features (b, h, w, c))``: PIL decoding + the reference preprocessing.

    Images are decoded and preprocessed in numpy (:mod:`msdn_tf.backbones.preprocessing`,
    bit-exact to torchvision + Pillow 4.3-12.x) by a small thread pool, one batch ahead.
    A bad image raises :class:`DataError` naming the file.
    """
    from concurrent.futures import ThreadPoolExecutor

    import keras

    from msdn_tf.backbones.preprocessing import load_and_preprocess

    n = len(paths)
    starts = list(range(start, n, batch_size))

    def load(lo):
        hi = min(lo + batch_size, n)
        return lo, np.stack([load_and_preprocess(p, image_size) for p in paths[lo:hi]])

    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(load, lo) for lo in starts[:2]]
        nxt = 2
        while pending:
            lo, x = pending.pop(0).result()
            if nxt < len(starts):
                pending.append(pool.submit(load, starts[nxt]))
                nxt += 1
            if isinstance(backbone, keras.Model):
                feats = _to_numpy(backbone.predict_on_batch(x))  # compiled: ~5x faster than eager on CPU
            else:
                feats = _to_numpy(call_backbone(backbone, x))
            if not np.all(np.isfinite(feats)):
                raise MSDNError(
                    f"the backbone returned NaN or infinite values for images {list(paths[lo : lo + len(x)])}"
                )
            yield np.arange(lo, lo + len(x), dtype=np.int64), feats


def _batches(backbone, ds, paths, start, batch_size, image_size, strategy=None):
    """Yield ``(row_indices, features (b, h, w, c))`` in row order."""
    import tensorflow as tf

    n = len(paths)
    if strategy is not None:
        dist_ds = strategy.experimental_distribute_dataset(ds)

        @tf.function
        def step(i, x):
            return strategy.run(lambda i_, x_: (i_, backbone(x_, training=False)), args=(i, x))

        iterator = iter(dist_ds)
    else:
        iterator = iter(ds)
    pos = start
    while pos < n:
        try:
            i_b, x_b = next(iterator)
        except StopIteration:
            break
        except tf.errors.OpError as exc:
            raise _bad_image_error(paths, pos, min(pos + batch_size, n), image_size, exc) from exc
        if strategy is not None:
            i_loc, f_loc = step(i_b, x_b)
            idx = np.concatenate([_to_numpy(v) for v in strategy.experimental_local_results(i_loc)])
            feats = np.concatenate([_to_numpy(v) for v in strategy.experimental_local_results(f_loc)])
            order = np.argsort(idx, kind="stable")
            idx, feats = idx[order], feats[order]
        else:
            idx = _to_numpy(i_b)
            feats = _to_numpy(call_backbone(backbone, x_b))
        if feats.ndim != 4 or feats.shape[0] != idx.shape[0]:
            raise MSDNError(
                f"the backbone must return (batch, h, w, channels); got {feats.shape} for a batch "
                f"of {idx.shape[0]} images"
            )
        if idx.size and (idx[0] != pos or np.any(np.diff(idx) != 1)):
            raise MSDNError(f"internal error: expected rows starting at {pos}, got {idx[:5]}...")
        pos += idx.size
        yield idx, feats


# ---------------------------------------------------------------------------------------------
# Resumable writer


def _fingerprint(paths: Sequence[str], image_size: int, backbone_id: str) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"v": FORMAT_VERSION, "n": len(paths), "image_size": int(image_size), "backbone": backbone_id}
        ).encode()
    )
    for p in paths:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _open_partial(partial: str, n: int, fingerprint: str, restart: bool, log: Callable[[str], None]):
    """Open (or create) ``OUT.partial``; returns ``(h5py.File, done_count)``."""
    import h5py

    if os.path.exists(partial) and not restart:
        try:
            f = h5py.File(partial, "r+")
        except OSError as exc:
            log(f"warning: {partial} is unreadable ({exc}); starting again from row 0")
        else:
            try:
                fp = f.attrs.get("job_fingerprint")
                fp = fp.decode() if isinstance(fp, bytes) else fp
                if fp != fingerprint:
                    raise DataError(
                        f"{partial}: a partial extraction of a different job (other image list, image size or "
                        "weights); delete it or pass --restart"
                    )
                done = int(f.attrs.get("done_count", 0)) if "feature_map" in f else 0
                if not 0 <= done <= n:
                    raise DataError(f"{partial}: 'done_count' {done} is outside [0, {n}]; delete it or pass --restart")
                return f, done
            except DataError:
                f.close()
                raise
            except Exception as exc:  # damaged metadata of a killed run
                f.close()
                log(f"warning: {partial} is damaged ({exc}); starting again from row 0")
    if os.path.exists(partial):
        os.remove(partial)
    f = h5py.File(partial, "w")
    f.attrs["job_fingerprint"] = fingerprint
    f.attrs["num_images"] = n
    f.attrs["done_count"] = 0
    f.flush()
    return f, 0


def _default_backbone_id(backbone, preprocessing: str, weights) -> str:
    """What identifies the backbone in the resume check when the caller names none."""
    if backbone is not None:
        return "custom"
    if preprocessing == "torchvision":
        return f"torchvision.resnet101:{weights}"
    return f"keras.ResNet101:{weights}"


def _check_request(out_path: str, listed: Sequence[str], overwrite: bool, batch_size: int, image_size: int) -> None:
    """Refuse an existing output, bad sizes and an empty image list before any work."""
    if os.path.exists(out_path) and not overwrite:
        raise MSDNError(f"{out_path} already exists; remove it or pass --overwrite")
    if batch_size < 1 or image_size < 32:
        raise MSDNError("batch size must be >= 1 and image size >= 32")
    if not listed:
        raise DataError("no images to extract")


def extraction_precision(name: str):
    """The :class:`~msdn_tf.precision.Precision` of ``--precision`` for extraction (float32, mixed_bfloat16, auto).

    ``auto`` is ``mixed_bfloat16`` where the hardware runs bfloat16 natively (CPU flag
    ``avx512_bf16``/``amx_bf16``, GPUs of compute capability >= 8.0), else float32.

    Raises:
        ConfigError: an unknown name, or ``mixed_float16`` (no loss of range is acceptable
            in 2048-channel sums; not offered).
    """
    from msdn_tf.errors import ConfigError
    from msdn_tf.precision import resolve_precision

    if name == "mixed_float16":
        raise ConfigError("'--precision' for extraction must be float32, mixed_bfloat16 or auto; got mixed_float16")
    return resolve_precision(name, setting="--precision", backend="tensorflow")


def _is_torchvision_trunk(backbone) -> bool:
    try:
        return {"conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1"} <= {layer.name for layer in backbone.layers}
    except AttributeError:
        return False


def _ready_backbone(backbone, preprocessing: str, weights, image_size: int, strategy, policy: str = "float32"):
    """``(backbone, strategy)``: the given backbone, or the default one for ``preprocessing``.

    The Keras default is built under MirroredStrategy when more than one GPU is visible.
    A torchvision-layout trunk (built here or given) runs as its
    :func:`~msdn_tf.backbones.torchvision_resnet.inference_trunk` (BatchNorm folded,
    fused convolutions) under the dtype policy ``policy``.
    """
    from msdn_tf.backbones.torchvision_resnet import inference_trunk

    if backbone is None and preprocessing == "torchvision":
        backbone = build_torchvision_backbone(weights, image_size)
    if preprocessing == "torchvision" and _is_torchvision_trunk(backbone):
        return inference_trunk(backbone, policy), strategy
    if strategy is None and backbone is None:
        import tensorflow as tf

        if len(tf.config.list_logical_devices("GPU")) > 1:
            strategy = tf.distribute.MirroredStrategy()
    if backbone is None:
        if strategy is not None:
            with strategy.scope():
                backbone = build_backbone(weights, image_size)
        else:
            backbone = build_backbone(weights, image_size)
    return backbone, strategy


def _feature_batches(backbone, paths, start: int, batch_size: int, image_size: int, preprocessing: str, strategy):
    """``(batches, note)``: the ``(rows, features)`` iterator for ``preprocessing`` and its description."""
    if preprocessing == "torchvision":
        note = (
            "Pillow decoding, convert('RGB'), torchvision Resize(image_size) (PIL bilinear), "
            "CenterCrop, ToTensor, Normalize(ImageNet mean/std)"
        )
        return _torchvision_batches(backbone, paths, start, batch_size, image_size), note
    if preprocessing == "keras":
        ds = make_dataset(paths, start, image_size, batch_size)
        note = (
            "shorter side to image_size (bilinear, antialias), centre "
            "crop, keras.applications.resnet.preprocess_input (caffe)"
        )
        return _batches(backbone, ds, paths, start, batch_size, image_size, strategy), note
    raise MSDNError(f"preprocessing must be 'keras' or 'torchvision', got {preprocessing!r}")


def _write_rows(
    f, partial: str, n: int, idx: np.ndarray, feats: np.ndarray, attrs: dict, compression: Optional[str]
) -> int:
    """Store one batch channel-first (creating ``feature_map`` at the first); returns rows done."""
    maps = np.ascontiguousarray(np.transpose(feats, (0, 3, 1, 2)), dtype=np.float32)
    if "feature_map" not in f:
        f.create_dataset(
            "feature_map",
            shape=(n,) + maps.shape[1:],
            dtype=np.float32,
            chunks=(1,) + maps.shape[1:],
            compression=compression,
        )
        for key, value in attrs.items():
            f.attrs[key] = value
    ds_map = f["feature_map"]
    if ds_map.shape[1:] != maps.shape[1:]:
        raise MSDNError(
            f"{partial}: 'feature_map' rows are {ds_map.shape[1:]} but the backbone "
            f"gives {maps.shape[1:]}; pass --restart"
        )
    ds_map[int(idx[0]) : int(idx[-1]) + 1] = maps
    f.flush()
    done = int(idx[-1]) + 1
    f.attrs["done_count"] = done
    f.flush()
    return done


def _write_all(
    f,
    partial: str,
    n: int,
    done: int,
    batches,
    attrs: dict,
    compression: Optional[str],
    progress: bool,
    after_batch: Optional[Callable[[int], None]],
) -> int:
    """Write every batch, flushing ``done_count`` after each, with a progress bar; returns rows done."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=done, unit="img", desc="extract", file=sys.stderr)
    try:
        for idx, feats in batches:
            done = _write_rows(f, partial, n, idx, feats, attrs, compression)
            if bar is not None:
                bar.update(idx.size)
            if after_batch is not None:
                after_batch(done)
    finally:
        if bar is not None:
            bar.close()
    return done


def extract_features(
    image_paths: Sequence[str],
    out_path: str,
    backbone=None,
    *,
    images_root: Optional[str] = None,
    weights: str = "imagenet",
    batch_size: int = 16,
    image_size: int = 448,
    compression: Optional[str] = "gzip",
    metadata: Optional[dict] = None,
    backbone_id: Optional[str] = None,
    restart: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    after_batch: Optional[Callable[[int], None]] = None,
    strategy=None,
    preprocessing: str = "keras",
    log: Callable[[str], None] = None,
    precision: str = "float32",
) -> str:
    """Extract feature maps of ``image_paths`` into ``out_path`` (resumable, crash-safe).

    Args:
        image_paths: image files, in output row order (relative to ``images_root`` if given).
        out_path: the final HDF5 file; work goes to ``out_path + ".partial"``.
        backbone: any callable ``(B, S, S, 3) -> (B, h, w, c)`` (a Keras model is called
            with ``training=False``); default ``keras.applications.ResNet101`` with ``weights``.
            It receives images already passed through ``resnet.preprocess_input``.
        weights: for the default backbone: ``"imagenet"``, ``"none"`` or a local weights file.
        batch_size, image_size: batch size and square input size (448 -> 14x14 maps).
        compression: ``"gzip"`` or ``None`` for ``feature_map``.
        metadata: extra §1.1 keys written when complete (see :func:`build_metadata`).
        backbone_id: identifies the backbone in the resume check (default: the
            weights spec, or ``"custom"`` for an injected backbone).
        restart: discard an existing partial file. overwrite: replace an existing ``out_path``.
        after_batch: called with the number of rows done after every flushed batch (tests).
        strategy: a ``tf.distribute`` strategy; default MirroredStrategy with >1 GPU.
        preprocessing: ``"keras"`` (TF decoding, caffe ``preprocess_input``, for the Keras
            ResNet-101) or ``"torchvision"`` (Pillow decoding and the reference's PIL-exact
            Resize/CenterCrop/Normalize, :mod:`msdn_tf.backbones.preprocessing`; the
            default backbone is then :func:`build_torchvision_backbone` of ``weights``).
        precision: ``float32`` (default), ``mixed_bfloat16`` or ``auto``
            (:func:`extraction_precision`) for the torchvision trunk's convolutions.
            bfloat16 maps differ from float32 ones by about 1 % (relative L2,
            docs/data.md); the precision is part of the resume check, so one file never
            mixes rows of two precisions.

    Returns:
        ``out_path``.

    Example::

        extract_features(["a.jpg", "b.jpg"], "f.hdf5", images_root="imgs", weights="none")
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_path = str(out_path)
    listed = [str(p) for p in image_paths]
    _check_request(out_path, listed, overwrite, batch_size, image_size)
    paths = resolve_image_paths(images_root, listed)
    n = len(paths)
    if metadata and "labels" in metadata and len(metadata["labels"]) != n:
        raise DataError(f"metadata 'labels' has {len(metadata['labels'])} entries for {n} images")
    if compression in ("none", "None", ""):
        compression = None
    if backbone_id is None:
        backbone_id = _default_backbone_id(backbone, preprocessing, weights)
    chosen = extraction_precision(precision)
    if chosen.policy != "float32":
        if preprocessing != "torchvision":
            raise MSDNError(f"--precision {precision} ({chosen.policy}) is offered for the torchvision backbone only")
        backbone_id += f":{chosen.policy}"
        log(f"extraction precision {chosen.policy} ({chosen.reason})")
    partial = out_path + PARTIAL_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    f, done = _open_partial(partial, n, _fingerprint(listed, image_size, backbone_id), restart, log)
    try:
        if done < n:
            if done:
                log(f"resuming {partial}: {done}/{n} images already done")
            backbone, strategy = _ready_backbone(backbone, preprocessing, weights, image_size, strategy, chosen.policy)
            batches, note = _feature_batches(backbone, paths, done, batch_size, image_size, preprocessing, strategy)
            attrs = {
                "image_size": int(image_size),
                "backbone": backbone_id,
                "preprocessing": note,
                "precision": chosen.policy,
            }
            done = _write_all(f, partial, n, done, batches, attrs, compression, progress, after_batch)
        if done != n:
            raise MSDNError(f"{partial}: only {done} of {n} images were extracted")
        if metadata:
            write_metadata(f, metadata)
        f.attrs["complete"] = True
        f.flush()
    finally:
        f.close()
    os.replace(partial, out_path)
    return out_path


def extract_image_list(
    image_list,
    out,
    *,
    images_root,
    backbone: str = "torchvision_resnet101",
    weights=None,
    batch_size: int = 16,
    image_size: int = 448,
    compression: str = "gzip",
    limit: Optional[int] = None,
    att_splits=None,
    attributes_pkl=None,
    sent_splits=None,
    attribute_names=None,
    restart: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    precision: str = "float32",
) -> None:
    """What ``python -m msdn_tf.extract`` does: check the options, read the image list, build the
    §1.1 metadata and run :func:`extract_features` with the named backbone.

    Args:
        image_list: the list (:func:`read_image_list`).
        backbone: a name of :data:`BACKBONES`; ``weights`` defaults to ``imagenet`` for
            ``keras_resnet101`` and is required (a ``.pth``/``.npz`` file) for
            ``torchvision_resnet101``.
        compression: ``gzip`` or ``none``.
        limit: only the first N images (cannot be combined with ``att_splits``).
        att_splits, attributes_pkl, sent_splits, attribute_names: the metadata files of
            :func:`build_metadata`.
        precision: ``float32``, ``mixed_bfloat16`` or ``auto`` (:func:`extract_features`).

    Raises:
        MSDNError, DataError: one line naming the option or file.
    """
    if att_splits and not attributes_pkl:
        raise MSDNError("--att-splits needs --attributes-pkl too (a complete §1.1 file has w2v_att)")
    if limit is not None and (att_splits or attributes_pkl):
        raise MSDNError(
            "--limit makes a partial image set; it cannot be combined with --att-splits/"
            "--attributes-pkl (the splits index the full list)"
        )
    files, labels = read_image_list(image_list)
    if limit is not None:
        if limit < 1:
            raise MSDNError("--limit must be >= 1")
        files = files[:limit]
        labels = None if labels is None else labels[:limit]
    metadata = build_metadata(
        labels,
        len(files),
        att_splits=att_splits,
        attributes_pkl=attributes_pkl,
        sent_splits=sent_splits,
        attribute_names=attribute_names,
    )
    torchvision = backbone == "torchvision_resnet101"
    weights = weights if weights is not None else (None if torchvision else "imagenet")
    if torchvision:
        if weights is None or weights in ("imagenet", "none", "None"):
            raise DataError(TORCHVISION_WEIGHTS_HINT)
        if not os.path.isfile(weights):
            raise DataError(f"{weights}: weights file not found")
    elif weights not in ("imagenet", "none", "None") and not os.path.isfile(weights):
        raise DataError(
            f"{weights}: weights file not found (--weights takes 'imagenet', 'none' or a local .h5/.weights.h5 file)"
        )
    extract_features(
        files,
        out,
        images_root=images_root,
        weights=weights,
        preprocessing="torchvision" if torchvision else "keras",
        batch_size=batch_size,
        image_size=image_size,
        compression=None if compression == "none" else compression,
        metadata=metadata,
        restart=restart,
        overwrite=overwrite,
        progress=progress,
        precision=precision,
    )
