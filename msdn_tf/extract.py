"""Extract ResNet-101 feature maps into the feature-map HDF5 layout (docs/reference.md §1.1).

Usage::

    python -m msdn_tf.extract --images-root DIR --image-list LIST --out FILE.hdf5 \\
        [--backbone torchvision_resnet101|keras_resnet101] [--weights FILE|imagenet|none] \\
        [--batch-size 16] [--image-size 448] \\
        [--compression gzip|none] [--limit N] [--att-splits att_splits.mat \\
        --attributes-pkl CUB_attribute.pkl [--sent-splits sent_splits.mat] \\
        [--attribute-names attributes.txt]]

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
after every batch). Re-running the same command continues at the first row not
done. Only a complete file, with the metadata keys added, is renamed to ``OUT``
(atomically), so a killed run never leaves a partial ``OUT``. With
``keras_resnet101`` and more than one visible GPU the batches are split over them
with ``tf.distribute.MirroredStrategy``; ``torchvision_resnet101`` decodes and
preprocesses with a small thread pool, one batch ahead, and runs the network
compiled (``predict_on_batch``) on the default device.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from msdn_tf.errors import DataError, MSDNError, cli_main

WEIGHTS_NOTE = (
    "Keras' ResNet-101 ImageNet weights differ from torchvision's (used by TransZero/MSDN), so "
    "these features differ from the reference feature files; for parity with the paper use "
    "TransZero-format feature files."
)
#: ``--backbone`` choices -> what they compute.
BACKBONES = {
    "torchvision_resnet101": "torchvision ResNet-101 trunk + PIL-exact reference preprocessing (the paper's features)",
    "keras_resnet101": "keras.applications.ResNet101 + caffe preprocessing (not the paper's features)",
}
TORCHVISION_WEIGHTS_HINT = (
    "--backbone torchvision_resnet101 needs --weights FILE: a torchvision resnet101 state_dict (the ImageNet V1 "
    "weights the reference used: https://download.pytorch.org/models/resnet101-63fe2227.pth) or a released MSDN "
    "checkpoint (CUB_MSDN_GZSL.pth...)")
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

    if rows and low.endswith(".csv") and rows[0][0].strip().lower() in ("path", "image", "file", "image_file",
                                                                         "image_files", "filename"):
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


def build_metadata(labels: Optional[np.ndarray], num_images: int, att_splits: Optional[str] = None,
                   attributes_pkl: Optional[str] = None, sent_splits: Optional[str] = None,
                   attribute_names: Optional[str] = None) -> dict:
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
        extra = xlsa17.load_train_val_splits(sent_splits, num_images=num_images,
                                             trainval_loc=splits["trainval_loc"])
        splits.update(extra)
    w2v = xlsa17.load_attribute_vectors(attributes_pkl) if attributes_pkl else None
    names = xlsa17.load_attribute_names(attribute_names) if attribute_names else None
    xlsa17.check_consistency(splits, labels, labels_path="image list", w2v=w2v, w2v_path=str(attributes_pkl),
                             attribute_names=names, names_path=str(attribute_names))
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


def _write_metadata(f, meta: dict) -> None:
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
# Backbone and input pipeline


def build_backbone(weights: str = "imagenet", image_size: int = 448):
    """``keras.applications.ResNet101(include_top=False)`` with the given weights.

    Args:
        weights: ``"imagenet"`` (Keras download, needs network), ``"none"`` (random,
            for tests) or a local ``.h5``/``.weights.h5`` file.
    """
    import keras

    if weights in (None, "none", "None"):
        spec = None
    elif weights == "imagenet":
        spec = "imagenet"
    else:
        spec = str(weights)
        if not os.path.isfile(spec):
            raise DataError(f"{spec}: weights file not found (--weights takes 'imagenet', 'none' or a local "
                            ".h5/.weights.h5 file)")
    try:
        return keras.applications.ResNet101(include_top=False, weights=spec,
                                            input_shape=(image_size, image_size, 3))
    except DataError:
        raise
    except Exception as exc:
        if spec == "imagenet":
            raise MSDNError(f"could not get Keras' ResNet-101 ImageNet weights ({type(exc).__name__}: {exc}); "
                            "without network download them elsewhere and pass --weights FILE") from exc
        if spec is not None:
            raise DataError(f"{spec}: cannot load ResNet-101 (include_top=False) weights from this file "
                            f"({type(exc).__name__}: {exc})") from exc
        raise


def build_torchvision_backbone(weights, image_size: Optional[int] = None):
    """torchvision-layout ResNet-101 trunk with weights from a ``.pth``/``.npz`` file.

    Args:
        weights: a torchvision ``resnet101`` state_dict (e.g. ``resnet101-63fe2227.pth``,
            the ImageNet V1 weights TransZero/MSDN used), a released MSDN checkpoint
            (its ``resnet101.*`` keys) or the ``backbone_resnet101.npz`` that
            ``msdn_tf.convert`` writes into a run directory.
    """
    from msdn_tf.backbones.torchvision_resnet import load_backbone_file

    if weights in (None, "", "imagenet", "none", "None"):
        raise DataError(TORCHVISION_WEIGHTS_HINT)
    if not os.path.isfile(str(weights)):
        raise DataError(f"{weights}: weights file not found")
    model, _ = load_backbone_file(str(weights), image_size=image_size)
    return model


def decode_and_crop(encoded, image_size: int):
    """One encoded JPEG/PNG (scalar tf.string) -> float32 (S, S, 3) RGB in 0..255.

    Resize the shorter side to ``image_size`` (bilinear, antialiased) and centre-crop,
    as the reference's ``torchvision`` Resize(int) + CenterCrop. Undecodable bytes raise
    ``InvalidArgumentError``. Shared by extraction, visualisation and the exported
    ``serving_images`` signature, so served images are preprocessed exactly as training
    features were.
    """
    import tensorflow as tf

    img = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    img.set_shape([None, None, 3])
    shape = tf.shape(img)
    h, w = shape[0], shape[1]
    size = tf.constant(image_size, tf.int32)
    # As torchvision.transforms.Resize(int): the long side becomes int(size * long / short).
    long_h = tf.cast(tf.math.floor(image_size * tf.cast(h, tf.float64) / tf.cast(w, tf.float64)), tf.int32)
    long_w = tf.cast(tf.math.floor(image_size * tf.cast(w, tf.float64) / tf.cast(h, tf.float64)), tf.int32)
    new_h = tf.where(w <= h, long_h, size)
    new_w = tf.where(w <= h, size, long_w)
    img = tf.image.resize(tf.cast(img, tf.float32), tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    # As torchvision CenterCrop: top = round((h - size) / 2) (round half to even).
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
    img = img[top:top + image_size, left:left + image_size, :]
    img = tf.clip_by_value(img, 0.0, 255.0)
    img.set_shape([image_size, image_size, 3])
    return img


def _load_image(path, image_size: int):
    """Read an image file and :func:`decode_and_crop` it; float32 0..255 RGB."""
    import tensorflow as tf

    return decode_and_crop(tf.io.read_file(path), image_size)


def make_dataset(paths: Sequence[str], start: int, image_size: int, batch_size: int):
    """tf.data pipeline of ``(row_index, preprocessed_image_batch)`` for rows ``start..N-1``."""
    import keras
    import tensorflow as tf

    idx = np.arange(start, len(paths), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((idx, np.asarray(list(paths[start:]), dtype=object).astype(str)))
    ds = ds.map(lambda i, p: (i, _load_image(p, image_size)), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda i, x: (i, keras.applications.resnet.preprocess_input(x)))
    return ds.prefetch(2)


def _bad_image_error(paths: Sequence[str], lo: int, hi: int, image_size: int, exc: Exception) -> DataError:
    """Find which image of rows ``lo..hi-1`` cannot be read and name it."""
    import tensorflow as tf

    for p in paths[lo:hi]:
        try:
            _load_image(tf.constant(p), image_size)
        except (tf.errors.OpError, ValueError) as err:
            msg = getattr(err, "message", str(err)).strip().splitlines()[0]
            return DataError(f"{p}: cannot read or decode the image ({msg})")
    msg = getattr(exc, "message", str(exc)).strip().splitlines()[0]
    return DataError(f"cannot read or decode one of the images {list(paths[lo:hi])} ({msg})")


def _call_backbone(backbone, x):
    import keras

    if isinstance(backbone, keras.layers.Layer):
        return backbone(x, training=False)
    return backbone(x)


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
                feats = _to_numpy(_call_backbone(backbone, x))
            if not np.all(np.isfinite(feats)):
                raise MSDNError(f"the backbone returned NaN or infinite values for images {list(paths[lo:lo + len(x)])}")
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
            feats = _to_numpy(_call_backbone(backbone, x_b))
        if feats.ndim != 4 or feats.shape[0] != idx.shape[0]:
            raise MSDNError(f"the backbone must return (batch, h, w, channels); got {feats.shape} for a batch "
                            f"of {idx.shape[0]} images")
        if idx.size and (idx[0] != pos or np.any(np.diff(idx) != 1)):
            raise MSDNError(f"internal error: expected rows starting at {pos}, got {idx[:5]}...")
        pos += idx.size
        yield idx, feats


# ---------------------------------------------------------------------------------------------
# Resumable writer


def _fingerprint(paths: Sequence[str], image_size: int, backbone_id: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "n": len(paths), "image_size": int(image_size),
                         "backbone": backbone_id}).encode())
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


def extract_features(image_paths: Sequence[str], out_path: str, backbone=None, *,
                     images_root: Optional[str] = None, weights: str = "imagenet", batch_size: int = 16,
                     image_size: int = 448, compression: Optional[str] = "gzip",
                     metadata: Optional[dict] = None, backbone_id: Optional[str] = None,
                     restart: bool = False, overwrite: bool = False, progress: bool = True,
                     after_batch: Optional[Callable[[int], None]] = None, strategy=None,
                     preprocessing: str = "keras", log: Callable[[str], None] = None) -> str:
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
            backbone must then be given, e.g. from :func:`build_torchvision_backbone`).

    Returns:
        ``out_path``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_path = str(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise MSDNError(f"{out_path} already exists; remove it or pass --overwrite")
    if batch_size < 1 or image_size < 32:
        raise MSDNError("batch size must be >= 1 and image size >= 32")
    listed = [str(p) for p in image_paths]
    if not listed:
        raise DataError("no images to extract")
    paths = resolve_image_paths(images_root, listed)
    n = len(paths)
    if metadata and "labels" in metadata and len(metadata["labels"]) != n:
        raise DataError(f"metadata 'labels' has {len(metadata['labels'])} entries for {n} images")
    if compression in ("none", "None", ""):
        compression = None
    if backbone_id is None:
        if backbone is not None:
            backbone_id = "custom"
        elif preprocessing == "torchvision":
            backbone_id = f"torchvision.resnet101:{weights}"
        else:
            backbone_id = f"keras.ResNet101:{weights}"
    partial = out_path + PARTIAL_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    f, done = _open_partial(partial, n, _fingerprint(listed, image_size, backbone_id), restart, log)
    try:
        if done < n:
            if done:
                log(f"resuming {partial}: {done}/{n} images already done")
            if backbone is None and preprocessing == "torchvision":
                backbone = build_torchvision_backbone(weights, image_size)
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
            if preprocessing == "torchvision":
                batches = _torchvision_batches(backbone, paths, done, batch_size, image_size)
                prep_note = ("Pillow decoding, convert('RGB'), torchvision Resize(image_size) (PIL bilinear), "
                             "CenterCrop, ToTensor, Normalize(ImageNet mean/std)")
            elif preprocessing == "keras":
                ds = make_dataset(paths, done, image_size, batch_size)
                batches = _batches(backbone, ds, paths, done, batch_size, image_size, strategy)
                prep_note = ("shorter side to image_size (bilinear, antialias), centre "
                             "crop, keras.applications.resnet.preprocess_input (caffe)")
            else:
                raise MSDNError(f"preprocessing must be 'keras' or 'torchvision', got {preprocessing!r}")
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=n, initial=done, unit="img", desc="extract", file=sys.stderr)
            try:
                for idx, feats in batches:
                    maps = np.ascontiguousarray(np.transpose(feats, (0, 3, 1, 2)), dtype=np.float32)
                    if "feature_map" not in f:
                        f.create_dataset("feature_map", shape=(n,) + maps.shape[1:], dtype=np.float32,
                                         chunks=(1,) + maps.shape[1:], compression=compression)
                        f.attrs["image_size"] = int(image_size)
                        f.attrs["backbone"] = backbone_id
                        f.attrs["preprocessing"] = prep_note
                    ds_map = f["feature_map"]
                    if ds_map.shape[1:] != maps.shape[1:]:
                        raise MSDNError(f"{partial}: 'feature_map' rows are {ds_map.shape[1:]} but the backbone "
                                        f"gives {maps.shape[1:]}; pass --restart")
                    ds_map[int(idx[0]):int(idx[-1]) + 1] = maps
                    f.flush()
                    done = int(idx[-1]) + 1
                    f.attrs["done_count"] = done
                    f.flush()
                    if bar is not None:
                        bar.update(idx.size)
                    if after_batch is not None:
                        after_batch(done)
            finally:
                if bar is not None:
                    bar.close()
        if done != n:
            raise MSDNError(f"{partial}: only {done} of {n} images were extracted")
        if metadata:
            _write_metadata(f, metadata)
        f.attrs["complete"] = True
        f.flush()
    finally:
        f.close()
    os.replace(partial, out_path)
    return out_path


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m msdn_tf.extract",
        description="Extract ResNet-101 feature maps (N, 2048, 14, 14) into the §1.1 HDF5 layout. "
        "Resumable: re-run the same command after an interruption. The default backbone, torchvision_resnet101, "
        "gives the paper's features.",
    )
    p.add_argument("--images-root", required=True, help="folder the listed image paths are relative to")
    p.add_argument("--image-list", required=True,
                   help="res101.mat, image_list.npz, or a .txt/.csv of image paths (row order of the output)")
    p.add_argument("--out", required=True, help="output .hdf5 (work goes to OUT.partial until complete)")
    p.add_argument("--backbone", default="torchvision_resnet101", choices=list(BACKBONES),
                   help="torchvision_resnet101 (default): the network and PIL-exact preprocessing of TransZero/MSDN, "
                   "the paper's features; keras_resnet101: keras.applications.ResNet101 with caffe preprocessing "
                   "(not the paper's features)")
    p.add_argument("--weights", default=None,
                   help="torchvision_resnet101: a torchvision resnet101 state_dict .pth (resnet101-63fe2227.pth) or "
                   "a released MSDN checkpoint .pth (required). keras_resnet101: 'imagenet' (default; Keras "
                   "download, needs network), a local .h5/.weights.h5 file, or 'none' (random, for tests)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=448, help="square input size (448 gives 14x14 maps)")
    p.add_argument("--compression", default="gzip", choices=["gzip", "none"])
    p.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests)")
    p.add_argument("--att-splits", default=None, help="xlsa17 att_splits.mat: store splits, att, class names")
    p.add_argument("--attributes-pkl", default=None, help="{DS}_attribute.pkl (or .npy): store w2v_att")
    p.add_argument("--sent-splits", default=None, help="CUB sent_splits.mat: store train_loc/val_loc")
    p.add_argument("--attribute-names", default=None, help="attributes.txt / predicates.txt / attributes.mat")
    p.add_argument("--restart", action="store_true", help="discard an existing OUT.partial")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", action="store_true")
    return p


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.att_splits and not args.attributes_pkl:
        raise MSDNError("--att-splits needs --attributes-pkl too (a complete §1.1 file has w2v_att)")
    if args.limit is not None and (args.att_splits or args.attributes_pkl):
        raise MSDNError("--limit makes a partial image set; it cannot be combined with --att-splits/"
                        "--attributes-pkl (the splits index the full list)")
    files, labels = read_image_list(args.image_list)
    if args.limit is not None:
        if args.limit < 1:
            raise MSDNError("--limit must be >= 1")
        files = files[: args.limit]
        labels = None if labels is None else labels[: args.limit]
    metadata = build_metadata(labels, len(files), att_splits=args.att_splits,
                              attributes_pkl=args.attributes_pkl, sent_splits=args.sent_splits,
                              attribute_names=args.attribute_names)
    torchvision = args.backbone == "torchvision_resnet101"
    weights = args.weights if args.weights is not None else (None if torchvision else "imagenet")
    if torchvision:
        if weights is None or weights in ("imagenet", "none", "None"):
            raise DataError(TORCHVISION_WEIGHTS_HINT)
        if not os.path.isfile(weights):
            raise DataError(f"{weights}: weights file not found")
    elif weights not in ("imagenet", "none", "None") and not os.path.isfile(weights):
        raise DataError(f"{weights}: weights file not found (--weights takes 'imagenet', 'none' or a "
                        "local .h5/.weights.h5 file)")
    extract_features(files, args.out, images_root=args.images_root, weights=weights,
                     preprocessing="torchvision" if torchvision else "keras",
                     batch_size=args.batch_size, image_size=args.image_size,
                     compression=None if args.compression == "none" else args.compression,
                     metadata=metadata, restart=args.restart, overwrite=args.overwrite,
                     progress=not args.no_progress)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# Public names of the image helpers for the library modules that use them (data/custom.py,
# viz/attention.py). Wave 2 of issue 13 moves them, with build_backbone and decode_and_crop,
# into msdn_tf/backbones/; until then they stay defined above and are aliased here.
load_image = _load_image
call_backbone = _call_backbone
