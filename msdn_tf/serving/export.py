"""Export library: an MSDN as a TensorFlow Serving SavedModel with fused predictions.

The command is ``python -m msdn_tf.export`` (:mod:`msdn_tf.cli.export`); the check of an
export before it is published is :mod:`msdn_tf.serving.verify`.

Usage::

    python -m msdn_tf.export --run RUN_DIR --out export/models/msdn_cub [--version N] \\
        [--gamma G] [--top-k 5] [--overwrite] [--no-verify] [--json] \\
        [--with-images [--backbone auto|torchvision_resnet101|keras_resnet101] \\
         [--backbone-weights FILE|imagenet|none] --image-size 448]

Writes ``OUT/<version>/`` (default version 1) in the TF Serving model-base-path
layout, through ``keras.export.ExportArchive`` (``tf.saved_model.save`` of a Keras 3
model fails in the C++ loader TF Serving uses). The SavedModel is written to
``OUT/.tmp-<version>-<pid>-*`` (not numeric: TF Serving ignores it), checked there and
only then renamed into place, so TF Serving never sees a half-written version nor one
that failed its check; an existing version is only replaced with ``--overwrite``.
Temporary folders of a killed export are removed by the next one. A full disk or a
read-only ``OUT`` is one error line and exit code 2, versions already there unchanged.

Signatures (all ``tensorflow/serving/predict``):

============== ============================================ =============================
name           input                                        note
============== ============================================ =============================
serving_default ``features`` float32 (None, None, F)        region vectors (B, R, F), any R
serving_maps   ``feature_maps`` float32 (None, None, None, F) channel-last maps (B, H, W, F)
serving_images ``images`` string (None,)                    encoded JPEG/PNG (``--with-images``)
metadata       (no input)                                   ``metadata_json``, ``class_names``
============== ============================================ =============================

The three prediction signatures return the same outputs:

* ``scores`` float32 (B, C): fused logits ``w1 * S1 + w2 * S2`` over all classes
  (no calibration);
* ``gzsl_class`` int64 (B,): argmax over all classes after subtracting ``gamma`` from
  the seen-class scores (calibrated stacking; ``gamma`` is baked into the export);
* ``czsl_class`` int64 (B,): argmax over the unseen classes only, as a class id;
* ``top_k_classes`` int64 (B, k) and ``top_k_scores`` float32 (B, k): the ``k =
  min(top_k, C)`` best classes of the *calibrated* scores (``scores`` minus ``gamma``
  on seen classes), best first, so ``top_k_classes[:, 0] == gzsl_class``.
  ``top_k_scores`` are those calibrated scores.

``serving_images`` first checks each image's size from its header (:mod:`msdn_tf.serving.image_guard`:
JPEG/PNG/BMP/WebP, 16 to 4096 x 4096 pixels, aspect ratio at most 10, not blank), then decodes it to RGB and runs
the preprocessing of the backbone and the backbone inside the graph: for the
torchvision-layout ResNet-101 (``--backbone torchvision_resnet101``, the default when
the run holds ``backbone_resnet101.npz`` from ``msdn_tf.convert``) the reference's
torchvision/PIL preprocessing, exactly (:mod:`msdn_tf.backbones.preprocessing`); for
Keras' ResNet-101 the shorter side resized to ``image_size`` (bilinear, antialiased),
a centre crop and ``keras.applications.resnet.preprocess_input``, as
``msdn_tf.extract --backbone keras_resnet101``.

Metadata (class names, seen/unseen ids, fusion weights, gamma, top_k, the run
config) is written to ``OUT/<version>/assets/msdn_metadata.json``, beside the
version folders as ``OUT/msdn_metadata.json`` (for clients; it describes the last
export), and is returned by the ``metadata`` signature.

The prediction signatures refuse a NaN/inf input, an empty batch and zero regions
with ``InvalidArgumentError`` raised in the graph (:func:`guard_features`), which TF
Serving answers with INVALID_ARGUMENT / HTTP 400.

Before publishing, :func:`verify_export` loads the export with TensorFlow's C++ loader
(:mod:`msdn_tf.serving.cc_loader`), runs every signature, compares with the Keras
model, checks that a NaN input is refused and runs ``saved_model_cli show --all``
(``--no-verify`` skips this). Exit codes: 0 published, 1 the check failed (nothing
published), 2 bad arguments or a write failure.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from msdn_tf.errors import MSDNError
from msdn_tf.utils import write_json

METADATA_FILE = "msdn_metadata.json"
METADATA_FORMAT = "msdn_tf.export/1"
FEATURES_SIGNATURE = "serving_default"
MAPS_SIGNATURE = "serving_maps"
IMAGES_SIGNATURE = "serving_images"
METADATA_SIGNATURE = "metadata"
OPEN_SIGNATURE = "serving_open"
OPEN_SIDED_SIGNATURE = "serving_open_sided"
PREDICTION_OUTPUTS = (
    "scores",
    "gzsl_class",
    "czsl_class",
    "top_k_classes",
    "top_k_scores",
    "attribute_scores",
    "top_k_attributes",
)
#: Attribute evidence returned with every answer: how many attribute ids (at most K).
DEFAULT_TOP_ATTRIBUTES = 5
#: Reference (torchvision + PIL) preprocessing in-graph, for the torchvision-layout backbone.
TORCHVISION_PREPROCESSING_NOTE = (
    "decode (JPEG: accurate integer IDCT) to RGB, torchvision Resize(image_size) with Pillow's bilinear "
    "fixed-point resampling computed exactly in-graph, CenterCrop, /255, ImageNet mean/std "
    "(msdn_tf.backbones.preprocessing)"
)
PREPROCESSING_NOTE = (
    "decode to RGB, resize the shorter side to image_size (bilinear, antialias), centre "
    "crop, keras.applications.resnet.preprocess_input (caffe), as msdn_tf.extract"
)


# ---------------------------------------------------------------------------------------------
# In-graph pieces (TensorFlow-specific by design: this is the export)


def preprocess_encoded_image(encoded, image_size: int):
    """One encoded image (scalar tf.string) -> float32 (S, S, 3) RGB in 0..255.

    Exactly :func:`msdn_tf.backbones.keras_resnet.decode_and_crop`, the preprocessing the features were
    extracted with; ``keras.applications.resnet.preprocess_input`` is applied to the
    batch afterwards, as in :func:`msdn_tf.data.extraction.make_dataset`. Undecodable bytes raise
    ``InvalidArgumentError`` (TF Serving: INVALID_ARGUMENT).
    """
    from msdn_tf.backbones.keras_resnet import decode_and_crop

    return decode_and_crop(encoded, image_size)


def preprocess_image_batch(images, image_size: int, preprocessing: str = "keras"):
    """(B,) encoded images -> (B, S, S, 3) backbone input.

    ``preprocessing="keras"``: :func:`preprocess_encoded_image` then ``resnet.preprocess_input``;
    ``"torchvision"``: the reference's PIL/torchvision preprocessing in-graph
    (:func:`msdn_tf.backbones.preprocessing.tf_preprocess_batch`). First, the size limits of
    :mod:`msdn_tf.serving.image_guard` are checked from the image headers (before decoding).
    """
    import keras
    import tensorflow as tf

    from msdn_tf.serving.image_guard import guard_encoded_images

    images = guard_encoded_images(images)

    if preprocessing == "torchvision":
        from msdn_tf.backbones.preprocessing import tf_preprocess_batch

        return tf_preprocess_batch(images, image_size)

    def one(encoded):
        return preprocess_encoded_image(encoded, image_size)

    batch = tf.map_fn(one, images, fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.float32))
    return keras.applications.resnet.preprocess_input(batch)


def guard_features(features, input_name: str):
    """In-graph checks of a feature input: the checked ``features`` or ``InvalidArgumentError``.

    TF Serving turns an ``InvalidArgumentError`` raised inside a signature into gRPC
    ``INVALID_ARGUMENT`` / HTTP 400, so the exported model itself refuses what it cannot
    answer (without these checks a NaN input, an empty batch or zero regions answered
    class 0 with status OK):

    * an empty batch (batch size 0);
    * zero regions (``R = 0`` or ``H * W = 0``): the attention softmax over no regions;
    * a NaN or inf value (also what an out-of-range JSON number becomes in float32).

    Args:
        features: float32 ``(B, R, F)`` or ``(B, H, W, F)``.
        input_name: the signature's input key, named in the messages.
    """
    import tensorflow as tf

    shape = tf.shape(features)
    checks = [
        tf.debugging.assert_positive(
            shape[0], message=f"empty batch in input {input_name} (batch size 0): send at least one sample"
        ),
        tf.debugging.assert_positive(
            tf.reduce_prod(shape[1:-1]),
            message=f"zero regions in input {input_name}: "
            "send at least one region (or a non-empty H x W map) per sample",
        ),
    ]
    # reduce_all(is_finite), not check_numerics: 12 ms instead of 72 ms at (64, 196, 2048), shared 2-core CPU.
    checks.append(
        tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(features)),
            [
                f"NaN or inf in input {input_name} (JSON numbers outside the float32 range become inf): send finite "
                "float32 values"
            ],
        )
    )
    with tf.control_dependencies(checks):
        return tf.identity(features)


def guard_scores(scores, input_name: str):
    """In-graph check that the model's scores are finite (``InvalidArgumentError`` otherwise)."""
    import tensorflow as tf

    check = tf.debugging.Assert(
        tf.reduce_all(tf.math.is_finite(scores)),
        [f"NaN or inf in the model's scores for input {input_name}: its values are too large for float32 arithmetic"],
    )
    with tf.control_dependencies([check]):
        return tf.identity(scores)


