"""Classify features or images with an exported MSDN served by TensorFlow Serving (library).

:func:`classify` sends inputs over gRPC or REST (:mod:`msdn_tf.serving.client_lib`) and
summarizes the answer with class names. What the command does::

    python -m msdn_tf.client --server localhost:8500 --model msdn_cub \\
        (--features FILE.npy|FILE.hdf5 [--rows 0 5 9] | --images a.jpg b.png ...) \\
        [--rest http://localhost:8501] [--top-k 5] \\
        [--metadata export/models/msdn_cub/msdn_metadata.json] [--version N] [--json]

* ``--features``: a ``.npy`` of region vectors ``(B, R, F)`` / one ``(R, F)``, or of
  channel-last maps ``(B, H, W, F)`` (channel-first ``(B, F, H, W)`` is recognised when
  the metadata gives F); or a feature-map HDF5 file (reference layout, key
  ``feature_map`` ``(N, F, H, W)``) with ``--rows`` (default row 0). Region vectors go
  to ``serving_default``, maps to ``serving_maps``.
* ``--images``: encoded JPEG/PNG files sent to ``serving_images`` (the export must
  have been made with ``--with-images``).
* gRPC (``--server``, the default transport) uses ``tensorflow-serving-api`` with
  raised message-size limits; ``--rest URL`` sends TF Serving's REST JSON instead.
* Class names come from ``--metadata`` (the ``msdn_metadata.json`` the export writes
  beside the version folders); without it they are asked from the server's
  ``metadata`` signature.

Prints, per input, the top-k class names with their (calibrated) scores, the GZSL
and CZSL predictions; ``--json`` prints the same as one JSON object. Errors (no server,
a REST URL at the gRPC port or the reverse, a refused request, a file that is not a
numeric ``.npy``) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from msdn_tf.errors import MSDNError

FEATURES_SIGNATURE = "serving_default"
MAPS_SIGNATURE = "serving_maps"
IMAGES_SIGNATURE = "serving_images"
METADATA_SIGNATURE = "metadata"


# ---------------------------------------------------------------------------------------------
# Inputs


def read_features(path, rows: Optional[Sequence[int]] = None, feature_dim: Optional[int] = None) -> np.ndarray:
    """Float32 features to send: ``(B, R, F)`` regions or ``(B, H, W, F)`` channel-last maps.

    Args:
        path: ``.npy`` (see the module docstring) or ``.hdf5``/``.h5`` (key ``feature_map``,
            channel-first ``(N, F, H, W)``).
        rows: rows to take (HDF5: default ``[0]``; ``.npy``: default all).
        feature_dim: F, if known (from the metadata), to check the shape and to
            recognise channel-first ``.npy`` maps.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise MSDNError(f"{path}: features file not found")
    low = path.lower()
    if low.endswith((".hdf5", ".h5")):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if "feature_map" not in f:
                    raise MSDNError(f"{path}: no key 'feature_map' (expected (N, F, H, W) feature maps)")
                ds = f["feature_map"]
                if ds.ndim != 4:
                    raise MSDNError(f"{path}: 'feature_map' must be (N, F, H, W), got shape {ds.shape}")
                rows = [0] if rows is None else [int(r) for r in rows]
                bad = [r for r in rows if not 0 <= r < ds.shape[0]]
                if bad:
                    raise MSDNError(f"{path}: rows {bad} outside [0, {ds.shape[0]})")
                x = np.stack([ds[r] for r in rows]).transpose(0, 2, 3, 1)  # (B, H, W, F)
        except OSError as exc:
            raise MSDNError(f"{path}: cannot read as HDF5 ({exc})") from exc
    elif low.endswith(".npy"):
        x = _load_npy(path)
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 4 and feature_dim is not None and x.shape[-1] != feature_dim and x.shape[1] == feature_dim:
            x = x.transpose(0, 2, 3, 1)  # channel-first maps
        if x.ndim not in (3, 4):
            raise MSDNError(f"{path}: expected (B, R, F), (R, F) or (B, H, W, F) features, got shape {x.shape}")
        if rows is not None:
            rows = [int(r) for r in rows]
            bad = [r for r in rows if not 0 <= r < x.shape[0]]
            if bad:
                raise MSDNError(f"{path}: rows {bad} outside [0, {x.shape[0]}) (the file holds {x.shape[0]} samples)")
            x = x[np.asarray(rows, dtype=np.int64)]
    else:
        raise MSDNError(f"{path}: unknown features file type (use .npy or .hdf5)")
    if feature_dim is not None and x.shape[-1] != feature_dim:
        raise MSDNError(
            f"{path}: features have {x.shape[-1]} channels (shape {x.shape}), the model expects {feature_dim}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise MSDNError(f"{path}: features must be numbers, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)  # TF Serving does not cast: the signature wants float32