def fused_predictions(
    scores, seen_mask, unseen_ids, gamma: float, top_k: int, attribute_scores=None, top_attributes: int = 0
) -> dict:
    """The prediction outputs from fused scores ``(B, C)`` (keras.ops; runs in the export graph).

    Args:
        scores: fused logits (B, C).
        seen_mask: (C,) float, 1 for seen classes.
        unseen_ids: (U,) int class ids of the unseen classes.
        gamma: calibrated-stacking constant subtracted from seen-class scores.
        top_k: k of the top-k outputs (at most C).
        attribute_scores: optional (B, K) attribute scores of the A->V sub-net (the evidence).
        top_attributes: how many attribute ids ``top_k_attributes`` holds (at most K).
    """
    from keras import ops

    calibrated = scores - gamma * ops.convert_to_tensor(seen_mask, scores.dtype)[None, :]  # (B, C)
    unseen_ids = ops.convert_to_tensor(unseen_ids, "int64")
    unseen_scores = ops.take(scores, unseen_ids, axis=1)  # (B, U)
    values, indices = ops.top_k(calibrated, k=top_k, sorted=True)  # (B, k)
    out = {
        "scores": scores,
        "gzsl_class": ops.cast(ops.argmax(calibrated, axis=-1), "int64"),
        "czsl_class": ops.take(unseen_ids, ops.argmax(unseen_scores, axis=-1), axis=0),
        "top_k_classes": ops.cast(indices, "int64"),
        "top_k_scores": values,
    }
    return out | attribute_evidence(attribute_scores, top_attributes)


def attribute_evidence(attribute_scores, top_attributes: int) -> dict:
    """``attribute_scores`` (B, K) and ``top_k_attributes`` (B, k) int64, best first (keras.ops)."""
    from keras import ops

    if attribute_scores is None:
        return {}
    attribute_scores = ops.cast(attribute_scores, "float32")
    _, ids = ops.top_k(attribute_scores, k=int(top_attributes), sorted=True)
    return {"attribute_scores": attribute_scores, "top_k_attributes": ops.cast(ids, "int64")}