def _load_npy(path: str) -> np.ndarray:
    """A numeric ``.npy`` array; anything else is one clear MSDNError (pickles are never loaded)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise MSDNError(f"{path}: cannot read ({exc.strerror})") from exc
    if magic != b"\x93NUMPY":
        raise MSDNError(
            f"{path}: not a .npy file (it does not start with the NumPy magic bytes); write features "
            "with numpy.save, or give a feature-map .hdf5"
        )
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise MSDNError(f"{path}: holds Python objects, not numbers; save a float32 array with numpy.save") from exc
        raise MSDNError(f"{path}: a damaged .npy file ({exc})") from exc
    except OSError as exc:
        raise MSDNError(f"{path}: a damaged .npy file ({exc})") from exc
    return x


def read_images(paths: Sequence[str]) -> list:
    """The encoded bytes of each image file."""
    out = []
    for p in paths:
        try:
            out.append(Path(p).read_bytes())
        except OSError as exc:
            raise MSDNError(f"{p}: cannot read image file ({exc})") from exc
    return out


# ---------------------------------------------------------------------------------------------
# Calls


def _predict(
    inputs: dict,
    signature: str,
    *,
    model: str,
    server: Optional[str],
    rest: Optional[str],
    version: Optional[int],
    timeout: float,
) -> dict:
    from msdn_tf.serving import client_lib

    try:
        if rest:
            return client_lib.predict_rest(
                rest, model, inputs, signature_name=signature, version=version, timeout=timeout
            )
        return client_lib.predict_grpc(
            server, model, inputs, signature_name=signature, version=version, timeout=timeout
        )
    except client_lib.PredictError as exc:
        where = rest or server
        if exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            raise ServerRefused(
                exc.code, f"no TF Serving answer from {where} ({exc.transport} {exc.code}): {_one_line(exc.message)}"
            ) from exc
        raise ServerRefused(
            exc.code, f"the server refused the request ({exc.transport} {exc.code}): {_one_line(exc.message)}"
        ) from exc


class ServerRefused(MSDNError):
    """A serving call failed; ``code`` is the gRPC status name (from :class:`client_lib.PredictError`)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def fetch_metadata(
    *,
    model: str,
    server: Optional[str] = None,
    rest: Optional[str] = None,
    version: Optional[int] = None,
    timeout: float = 30.0,
) -> dict:
    """The export's metadata, from the server's ``metadata`` signature."""
    try:
        out = _predict({}, METADATA_SIGNATURE, model=model, server=server, rest=rest, version=version, timeout=timeout)
    except ServerRefused as exc:
        if exc.code not in ("FAILED_PRECONDITION", "INVALID_ARGUMENT") or "signature" not in str(exc):
            raise  # no server, wrong model name, ...: --metadata would not help
        raise MSDNError(
            f"cannot read the class names from the server's '{METADATA_SIGNATURE}' signature ({exc}); "
            "pass --metadata MODEL_BASE/msdn_metadata.json (written by python -m msdn_tf.export)"
        ) from exc
    where = f"the '{METADATA_SIGNATURE}' signature of {model} at {rest or server}"
    try:
        text = np.asarray(out["metadata_json"]).reshape(-1)[0]
        meta = json.loads(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    except (KeyError, IndexError, ValueError) as exc:
        raise MSDNError(
            f"{where}: its metadata_json is not JSON ({type(exc).__name__}: {_one_line(exc, 200)})"
        ) from exc
    return check_metadata(meta, where)


def check_metadata(meta, source: str) -> dict:
    """The export metadata the client relies on, checked: class names, seen/unseen ids in range, finite gamma.

    Args:
        meta: the parsed ``msdn_metadata.json`` (from ``--metadata`` or the ``metadata`` signature).
        source: where it came from, named in the messages.
    """
    if not isinstance(meta, dict):
        raise MSDNError(f"{source}: the metadata is not a JSON object")
    names = meta.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise MSDNError(f"{source}: 'class_names' must be a non-empty list of strings")
    c = len(names)
    if "num_classes" in meta and meta["num_classes"] != c:
        raise MSDNError(f"{source}: {c} class_names but num_classes is {meta['num_classes']!r}")
    for key in ("seen_classes", "unseen_classes"):
        ids = meta.get(key)
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise MSDNError(f"{source}: '{key}' must be a list of class ids")
        bad = [i for i in ids if not 0 <= i < c]
        if bad:
            raise MSDNError(f"{source}: '{key}' holds ids {bad[:5]} outside the {c} class_names [0, {c})")
    gamma = meta.get("gamma")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not np.isfinite(gamma):
        raise MSDNError(f"{source}: 'gamma' must be a finite number, got {_one_line(repr(gamma), 60)}")
    return meta


def summarize(
    outputs: dict, metadata: dict, top_k: Optional[int] = None, labels: Optional[Sequence[str]] = None
) -> list:
    """Per input: ``{"input", "gzsl": {...}, "czsl": {...}, "top_k": [{"class", "name", "score"}, ...],
    "attributes": [{"id", "name", "score"}, ...]}``.

    ``attributes`` is the evidence: the export's ``top_k_attributes`` (the attributes the
    attribute->visual sub-net found most in the image), named by the metadata's
    ``attribute_names`` (``attribute_<id>`` when the export has none); absent for an
    export without attribute outputs.

    ``top_k`` larger than the export's is served from ``scores`` minus ``gamma`` on the
    seen classes (the same calibrated ranking); smaller is a prefix.
    """
    names = metadata["class_names"]
    c = np.asarray(outputs["scores"]).shape[-1]
    if c != len(names):
        raise MSDNError(
            f"the served model scores {c} classes but the metadata names {len(names)}: it describes another "
            "export (pass the msdn_metadata.json of this model version, or drop --metadata to ask the server)"
        )
    classes = np.asarray(outputs["top_k_classes"], np.int64)
    scores = np.asarray(outputs["top_k_scores"], np.float64)
    k = classes.shape[1] if top_k is None else int(top_k)
    if k < 1:
        raise MSDNError(f"--top-k must be >= 1, got {k}")
    if k > classes.shape[1]:
        calibrated = np.asarray(outputs["scores"], np.float64).copy()
        calibrated[:, np.asarray(metadata["seen_classes"], np.int64)] -= float(metadata["gamma"])
        k = min(k, calibrated.shape[1])
        classes = np.argsort(-calibrated, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(calibrated, classes, axis=1)
    gzsl = np.asarray(outputs["gzsl_class"], np.int64).reshape(-1)
    czsl = np.asarray(outputs["czsl_class"], np.int64).reshape(-1)
    unseen = set(int(i) for i in metadata["unseen_classes"])
    evidence = _attribute_evidence(outputs, metadata)
    out = []
    for b in range(classes.shape[0]):
        out.append(
            {
                "input": labels[b] if labels is not None else b,
                "gzsl": {"class": int(gzsl[b]), "name": names[int(gzsl[b])], "unseen": int(gzsl[b]) in unseen},
                # -1: a per-request vocabulary with no class on the unseen side (serving_open_sided)
                "czsl": {"class": int(czsl[b]), "name": names[int(czsl[b])] if czsl[b] >= 0 else None},
                "top_k": [
                    {"class": int(c), "name": names[int(c)], "score": float(s)}
                    for c, s in zip(classes[b, :k], scores[b, :k])
                ],
            }
        )
        if evidence is not None:
            out[-1]["attributes"] = evidence[b]
    return out


def _attribute_evidence(outputs: dict, metadata: dict):
    """Per input ``[{"id", "name", "score"}]`` from ``top_k_attributes``/``attribute_scores``, or None."""
    if "top_k_attributes" not in outputs:
        return None
    ids = np.asarray(outputs["top_k_attributes"], np.int64)
    scores = np.asarray(outputs["attribute_scores"], np.float64) if "attribute_scores" in outputs else None
    names = metadata.get("attribute_names")
    return [
        [
            {
                "id": int(i),
                "name": names[int(i)] if names else f"attribute_{int(i)}",
                "score": None if scores is None else float(scores[b, int(i)]),
            }
            for i in ids[b]
        ]
        for b in range(ids.shape[0])
    ]


def classify(
    *,
    model: str,
    server: Optional[str] = "localhost:8500",
    rest: Optional[str] = None,
    features=None,
    images: Optional[Sequence[bytes]] = None,
    metadata: Optional[dict] = None,
    top_k: Optional[int] = None,
    version: Optional[int] = None,
    labels=None,
    timeout: float = 30.0,
) -> dict:
    """Send features (``(B, R, F)`` or ``(B, H, W, F)``) or encoded images; return the summary.

    Returns:
        ``{"model", "transport", "signature", "gamma", "results": summarize(...)}``.
    """
    if (features is None) == (images is None):
        raise MSDNError("give exactly one of features or images")
    if top_k is not None and int(top_k) < 1:
        raise MSDNError(f"--top-k must be >= 1, got {top_k}")
    if not timeout > 0:
        raise MSDNError(f"--timeout must be > 0 seconds, got {timeout}")
    if metadata is None:
        metadata = fetch_metadata(model=model, server=server, rest=rest, version=version, timeout=timeout)
    else:
        metadata = check_metadata(metadata, "the metadata")
    if images is not None:
        if not images:
            raise MSDNError("no images given")
        signature, inputs = IMAGES_SIGNATURE, {"images": list(images)}
    else:
        x = np.asarray(features)
        if x.dtype != np.float32:
            raise MSDNError(f"features must be float32 (TF Serving does not cast), got {x.dtype}")
        if x.ndim == 3:
            signature, inputs = FEATURES_SIGNATURE, {"features": x}
        elif x.ndim == 4:
            signature, inputs = MAPS_SIGNATURE, {"feature_maps": x}
        else:
            raise MSDNError(f"features must be (B, R, F) or (B, H, W, F), got shape {x.shape}")
    outputs = _predict(inputs, signature, model=model, server=server, rest=rest, version=version, timeout=timeout)
    return _answer(model, rest, server, signature, summarize(outputs, metadata, top_k, labels), metadata)


def classify_open(
    *,
    model: str,
    features,
    class_attributes,
    class_names: Sequence[str],
    class_is_seen=None,
    server: Optional[str] = "localhost:8500",
    rest: Optional[str] = None,
    metadata: Optional[dict] = None,
    top_k: Optional[int] = None,
    version: Optional[int] = None,
    labels=None,
    timeout: float = 30.0,
) -> dict:
    """Classify region features ``(B, R, F)`` against a vocabulary sent with the request.

    ``class_attributes`` ``(C', K)``: one row per class in the form of the training class
    table (the export normalises the rows in its graph, as training did);
    ``class_is_seen`` ``(C',)`` bool, optional: without it every class is on the unseen
    side (``serving_open``), with it ``serving_open_sided``. Returns what :func:`classify`
    returns, with the request's class names.
    """
    if metadata is None:
        metadata = fetch_metadata(model=model, server=server, rest=rest, version=version, timeout=timeout)
    x = np.asarray(features)
    rows = np.asarray(class_attributes)
    names = [str(n) for n in class_names]
    if x.dtype != np.float32 or rows.dtype != np.float32:
        raise MSDNError(
            f"features and class_attributes must be float32 (TF Serving does not cast), got {x.dtype}, {rows.dtype}"
        )
    if rows.ndim != 2 or rows.shape[0] != len(names):
        raise MSDNError(
            f"class_attributes must be ({len(names)}, K) for {len(names)} class names, got shape {rows.shape}"
        )
    inputs = {"features": x, "class_attributes": rows}
    signature = "serving_open"
    seen = []
    if class_is_seen is not None:
        sides = np.asarray(class_is_seen, bool).reshape(-1)
        inputs["class_is_seen"] = sides
        signature = "serving_open_sided"
        seen = [int(i) for i in np.flatnonzero(sides)]
    outputs = _predict(inputs, signature, model=model, server=server, rest=rest, version=version, timeout=timeout)
    request_meta = dict(
        metadata,
        class_names=names,
        seen_classes=seen,
        unseen_classes=[i for i in range(len(names)) if i not in set(seen)],
    )
    return _answer(model, rest, server, signature, summarize(outputs, request_meta, top_k, labels), metadata)


def _answer(model, rest, server, signature, results, metadata) -> dict:
    """The reply of :func:`classify` and :func:`classify_open`: what was asked where, and the results."""
    return {
        "model": model,
        "transport": "rest" if rest else "grpc",
        "server": rest or server,
        "signature": signature,
        "gamma": float(metadata["gamma"]),
        "results": results,
    }


def format_text(answer: dict) -> str:
    lines = [
        f"model {answer['model']} via {answer['transport']} {answer['server']} "
        f"(signature {answer['signature']}, gamma {answer['gamma']:g})"
    ]
    for r in answer["results"]:
        tag = " (unseen)" if r["gzsl"]["unseen"] else " (seen)"
        lines.append(f"{r['input']}: GZSL {r['gzsl']['name']}{tag}; CZSL {r['czsl']['name']}")
        if r.get("attributes"):
            lines.append(f"  seen: {', '.join(a['name'] for a in r['attributes'])}")
        for i, t in enumerate(r["top_k"], 1):
            lines.append(f"  {i}. {t['name']:<40s} {t['score']:.4f}")
    return "\n".join(lines)