def open_predictions(scores, is_seen, gamma: float, top_k: int, attribute_scores, top_attributes: int) -> dict:
    """:func:`fused_predictions` over a per-request class set (``serving_open``).

    The sides come as a tensor: ``is_seen`` (C',) bool. ``czsl_class`` is the best class
    on the unseen side, -1 when the request marks every class seen; ``k = min(top_k, C')``.
    """
    import tensorflow as tf  # the per-request k is a tensor: TensorFlow's top_k (export only)
    from keras import ops

    seen = ops.cast(is_seen, scores.dtype)[None, :]
    calibrated = scores - gamma * seen
    unseen_only = ops.where(is_seen[None, :], ops.full_like(scores, float("-inf")), scores)
    any_unseen = ops.any(ops.logical_not(is_seen))
    czsl = ops.where(
        any_unseen,
        ops.cast(ops.argmax(unseen_only, axis=-1), "int64"),
        -ops.ones_like(ops.cast(ops.argmax(unseen_only, axis=-1), "int64")),
    )
    k = tf.minimum(int(top_k), tf.shape(scores)[1])
    values, indices = tf.math.top_k(calibrated, k=k, sorted=True)
    out = {
        "scores": scores,
        "gzsl_class": ops.cast(ops.argmax(calibrated, axis=-1), "int64"),
        "czsl_class": czsl,
        "top_k_classes": ops.cast(indices, "int64"),
        "top_k_scores": values,
    }
    return out | attribute_evidence(attribute_scores, top_attributes)


def guard_class_rows(class_attributes, num_attributes: int, nonnegative: bool, input_name: str = "class_attributes"):
    """In-graph checks of a per-request class vocabulary (``InvalidArgumentError`` naming the input).

    Refused: no row; a column count other than the model's K; a NaN or inf; a row that
    is all zero (after setting negatives to 0 where the training data was).
    """
    import tensorflow as tf

    shape = tf.shape(class_attributes)
    rows = tf.maximum(class_attributes, 0.0) if nonnegative else class_attributes
    zero_rows = tf.reduce_all(tf.equal(rows, 0.0), axis=1)
    checks = [
        tf.debugging.assert_positive(
            shape[0], message=f"empty class vocabulary in input {input_name} (0 rows): send at least one class row"
        ),
        tf.debugging.assert_equal(
            shape[1],
            num_attributes,
            message=f"wrong attribute count in input {input_name}: expected {num_attributes} columns (the export's "
            "attribute_names, in order); got",
        ),
    ]
    with tf.control_dependencies(checks):
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all(tf.math.is_finite(class_attributes)),
                [f"NaN or inf in input {input_name}: send finite float32 attribute values"],
            )
        )
        checks.append(
            tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(zero_rows)),
                [
                    f"all-zero row in input {input_name}"
                    + (" (after negatives are set to 0, as the training data was)" if nonnegative else "")
                    + "; rows:",
                    tf.where(zero_rows)[:, 0],
                ],
            )
        )
    with tf.control_dependencies(checks):
        return tf.identity(class_attributes)


def guard_sides(class_is_seen, class_attributes, input_name: str = "class_is_seen"):
    """In-graph check that ``class_is_seen`` has one entry per row of ``class_attributes``."""
    import tensorflow as tf

    check = tf.debugging.assert_equal(
        tf.shape(class_is_seen)[0],
        tf.shape(class_attributes)[0],
        message=f"input {input_name} must have one entry per row of class_attributes; lengths",
    )
    with tf.control_dependencies([check]):
        return tf.identity(class_is_seen)


def reference_predictions(
    scores, seen_classes, unseen_classes, gamma: float, top_k: int, attribute_scores=None, top_attributes: int = 0
) -> dict:
    """NumPy version of :func:`fused_predictions`, via :mod:`msdn_tf.evaluation.metrics` (for verification)."""
    from msdn_tf.evaluation.metrics import czsl_predictions, gzsl_predictions

    scores = np.asarray(scores, np.float32)
    calibrated = scores.astype(np.float64).copy()
    calibrated[:, np.asarray(seen_classes, dtype=np.int64)] -= gamma
    k = min(int(top_k), scores.shape[1])
    order = np.argsort(-calibrated, axis=1, kind="stable")[:, :k]
    out = {
        "scores": scores,
        "gzsl_class": gzsl_predictions(scores, seen_classes, gamma).astype(np.int64),
        "czsl_class": czsl_predictions(scores, unseen_classes).astype(np.int64),
        "top_k_classes": order.astype(np.int64),
        "top_k_scores": np.take_along_axis(calibrated, order, axis=1).astype(np.float32),
    }
    if attribute_scores is not None:
        a = np.asarray(attribute_scores, np.float32)
        out["attribute_scores"] = a
        out["top_k_attributes"] = np.argsort(-a.astype(np.float64), axis=1, kind="stable")[:, : int(top_attributes)]
    return out


# ---------------------------------------------------------------------------------------------
# Metadata


def _config_dict(config):
    if config is None:
        return None
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise MSDNError(f"config must be a Config, a dict or None, got {type(config).__name__}")


def build_metadata(
    model,
    *,
    class_names,
    seen_classes,
    unseen_classes,
    gamma,
    top_k,
    config=None,
    version=1,
    image_size=None,
    backbone_id=None,
    preprocessing: str = "keras",
    attribute_names=None,
    classes=None,
    class_file=None,
    normalisation=None,
    top_attributes: int = DEFAULT_TOP_ATTRIBUTES,
) -> dict:
    """The ``msdn_metadata.json`` content (see the module docstring)."""
    import keras
    import tensorflow as tf

    from msdn_tf.zeroshot import normalisation_rule

    c = int(model.num_classes)
    k_att = int(model.num_attributes)
    f = int(model.feature_dim)
    signatures = {
        FEATURES_SIGNATURE: {"inputs": {"features": f"float32 (batch, regions, {f})"}},
        MAPS_SIGNATURE: {"inputs": {"feature_maps": f"float32 (batch, height, width, {f})"}},
    }
    if image_size is not None:
        signatures[IMAGES_SIGNATURE] = {"inputs": {"images": "string (batch,) encoded JPEG/PNG bytes"}}
    evidence = {
        "attribute_scores": f"float32 (batch, {k_att}) attribute scores of the attribute->visual sub-net",
        "top_k_attributes": f"int64 (batch, {top_attributes}) attribute ids of the highest attribute_scores",
    }
    for sig in signatures.values():
        sig["outputs"] = {
            "scores": f"float32 (batch, {c})",
            "gzsl_class": "int64 (batch,)",
            "czsl_class": "int64 (batch,)",
            "top_k_classes": f"int64 (batch, {top_k})",
            "top_k_scores": f"float32 (batch, {top_k}) calibrated scores",
        } | evidence
    open_outputs = {
        "scores": "float32 (batch, classes) over the request's class rows",
        "gzsl_class": "int64 (batch,) row index into class_attributes",
        "czsl_class": "int64 (batch,) best row on the unseen side (-1 if none)",
        "top_k_classes": f"int64 (batch, min({top_k}, classes))",
        "top_k_scores": f"float32 (batch, min({top_k}, classes)) calibrated scores",
    } | evidence
    rows = f"float32 (classes, {k_att}) raw class rows, the form of the training class table; normalised in the graph"
    signatures[OPEN_SIGNATURE] = {
        "inputs": {"features": f"float32 (batch, regions, {f})", "class_attributes": rows},
        "outputs": open_outputs,
        "note": "every class of the request is on the unseen side (+bias margin, no gamma)",
    }
    signatures[OPEN_SIDED_SIGNATURE] = {
        "inputs": {
            "features": f"float32 (batch, regions, {f})",
            "class_attributes": rows,
            "class_is_seen": "bool (classes,) True: the seen side (-bias margin, gamma subtracted)",
        },
        "outputs": open_outputs,
    }
    signatures[METADATA_SIGNATURE] = {
        "inputs": {},
        "outputs": {"metadata_json": "string ()", "class_names": f"string ({c},)"},
    }
    return {
        "format": METADATA_FORMAT,
        "version": int(version),
        "class_names": [str(n) for n in class_names],
        "seen_classes": [int(i) for i in seen_classes],
        "unseen_classes": [int(i) for i in unseen_classes],
        "num_classes": c,
        "num_attributes": int(model.num_attributes),
        "feature_dim": int(model.feature_dim),
        "fusion_weights": [float(w) for w in model.fusion_weights],
        "gamma": float(gamma),
        "bias": float(model.bias_value),
        "top_k": int(top_k),
        "scores": "the reference's fused logits w1*S1 + w2*S2, which keep the margin bias*mask_bias (+bias unseen, "
        "-bias seen: unseen classes are favoured by 2*bias*(w1+w2)); gzsl_class and top_k use "
        "scores - gamma on seen classes, gamma on top of that margin",
        "images": None
        if image_size is None
        else {
            "image_size": int(image_size),
            "backbone": backbone_id or "custom",
            "preprocessing_kind": preprocessing,
            "preprocessing": TORCHVISION_PREPROCESSING_NOTE if preprocessing == "torchvision" else PREPROCESSING_NOTE,
        },
        "signatures": signatures,
        "attribute_names": [str(a) for a in attribute_names] if attribute_names is not None else None,
        "top_attributes": int(top_attributes),
        "class_normalisation": dict(normalisation) if normalisation is not None else normalisation_rule(False),
        "classes": classes,
        "class_file": class_file,
        "config": _config_dict(config),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def read_metadata(path) -> dict:
    """Read and check an ``msdn_metadata.json`` (a file, a version dir or a model base dir)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / METADATA_FILE, path / "assets" / METADATA_FILE]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        raise MSDNError(
            f"{path}: metadata file not found (python -m msdn_tf.export writes {METADATA_FILE} beside "
            "the version folders and in <version>/assets/)"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MSDNError(f"{path}: not valid JSON ({exc})") from exc
    missing = [k for k in ("class_names", "seen_classes", "unseen_classes", "gamma", "top_k") if k not in meta]
    if missing or not isinstance(meta.get("class_names"), list):
        raise MSDNError(
            f"{path}: not an msdn-tf export metadata file (missing keys {missing}; expected format {METADATA_FORMAT})"
        )
    return meta


# ---------------------------------------------------------------------------------------------
# Export


def _check_inputs(model, class_names, seen_classes, unseen_classes, gamma, top_k, version, image_size, backbone):
    c = int(model.num_classes)
    if len(class_names) != c:
        raise MSDNError(f"{len(class_names)} class names for a model with {c} classes")
    seen = [int(i) for i in seen_classes]
    unseen = [int(i) for i in unseen_classes]
    if sorted(seen) != sorted(model.seen_classes) or sorted(unseen) != sorted(model.unseen_classes):
        raise MSDNError(
            "seen_classes/unseen_classes differ from the model's own (model.seen_classes, "
            f"model.unseen_classes): got {len(seen)}/{len(unseen)} ids, the model has "
            f"{len(model.seen_classes)}/{len(model.unseen_classes)}"
        )
    if not np.isfinite(gamma):
        raise MSDNError(f"gamma must be a finite number, got {gamma}")
    if int(top_k) < 1:
        raise MSDNError(f"top_k must be >= 1, got {top_k}")
    if int(version) < 1:
        raise MSDNError(f"version must be a positive integer (TF Serving version folder), got {version}")
    if backbone is not None and int(image_size) < 32:
        raise MSDNError(f"image_size must be >= 32, got {image_size}")
    return seen, unseen


def _backbone_output_check(backbone, image_size, feature_dim):
    try:
        out = backbone.compute_output_shape((None, image_size, image_size, 3))
    except Exception:  # a backbone without shape inference: checked when the endpoint is traced
        return
    out = tuple(out)
    if len(out) != 4 or out[-1] != feature_dim:
        raise MSDNError(
            f"the backbone must map (batch, {image_size}, {image_size}, 3) to (batch, h, w, "
            f"{feature_dim}) for this model; it gives {out}"
        )


def export_saved_model(
    model,
    out_base,
    *,
    version: int = 1,
    class_names: Sequence[str],
    seen_classes,
    unseen_classes,
    gamma: float = 0.0,
    top_k: int = 5,
    config=None,
    backbone=None,
    image_size: int = 448,
    overwrite: bool = False,
    backbone_id: Optional[str] = None,
    preprocessing: str = "keras",
    check=None,
    attribute_names=None,
    classes=None,
    class_file=None,
    normalisation=None,
    top_attributes: int = DEFAULT_TOP_ATTRIBUTES,
) -> str:
    """Write ``out_base/<version>/`` as a TF Serving SavedModel of ``model``.

    The SavedModel is written to ``out_base/.tmp-<version>-<pid>-*`` (not a number, so TF
    Serving ignores it), checked with ``check`` if given, and only then renamed to
    ``out_base/<version>``. Temporary folders a killed export left behind are removed
    first (:func:`remove_stale_temporaries`, one line each on stderr).

    Args:
        model: a built :class:`msdn_tf.model.MSDN`.
        out_base: the TF Serving model base path (e.g. ``export/models/msdn_cub``).
        version: the version folder (positive int).
        class_names: C names, in class-id order.
        seen_classes, unseen_classes: class ids (must match the model's).
        gamma: calibrated-stacking constant baked into ``gzsl_class`` and top-k.
        top_k: k of ``top_k_classes``/``top_k_scores`` (clipped to C).
        config: the run's config (Config or dict), stored in the metadata.
        backbone: optional Keras model ``(B, S, S, 3) -> (B, h, w, F)`` (inputs
            already through ``resnet.preprocess_input``); adds ``serving_images``.
        image_size: S for ``serving_images``.
        overwrite: replace an existing ``out_base/<version>``.
        backbone_id: a description of the backbone for the metadata.
        check: optional ``callable(export_dir) -> report`` run on the written, not yet
            published folder (e.g. :func:`verify_export`); the export is published only
            if ``report["ok"]``. ``report["export_dir"]`` is set to the version folder
            and ``report["published"]`` to the outcome.
        preprocessing: ``"keras"`` (the backbone takes ``resnet.preprocess_input`` images)
            or ``"torchvision"`` (ImageNet mean/std images from the reference preprocessing,
            for :mod:`msdn_tf.backbones.torchvision_resnet`).
        attribute_names: K attribute names for the metadata (clients print the evidence by name).
        classes: ``[{"id", "name", "status", "side"}]`` (:meth:`msdn_tf.zeroshot.ClassSet.describe`);
            default: every class ``trained-seen``/``trained-unseen``.
        class_file: ``{"path", "sha256", ...}`` of the class file a re-targeted model came from.
        normalisation: the run's class-row rule (:func:`msdn_tf.zeroshot.normalisation_rule`),
            applied in the graph by ``serving_open``.
        top_attributes: how many attribute ids ``top_k_attributes`` holds (clipped to K).

    Returns:
        The version directory path.

    Raises:
        ExportCheckFailed: ``check`` failed; the folder was removed, nothing published.
        MSDNError: bad arguments, the version exists and ``overwrite`` is False, or
            writing failed (disk full, read-only folder: the message names the path;
            versions already there are unchanged).

    Example:
        >>> export_saved_model(model, "export/models/msdn_cub", class_names=names,
        ...                    seen_classes=model.seen_classes, unseen_classes=model.unseen_classes,
        ...                    check=lambda d: verify_export(d, model, sample))  # doctest: +SKIP
    """
    seen, unseen = _check_inputs(
        model, class_names, seen_classes, unseen_classes, gamma, top_k, version, image_size, backbone
    )
    out_base = Path(out_base)
    final = out_base / str(int(version))
    if final.exists() and not overwrite:
        raise MSDNError(f"{final} already exists; choose another --version or pass --overwrite")
    k = min(int(top_k), int(model.num_classes))
    k_att = min(int(top_attributes), int(model.num_attributes))
    if k_att < 1:
        raise MSDNError(f"top_attributes must be >= 1, got {top_attributes}")
    if attribute_names is not None and len(attribute_names) != int(model.num_attributes):
        raise MSDNError(f"{len(attribute_names)} attribute names for a model with {model.num_attributes} attributes")
    if classes is None:
        classes = [
            {
                "id": i,
                "name": str(n),
                "status": "trained-unseen" if i in unseen else "trained-seen",
                "side": "unseen" if i in unseen else "seen",
            }
            for i, n in enumerate(class_names)
        ]
    from msdn_tf.zeroshot import normalisation_rule

    normalisation = dict(normalisation) if normalisation is not None else normalisation_rule(False)
    gamma = float(gamma)
    if backbone is not None:
        _backbone_output_check(backbone, int(image_size), int(model.feature_dim))
    meta = build_metadata(
        model,
        class_names=class_names,
        seen_classes=seen,
        unseen_classes=unseen,
        gamma=gamma,
        top_k=k,
        config=config,
        version=version,
        image_size=None if backbone is None else int(image_size),
        backbone_id=backbone_id,
        preprocessing=preprocessing,
        attribute_names=attribute_names,
        classes=classes,
        class_file=class_file,
        normalisation=normalisation,
        top_attributes=k_att,
    )
    meta_text = json.dumps(meta, indent=2) + "\n"
    archive = _build_archive(
        model,
        seen,
        unseen,
        gamma,
        k,
        meta_text,
        [str(n) for n in class_names],
        backbone=backbone,
        image_size=image_size,
        preprocessing=preprocessing,
        top_attributes=k_att,
        nonnegative=bool(normalisation.get("nonnegative")),
    )
    tmp = _make_temporary_folder(out_base, version)
    published = False
    try:
        _write_archive(archive, tmp, meta_text, out_base)
        if check is not None:
            _run_check(check, tmp, final)
        try:
            write_json(out_base / METADATA_FILE, meta)  # atomic; before the version appears
            _publish(tmp, final, version, out_base)
        except OSError as exc:
            raise _write_error(exc, out_base) from exc
        published = True
    finally:
        if not published and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _build_archive(
    model,
    seen,
    unseen,
    gamma: float,
    k: int,
    meta_text: str,
    names: Sequence[str],
    *,
    backbone=None,
    image_size: int = 448,
    preprocessing: str = "keras",
    top_attributes: int = DEFAULT_TOP_ATTRIBUTES,
    nonnegative: bool = False,
):
    """The ``keras.export.ExportArchive`` with every signature (see the module docstring)."""
    import keras
    import tensorflow as tf

    c = int(model.num_classes)
    f = int(model.feature_dim)
    seen_mask = np.zeros((c,), np.float32)
    seen_mask[seen] = 1.0
    unseen_ids = np.asarray(unseen, np.int64)

    def head(features, input_name="images"):  # serving_images passes the backbone's maps
        features = guard_features(features, input_name)  # InvalidArgumentError: TF Serving INVALID_ARGUMENT
        out = model(features, training=False)
        scores = keras.ops.cast(out["logits"], "float32")  # (B, C), even if mixed
        return fused_predictions(
            guard_scores(scores, input_name), seen_mask, unseen_ids, gamma, k, out["scores_a2v"], top_attributes
        )

    num_attributes = int(model.num_attributes)

    def open_head(features, class_attributes, class_is_seen=None):
        from msdn_tf.zeroshot import normalise_rows_ops

        features = guard_features(features, "features")
        class_attributes = guard_class_rows(class_attributes, num_attributes, nonnegative)
        if class_is_seen is None:  # serving_open: every request class on the unseen side
            class_is_seen = tf.zeros(tf.shape(class_attributes)[:1], tf.bool)
        else:
            class_is_seen = guard_sides(class_is_seen, class_attributes)
        att = normalise_rows_ops(class_attributes, nonnegative)  # exactly the run's rule (§1.4)
        out = model.attribute_outputs(features)
        margin = model.bias * (1.0 - 2.0 * tf.cast(class_is_seen, tf.float32))  # +bias unseen, -bias seen
        scores = keras.ops.cast(
            model.class_logits(out["scores_a2v"], out["scores_v2a"], att, margin)["logits"], "float32"
        )
        return open_predictions(
            guard_scores(scores, "features"), class_is_seen, gamma, k, out["scores_a2v"], top_attributes
        )

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        FEATURES_SIGNATURE,
        lambda features: head(features, "features"),
        input_signature=[tf.TensorSpec((None, None, f), tf.float32, name="features")],
    )
    archive.add_endpoint(
        MAPS_SIGNATURE,
        lambda feature_maps: head(feature_maps, "feature_maps"),
        input_signature=[tf.TensorSpec((None, None, None, f), tf.float32, name="feature_maps")],
    )
    open_specs = [
        tf.TensorSpec((None, None, f), tf.float32, name="features"),
        tf.TensorSpec((None, None), tf.float32, name="class_attributes"),
    ]
    archive.add_endpoint(
        OPEN_SIGNATURE,
        lambda features, class_attributes: open_head(features, class_attributes),
        input_signature=open_specs,
    )
    archive.add_endpoint(
        OPEN_SIDED_SIGNATURE,
        lambda features, class_attributes, class_is_seen: open_head(features, class_attributes, class_is_seen),
        input_signature=open_specs + [tf.TensorSpec((None,), tf.bool, name="class_is_seen")],
    )
    if backbone is not None:
        archive.track(backbone)
        size = int(image_size)

        def images_fn(images):
            x = preprocess_image_batch(images, size, preprocessing)  # (B, S, S, 3)
            maps = backbone(x, training=False) if isinstance(backbone, keras.layers.Layer) else backbone(x)
            return head(maps)  # (B, h, w, F)

        archive.add_endpoint(
            IMAGES_SIGNATURE, images_fn, input_signature=[tf.TensorSpec((None,), tf.string, name="images")]
        )
    names = list(names)

    def metadata_fn():
        return {"metadata_json": tf.constant(meta_text), "class_names": tf.constant(names)}

    archive.add_endpoint(METADATA_SIGNATURE, tf.function(metadata_fn, input_signature=[]))
    _store_variables_once(archive)
    return archive


def _store_variables_once(archive) -> None:
    """Make the SavedModel hold each weight once, not twice.

    ``ExportArchive`` checkpoints every weight under two objects: ``variables`` (and
    ``trainable_variables`` / ``non_trainable_variables``) list the Keras variables, and
    ``_all_variables`` lists the ``tf.Variable`` each one wraps (what the endpoints capture).
    Both write the same values, so an image export of 170 MB of weights took 333 MB.
    Listing the wrapped ``tf.Variable`` objects instead makes both names refer to one
    object, which the SavedModel writes once; the loaded object still has ``variables``
    (Keras 3.15's private ``_tf_trackable``; left as is if a Keras version lacks it).
    """
    import tensorflow as tf

    trackable = getattr(archive, "_tf_trackable", None)
    for attr in ("variables", "trainable_variables", "non_trainable_variables"):
        listed = getattr(trackable, attr, None)
        if listed is None:
            continue
        unwrapped = [getattr(v, "value", v) for v in listed]
        if all(isinstance(v, tf.Variable) for v in unwrapped):
            setattr(trackable, attr, unwrapped)


def _make_temporary_folder(out_base: Path, version: int) -> Path:
    """``out_base/.tmp-<version>-<pid>-*``, after removing the ones a killed export left behind."""
    try:
        out_base.mkdir(parents=True, exist_ok=True)
        for line in remove_stale_temporaries(out_base):
            print(line, file=sys.stderr)
        # Not numeric: TF Serving only loads version folders named by an integer.
        return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{int(version)}-{os.getpid()}-", dir=out_base))
    except OSError as exc:
        raise _write_error(exc, out_base) from exc


def _write_archive(archive, tmp: Path, meta_text: str, out_base: Path) -> None:
    """The SavedModel and its metadata asset into ``tmp`` (readable by a server running as another user)."""
    import tensorflow as tf

    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a server running as another user must read it
        archive.write_out(str(tmp), verbose=False)
        (tmp / "assets").mkdir(exist_ok=True)
        (tmp / "assets" / METADATA_FILE).write_text(meta_text)
    except (OSError, tf.errors.OpError) as exc:
        raise _write_error(exc, out_base) from exc


def _run_check(check, tmp: Path, final: Path) -> None:
    """Run ``check`` on the unpublished folder; :class:`ExportCheckFailed` unless its report is ``ok``."""
    report = check(tmp)
    report["export_dir"] = str(final)
    report["checked_as"] = str(tmp)
    report["published"] = bool(report.get("ok"))
    if not report["published"]:
        raise ExportCheckFailed(
            report, f"{final} was not published: the export failed its check (checked as {tmp}, now removed)"
        )


# Temporary folders in the model base path: ``.tmp-<version>-<pid>-<random>`` while an export is
# written and checked, ``.old-<version>-<pid>-<random>`` while --overwrite swaps versions. Neither
# name is numeric, so TF Serving never loads them.
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class ExportCheckFailed(MSDNError):
    """The written export failed :func:`verify_export`; it was removed, nothing was published.

    Attributes:
        report: the :func:`verify_export` report (``published`` is False).
    """

    def __init__(self, report: dict, message: str):
        super().__init__(message)
        self.report = report


def _write_error(exc: Exception, out_base: Path) -> MSDNError:
    """One line for an operating-system failure while writing an export (exit 2 in the CLI)."""
    import re

    import tensorflow as tf

    if isinstance(exc, OSError):
        code, detail = exc.errno, exc.strerror or str(exc)
        if exc.filename and Path(exc.filename).exists():
            detail += f" at {exc.filename}"
    else:  # tf.errors.OpError from the SavedModel writer (TF maps ENOSPC to RESOURCE_EXHAUSTED)
        code = {tf.errors.ResourceExhaustedError: errno.ENOSPC, tf.errors.PermissionDeniedError: errno.EACCES}.get(
            type(exc)
        )
        detail = re.sub(r"\{\{[^}]*\}\}\s*", "", exc.message).strip().splitlines()[0][:300]
    why = _WRITE_ERRNOS.get(code, "it failed")
    todo = (
        "free disk space or pass --out on a disk with room"
        if code in (errno.ENOSPC, errno.EDQUOT)
        else f"pass a writable --out or make {out_base} writable"
    )
    return MSDNError(
        f"cannot write the export to {out_base}: {why} ({detail}); {todo}. Versions already in "
        f"{out_base} are unchanged; no partial export is left"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _folder_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def remove_stale_temporaries(out_base) -> list:
    """Clean up what a killed export left in ``out_base``; return one line per folder handled.

    ``.tmp-<version>-<pid>-*`` folders (a version being written or checked) are removed
    unless process ``pid`` still runs (another export in progress). A ``.old-<version>-*``
    folder (the previous version, moved aside by ``--overwrite``) is renamed back to
    ``<version>`` when that version folder is missing (the export was killed between the
    two renames), and removed otherwise.
    """
    out_base = Path(out_base)
    lines = []
    if not out_base.is_dir():
        return lines
    for path in sorted(out_base.iterdir()):
        if not path.is_dir() or not path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            continue
        parts = path.name.split("-")
        pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            lines.append(f"note: left {path} alone: export process {pid} is still running")
            continue
        version = parts[1] if len(parts) > 1 and parts[1].isdigit() else None
        who = f"export process {pid}, no longer running" if pid is not None else "an earlier export"
        if path.name.startswith(OLD_PREFIX) and version is not None and not (out_base / version).exists():
            os.replace(path, out_base / version)
            lines.append(
                f"note: restored {out_base / version} from {path} (left by {who} between the two "
                "renames of --overwrite)"
            )
            continue
        size = _folder_bytes(path)
        shutil.rmtree(path)
        lines.append(f"note: removed {path} ({size / 1e6:.1f} MB), a temporary export folder left by {who}")
    return lines


def _publish(tmp: Path, final: Path, version: int, out_base: Path) -> None:
    """Rename the checked ``tmp`` to ``final``; an existing ``final`` is swapped out and removed."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{int(version)}-{os.getpid()}-", dir=out_base))
    os.rmdir(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old, final)  # put the previous version back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Run directories


def backbone_for_images(
    run_dir, feature_dim: int, *, kind: str = "auto", weights: Optional[str] = None, image_size: int = 448
):
    """The backbone of ``serving_images``: ``(backbone, backbone_id, preprocessing kind)``.

    Args:
        run_dir: the run directory (its ``backbone_resnet101.npz``, written by
            ``python -m msdn_tf.convert``, is the default torchvision backbone).
        feature_dim: F of the model: the backbone must give F channels.
        kind: ``auto`` (torchvision_resnet101 when the run holds ``backbone_resnet101.npz`` or
            ``weights`` is a .pth/.pt/.npz file, else keras_resnet101), ``torchvision_resnet101``
            or ``keras_resnet101``.
        weights: torchvision: a .pth/.npz (default: the run's npz); keras: ``imagenet``
            (default), a local .h5 file or ``none``.
        image_size: the square input size.
    """
    run_backbone = Path(run_dir) / "backbone_resnet101.npz"
    if kind == "auto":
        kind = (
            "torchvision_resnet101"
            if (run_backbone.exists() or (weights or "").lower().endswith((".pth", ".pt", ".npz")))
            else "keras_resnet101"
        )
    if kind == "torchvision_resnet101":
        from msdn_tf.backbones.torchvision_resnet import load_backbone_file

        weights = weights or str(run_backbone)
        if not os.path.isfile(weights):
            raise MSDNError(
                f"--backbone torchvision_resnet101: {weights} not found (convert a released "
                "checkpoint with msdn_tf.convert, or pass --backbone-weights resnet101.pth)"
            )
        backbone, info = load_backbone_file(weights, blocks=None, image_size=image_size)
        backbone_id = (
            f"torchvision-layout ResNet (blocks {info['blocks']}, width {info['width']}) from "
            f"{os.path.basename(weights)}"
        )
        return backbone, backbone_id, "torchvision"
    if feature_dim != 2048:
        raise MSDNError(
            f"--with-images builds a ResNet-101 backbone (2048 channels) but the model "
            f"takes {feature_dim}-channel features"
        )
    from msdn_tf.backbones.keras_resnet import build_backbone

    weights = weights or "imagenet"
    backbone = build_backbone(weights, image_size)
    return backbone, f"keras.applications.ResNet101(include_top=False, weights={weights})", "keras"


def export_run(
    run_dir,
    out,
    *,
    version: int = 1,
    overwrite: bool = False,
    gamma: float = 0.0,
    top_k: int = 5,
    overrides: Sequence[str] = (),
    with_images: bool = False,
    backbone: str = "auto",
    backbone_weights=None,
    image_size: int = 448,
    verify: bool = True,
    verify_samples: int = 3,
    top_attributes: int = 5,
    classes=None,
    replace_classes: bool = False,
    added_side: str = "unseen",
    log=None,
):
    """Export a run directory: what ``python -m msdn_tf.export`` does.

    Loads the run (``overrides``: ``--set`` texts applied to its config before the class
    names are read), picks the ``serving_images`` backbone when ``with_images``
    (:func:`backbone_for_images`), and publishes ``out/<version>`` with
    :func:`export_saved_model`, checked before it is published by
    :func:`msdn_tf.serving.verify.verify_export` on ``verify_samples`` random feature maps
    unless ``verify`` is false.

    With ``classes`` (a class file, ``FILE.csv``) the run's model is first re-targeted to the
    trained classes plus the file's (``replace_classes``: the file's only), the new classes on
    the ``added_side`` of the margin and of calibrated stacking (:func:`msdn_tf.zeroshot.retarget_run`);
    every problem of the file is one error before anything is written. ``top_attributes``
    attribute ids are returned as evidence with every answer.

    Returns:
        ``(path, report)``: the published version folder and the check's report (``None``
        without the check).

    Raises:
        ExportCheckFailed: the check failed; nothing was published (``exc.report``).
        MSDNError: a bad run directory, argument or write.
    """
    from msdn_tf import zeroshot
    from msdn_tf.config import merge, parse_override
    from msdn_tf.evaluation.runs import class_names_for_run, load_run
    from msdn_tf.serving.verify import verify_export

    config, model = load_run(run_dir)
    for text in overrides:
        config = merge(config, parse_override(text), f"--set {text}")
    if replace_classes and not classes:
        raise MSDNError("--replace-classes needs --classes FILE.csv")
    semantics = zeroshot.run_class_semantics(run_dir, config, model)
    names = class_names_for_run(run_dir, config)
    class_set = None
    if classes:
        model, class_set, semantics = zeroshot.retarget_run(
            run_dir, classes, config=config, model=model, replace=replace_classes, added_side=added_side
        )
        names = class_set.names
        if log is not None:
            log(
                f"re-targeted: {sum(s == zeroshot.ADDED for s in class_set.status)} class(es) added from "
                f"{classes}, {len(names)} served ({len(class_set.unseen_classes)} on the unseen side)"
            )
    image_backbone = backbone_id = None
    preprocessing = "keras"
    if with_images:
        image_backbone, backbone_id, preprocessing = backbone_for_images(
            run_dir,
            model.feature_dim,
            kind=backbone,
            weights=backbone_weights,
            image_size=image_size,
        )
    check, reports = None, []
    if verify:
        rng = np.random.default_rng(0)
        side = max(1, image_size // 32)
        sample = np.abs(rng.standard_normal((verify_samples, side, side, model.feature_dim))).astype(np.float32)

        def check(export_dir):
            reports.append(verify_export(export_dir, model, sample, backbone=image_backbone))
            return reports[-1]

    path = export_saved_model(
        model,
        out,
        version=version,
        class_names=names,
        seen_classes=model.seen_classes,
        unseen_classes=model.unseen_classes,
        gamma=gamma,
        top_k=top_k,
        config=config,
        backbone=image_backbone,
        image_size=image_size,
        overwrite=overwrite,
        backbone_id=backbone_id,
        preprocessing=preprocessing,
        check=check,
        attribute_names=semantics.get("attribute_names"),
        classes=class_set.describe() if class_set is not None else None,
        class_file=class_set.class_file if class_set is not None else None,
        normalisation=semantics.get("normalisation"),
        top_attributes=top_attributes,
    )
    return path, (reports[-1] if reports else None)
