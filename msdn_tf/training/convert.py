"""Convert the authors' PyTorch MSDN checkpoints into an msdn-tf run directory (library).

Command::

    python -m msdn_tf.convert --torch-checkpoint CUB_MSDN_GZSL.pth --dataset cub \\
        --out runs/cub-official-gzsl [--data-dir data/CUB] [--set section.key=value ...]

The released files ``{CUB,SUN,AWA2}_MSDN_{CZSL,GZSL}.pth`` (docs/reference.md §9)
are ``torch.save`` state_dicts. They are read by
:mod:`msdn_tf.interop.torch_checkpoint` (no torch needed; a restricted unpickler that
executes nothing from the file) and written as a run directory that
``msdn_tf.evaluation.runs.load_run``, evaluation and export accept:

* ``config.yaml``: the dataset's resolved config (``configs/<dataset>.yaml``
  plus ``--set`` overrides; ``model.bias`` is the checkpoint's ``bias``);
* ``model.keras``: an :class:`~msdn_tf.model.MSDN` holding the checkpoint's
  weights. The Keras weights have the reference names and layouts, so every
  key maps by name with no transpose (:data:`~msdn_tf.interop.torch_checkpoint.MSDN_KEY_MAP`);
* ``conversion.json``: the report (source file and sha256, mapped keys with
  shapes and dtypes, ignored keys and why, backbone tensors found, ``bias``,
  seen/unseen classes derived from ``mask_bias``, metadata checks, warnings);
* ``metadata.json``: class and attribute names, when ``--data-dir`` has them.

Checks (each failure is a :class:`~msdn_tf.errors.DataError` naming the file,
the key, the shape found and the shape expected; the command exits with 2 and
writes nothing):

* the MSDN keys are present and mutually consistent (``V`` (K, D), ``att``
  (C, K), ``W_1``/``W_2``/``W_2_1`` (D, F), ``W_1_1`` (F, D), ``bias`` scalar,
  ``mask_bias`` (1, C)); D and F are taken from the checkpoint;
* K and C equal the dataset's (the table's expected sizes for cub/sun/awa2,
  and the actual ``att_splits.mat`` when ``--data-dir`` is given); a dataset
  name that is not in the table (e.g. ``custom``) takes K and C from the
  checkpoint and the config from the defaults;
* every value is finite and ``mask_bias`` holds only +1 (unseen) and -1
  (seen), with at least one unseen class; the derived seen/unseen classes must
  equal those of ``att_splits.mat`` (seen = labels of ``trainval_loc``, unseen
  = labels of ``test_unseen_loc``, labels from the image list) and their counts
  those of the table.

A checkpoint ``att`` that differs from the one recomputed from
``att_splits.mat`` (§1.4) by more than 1e-4 is reported as a warning, not an
error. Backbone tensors (any key outside the MSDN and ignored sets) are
counted and reported. When they include the ``resnet101.<child>.*`` trunk of the
released files, it is checked tensor by tensor (missing, extra or wrong-shape
tensors are errors naming the key) and stored as ``backbone_resnet101.npz``
(torchvision key names, float32) so that ``msdn_tf.export --with-images`` serves the
checkpoint's own backbone from images.
All weights are cast to float32.

Library use (what the tests call)::

    from msdn_tf.training.convert import convert_checkpoint
    report = convert_checkpoint("CUB_MSDN_GZSL.pth", "cub", "runs/cub-gzsl", data_dir="data/CUB")
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from msdn_tf.config import MAX_BIAS
from msdn_tf.errors import DataError, MSDNError
from msdn_tf.interop.torch_checkpoint import MSDN_KEY_MAP, backbone_prefixes, read_torch_state_dict, split_state_dict

REPORT_FILE = "conversion.json"
METADATA_FILE = "metadata.json"
ATT_TOLERANCE = 1e-4

#: Reference key -> (attribute path on the MSDN model). Layer names follow
#: :data:`msdn_tf.interop.torch_checkpoint.MSDN_KEY_MAP`.
_MODEL_ATTRS = {
    "V": ("embedding", "V"),
    "att": ("embedding", "att"),
    "W_1": ("a2v", "W_1"),
    "W_2": ("a2v", "W_2"),
    "W_1_1": ("v2a", "W_1_1"),
    "W_2_1": ("v2a", "W_2_1"),
    "bias": (None, "bias"),
    "mask_bias": (None, "mask_bias"),
}
_MATRIX_KEYS = ("V", "att", "W_1", "W_2", "W_1_1", "W_2_1")
#: The checkpoint's ResNet trunk (torchvision keys, float32) in the run directory.
BACKBONE_FILE = "backbone_resnet101.npz"
_RUN_FILES = ("config.yaml", "model.keras", REPORT_FILE, METADATA_FILE, BACKBONE_FILE)
# what a trained run adds; all of it is replaced by --overwrite (never kept beside the converted model)
_TRAINED_RUN = ("checkpoint", "tensorboard", "results.json", "results.md")

_RELEASED_NAME = re.compile(r"^(CUB|SUN|AWA2)_MSDN_(CZSL|GZSL)\.pth?$", re.IGNORECASE)

__all__ = ["convert_checkpoint", "convert_state_dict", "summary"]


# --------------------------------------------------------------------------- helpers
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dataset_spec(dataset: str):
    """The dataset table's row, or None for a name outside it (``custom``)."""
    from msdn_tf.data.registry import DATASETS

    return DATASETS.get(dataset)


def _released_variant(source: str) -> Optional[dict]:
    """``{"dataset": "cub", "variant": "GZSL"}`` for the authors' file names, else None."""
    match = _RELEASED_NAME.match(os.path.basename(str(source)))
    if not match:
        return None
    return {"dataset": match.group(1).lower(), "variant": match.group(2).upper()}


def _to_float32(key: str, value, source: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{source}: '{key}' has dtype {arr.dtype}, expected a real number type")
    out = arr.astype(np.float32)
    if not np.all(np.isfinite(out)):
        bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
        raise DataError(f"{source}: '{key}' holds {bad} NaN or infinite value(s) (as float32)")
    return out


def _check_dataset_shapes(
    weights: Mapping[str, np.ndarray], source: str, K: Optional[int], C: Optional[int], where: str
) -> None:
    """K and C of the checkpoint against the dataset's; error names key, found and expected."""
    D = weights["V"].shape[1]
    if K is not None and weights["V"].shape[0] != K:
        raise DataError(
            f"{source}: 'V' has shape {weights['V'].shape}, expected ({K}, D) "
            f"({K} attributes in {where}; D = {D} from the checkpoint)"
        )
    if K is not None and C is not None and weights["att"].shape != (C, K):
        raise DataError(
            f"{source}: 'att' has shape {weights['att'].shape}, expected ({C}, {K}) "
            f"({C} classes x {K} attributes in {where})"
        )
    if C is not None and weights["mask_bias"].size != C:
        raise DataError(
            f"{source}: 'mask_bias' has shape {weights['mask_bias'].shape}, expected (1, {C}) ({C} classes in {where})"
        )


def _classes_from_mask(mask: np.ndarray, source: str):
    mask = mask.reshape(-1)
    bad = np.flatnonzero((mask != 1.0) & (mask != -1.0))
    if bad.size:
        raise DataError(
            f"{source}: 'mask_bias' must hold +1 (unseen) or -1 (seen) for every class, "
            f"found {mask[bad[0]]!r} at class {int(bad[0])} ({bad.size} such entries)"
        )
    unseen = np.flatnonzero(mask == 1.0).tolist()
    seen = np.flatnonzero(mask == -1.0).tolist()
    if not unseen:
        raise DataError(f"{source}: 'mask_bias' marks no class as unseen (+1); zero-shot evaluation needs at least one")
    return seen, unseen


def _describe_classes(ids, names=None, limit=8) -> str:
    ids = list(ids)
    shown = [f"{i} ({names[i]})" if names and i < len(names) else str(i) for i in ids[:limit]]
    return ", ".join(shown) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _load_metadata(data_dir: str, dataset: str, nonnegative: bool) -> dict:
    """Class/attribute metadata of ``data_dir`` (xlsa17 layout), as far as it is there."""
    from msdn_tf.data.base import class_attributes_for_model
    from msdn_tf.data.xlsa17 import (
        check_consistency,
        find_xlsa17_files,
        load_att_splits,
        load_attribute_names,
        load_images,
    )

    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} does not exist or is not a directory")
    files = find_xlsa17_files(data_dir, dataset)
    splits = load_att_splits(files["att_splits"])
    C, K = splits["att"].shape
    meta = {
        "att_splits": files["att_splits"],
        "K": K,
        "C": C,
        "class_names": list(splits["allclasses_names"]),
        "att": class_attributes_for_model(splits["att"], nonnegative=nonnegative),
        "image_list": files["image_list"],
        "seen": None,
        "unseen": None,
        "attribute_names": None,
        "attribute_names_file": files["attribute_names"],
    }
    if files["attribute_names"]:
        names = load_attribute_names(files["attribute_names"])
        if len(names) != K:
            raise DataError(
                f"{files['attribute_names']}: {len(names)} attribute names but 'att' of "
                f"{files['att_splits']} has {K} attributes"
            )
        meta["attribute_names"] = names
    if files["image_list"]:
        images = load_images(files["image_list"])
        labels = images["labels"]
        check_consistency(splits, labels, labels_path=files["image_list"])
        meta["seen"] = np.unique(labels[splits["trainval_loc"]]).tolist()
        meta["unseen"] = np.unique(labels[splits["test_unseen_loc"]]).tolist()
    return meta


# --------------------------------------------------------------------------- conversion
def convert_checkpoint(
    path, dataset: str, out_dir, data_dir: Optional[str] = None, overrides: Sequence[str] = (), overwrite: bool = False
) -> dict:
    """Convert a PyTorch MSDN state_dict file into a run directory.

    Args:
        path: the ``.pth`` file (torch zip format), e.g. ``CUB_MSDN_GZSL.pth``.
        dataset: ``cub``, ``sun``, ``awa2`` (sizes and config checked against the
            dataset table and ``configs/<dataset>.yaml``), or any other name such as
            ``custom`` (config defaults, K and C from the checkpoint).
        out_dir: the run directory to write (created; must not already hold a
            run unless ``overwrite``).
        data_dir: optional folder with ``att_splits.mat`` (and ideally the image
            list and attribute names): enables the class/attribute checks and
            ``metadata.json``. Also stored as ``data.data_dir`` in the config.
        overrides: ``section.key=value`` config overrides (as ``--set``).
        overwrite: replace the run files of an existing run directory.

    Returns:
        The report written to ``out_dir/conversion.json``.

    Raises:
        DataError: unreadable, unsafe or inconsistent checkpoint, or one that
            does not match the dataset (nothing is written then).
        ConfigError: a bad override.
    """
    path = os.fspath(path)
    state = read_torch_state_dict(path)
    source = {
        "path": os.path.abspath(path),
        "file_name": os.path.basename(path),
        "size_bytes": os.path.getsize(path),
        "sha256": _sha256(path),
    }
    return convert_state_dict(
        state, dataset, out_dir, data_dir=data_dir, overrides=overrides, overwrite=overwrite, source=source
    )


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    dataset: str,
    out_dir,
    data_dir: Optional[str] = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    source: Optional[dict] = None,
) -> dict:
    """Like :func:`convert_checkpoint` for a state_dict already in memory (key -> numpy array).

    ``source`` describes where it came from (``path``, ``sha256``, ...) for the report.
    """
    from msdn_tf.config import resolve_config

    source = dict(source or {"path": "<state_dict>"})
    name = source.get("path", "<state_dict>")
    out_dir = Path(out_dir)
    warnings = []

    # Config first: a bad --set fails before anything heavy.
    overrides = list(overrides)
    config = resolve_config(dataset, overrides=overrides)
    dataset = config.data.dataset  # case-insensitive: --dataset CUB is cub
    if data_dir and not any(o.split("=", 1)[0].strip() == "data.data_dir" for o in overrides):
        config.data.data_dir = str(data_dir)  # set directly: a path need not be valid YAML
    spec = _dataset_spec(dataset)

    msdn, ignored, backbone = split_state_dict(state, source=name)
    original_dtypes = {k: str(np.asarray(v).dtype) for k, v in msdn.items()}
    weights = {k: _to_float32(k, v, name) for k, v in msdn.items()}
    weights["mask_bias"] = weights["mask_bias"].reshape(1, -1)
    bias = float(weights["bias"].reshape(()))
    K, D = weights["V"].shape
    C = weights["att"].shape[0]
    F = weights["W_1"].shape[1]

    # Sizes against the dataset table, then against the actual metadata files.
    seen, unseen = _check_against_table(weights, name, dataset, spec)
    meta, metadata_report = _check_against_metadata(weights, name, dataset, spec, data_dir, seen, unseen, warnings)
    variant = _released_variant(source.get("file_name", name))
    if variant and spec is not None and variant["dataset"] != dataset:
        warnings.append(f"the file name says {variant['dataset']} but --dataset is {dataset}")
    if not math.isfinite(bias) or abs(bias) > MAX_BIAS:
        raise DataError(
            f"{name}: 'bias' is {bias:g}; the margin must be a finite number in [-{MAX_BIAS:g}, {MAX_BIAS:g}] "
            "(the released checkpoints hold 1): with this one every image would be scored as one class"
        )
    _use_checkpoint_bias(config, bias, overrides, warnings)

    from msdn_tf.backbones.torchvision_resnet import trunk_from_checkpoint

    trunk = trunk_from_checkpoint(backbone, name)
    if trunk is not None and trunk[0]["conv1.weight"].shape[0] * 32 != F:
        raise DataError(
            f"{name}: the resnet101.* trunk gives {trunk[0]['conv1.weight'].shape[0] * 32} channels but "
            f"W_1 expects F = {F}"
        )

    # Everything is checked: build, fill and save the Keras model.
    _check_out_dir(out_dir, overwrite)
    model = _build_model(config, weights, K, D, F, C, seen, unseen)
    # built beside --out, then swapped in: a kill leaves either the old run or the new one, never a mix
    _recover_interrupted_swap(out_dir)
    stage = out_dir.parent / f".{out_dir.name}.convert-new-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    try:
        files = _write_run(stage, config, model, weights, meta)
        files += _write_backbone(stage, trunk)
        report_path = stage / REPORT_FILE

        report = {
            "source": source,
            "released_checkpoint": variant,
            "dataset": dataset,
            "dataset_in_table": spec is not None,
            "out_dir": str(out_dir),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "msdn_tf_version": _version(),
            "sizes": {"K": int(K), "D": int(D), "F": int(F), "C": int(C)},
            "mapped_keys": _mapped_keys(model, msdn, original_dtypes),
            "cast_to_float32": {k: f"{d} -> float32" for k, d in original_dtypes.items() if d != "float32"},
            "ignored_keys": {k: ignored[k] for k in ignored},
            "backbone": _backbone_report(backbone, trunk),
            "bias": bias,
            "mask_bias": {
                "seen_classes": seen,
                "unseen_classes": unseen,
                "num_seen": len(seen),
                "num_unseen": len(unseen),
            },
            "config": {
                "fusion_weights": list(config.model.fusion_weights),
                "normalize_attribute_vectors": config.model.normalize_attribute_vectors,
                "overrides": list(overrides),
            },
            "metadata": metadata_report,
            "warnings": warnings,
            "files": files,
        }
        from msdn_tf.utils import write_json

        write_json(report_path, report)
        _swap_in(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return report


def _is_run_entry(name: str) -> bool:
    return name in _RUN_FILES or name in _TRAINED_RUN


def _swap_in(stage: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``stage`` with two renames; other files of ``out_dir`` are carried over.

    Every run file of the old run (model, config, checkpoint, results, TensorBoard events,
    metadata, backbone) goes; anything else in ``out_dir`` (the run lock, the user's own
    files) moves into the new folder first.
    """
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage, out_dir)
        return
    for entry in out_dir.iterdir():
        if not _is_run_entry(entry.name):
            os.replace(entry, stage / entry.name)
    old = out_dir.parent / f".{out_dir.name}.convert-old-{os.getpid()}"
    os.replace(out_dir, old)
    os.replace(stage, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _recover_interrupted_swap(out_dir: Path) -> None:
    """Undo what a convert killed between its two renames left: restore ``out_dir``, drop stale stages."""
    import sys

    for entry in sorted(out_dir.parent.glob(f".{out_dir.name}.convert-*-*")) if out_dir.parent.is_dir() else []:
        pid = entry.name.rsplit("-", 1)[1]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if entry.name.startswith(f".{out_dir.name}.convert-old-") and not out_dir.exists():
            os.replace(entry, out_dir)
            print(
                f"note: restored {out_dir} from {entry} (a convert --overwrite, process {pid}, was killed "
                "between its two renames)",
                file=sys.stderr,
            )
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_against_table(weights: Mapping[str, np.ndarray], name: str, dataset: str, spec):
    """The sizes of the weights against the dataset table; returns the (seen, unseen) classes of ``mask_bias``."""
    expected = dict(spec.expected) if spec is not None else {}
    if "attributes" in expected or "classes" in expected:
        _check_dataset_shapes(
            weights, name, expected.get("attributes"), expected.get("classes"), f"the dataset table's {dataset}"
        )
    seen, unseen = _classes_from_mask(weights["mask_bias"], name)
    want = (expected.get("seen_classes", len(seen)), expected.get("unseen_classes", len(unseen)))
    if want != (len(seen), len(unseen)):
        raise DataError(
            f"{name}: 'mask_bias' marks {len(seen)} seen and {len(unseen)} unseen classes "
            f"but {dataset} has {want[0]} seen and {want[1]} unseen (is this a checkpoint "
            "of another dataset?)"
        )
    return seen, unseen


def _check_against_metadata(weights, name, dataset, spec, data_dir, seen, unseen, warnings: list):
    """The weights against the metadata files in ``data_dir`` (when given): ``(meta or None, report)``.

    Sizes and seen/unseen classes that differ are errors; an ``att`` that differs is a warning
    appended to ``warnings``.
    """
    if not data_dir:
        return None, {"data_dir": None}
    nonnegative = bool(spec.nonnegative_att) if spec is not None else False
    meta = _load_metadata(str(data_dir), dataset, nonnegative)
    _check_dataset_shapes(weights, name, meta["K"], meta["C"], meta["att_splits"])
    report = {
        "data_dir": str(data_dir),
        "att_splits": meta["att_splits"],
        "image_list": meta["image_list"],
        "attribute_names_file": meta["attribute_names_file"],
    }
    diff = float(np.max(np.abs(weights["att"].astype(np.float64) - meta["att"])))
    report["att_max_abs_diff"] = diff
    if diff > ATT_TOLERANCE:
        warnings.append(
            f"'att' differs from the one recomputed from {meta['att_splits']} "
            f"(docs/reference.md §1.4) by up to {diff:.3g} (> {ATT_TOLERANCE:g}); the "
            "checkpoint's att is used"
        )
    if meta["seen"] is None:
        report["seen_unseen_match"] = None
        warnings.append(
            f"no image list (image_list.npz or res101.mat) beside {meta['att_splits']}: "
            "the seen/unseen classes of 'mask_bias' were not checked against it"
        )
        return meta, report
    for what, mine, theirs, loc in (
        ("seen", seen, meta["seen"], "trainval_loc"),
        ("unseen", unseen, meta["unseen"], "test_unseen_loc"),
    ):
        if mine != theirs:
            only_ckpt = sorted(set(mine) - set(theirs))
            only_meta = sorted(set(theirs) - set(mine))
            raise DataError(
                f"{name}: the {what} classes of 'mask_bias' ({len(mine)}) differ from those of "
                f"{meta['att_splits']} (labels of '{loc}', {len(theirs)}): only in the "
                f"checkpoint: [{_describe_classes(only_ckpt, meta['class_names'])}]; only in "
                f"the metadata: [{_describe_classes(only_meta, meta['class_names'])}]"
            )
    report["seen_unseen_match"] = True
    return meta, report


def _use_checkpoint_bias(config, bias: float, overrides: Sequence[str], warnings: list) -> None:
    """The checkpoint's margin ``bias`` wins over the config's (a ``--set model.bias`` gets a warning)."""
    if config.model.bias != bias:
        if any(o.split("=", 1)[0].strip() == "model.bias" for o in overrides):
            warnings.append(f"--set model.bias={config.model.bias:g} ignored: the checkpoint's bias {bias:g} is used")
        config.model.bias = bias


def _write_backbone(out_dir: Path, trunk) -> list:
    """Store the checkpoint's ResNet trunk (or remove a stale one); returns the files written."""
    from msdn_tf.backbones.torchvision_resnet import save_trunk_npz

    stale_backbone = out_dir / BACKBONE_FILE
    if trunk is not None:
        save_trunk_npz(out_dir / BACKBONE_FILE, *trunk)
        return [BACKBONE_FILE]
    if stale_backbone.exists():
        stale_backbone.unlink()  # --overwrite: do not leave another checkpoint's backbone behind
    return []


def _mapped_keys(model, msdn: Mapping[str, np.ndarray], original_dtypes: Mapping[str, str]) -> dict:
    """Report rows: each reference key with its shape, dtype and the Keras weight it filled."""
    mapped = {}
    for key in MSDN_KEY_MAP:
        var = _model_variable(model, key)
        mapped[key] = {
            "shape": list(np.shape(msdn[key])),
            "dtype": original_dtypes[key],
            "keras_weight": var.path,
            "keras_shape": list(var.shape),
            "role": MSDN_KEY_MAP[key][2],
        }
    return mapped


def _backbone_report(backbone: Mapping[str, np.ndarray], trunk) -> dict:
    """Report section on the checkpoint's backbone tensors and whether a trunk was stored."""
    return {
        "count": len(backbone),
        "prefixes": backbone_prefixes(backbone),
        "total_parameters": int(sum(int(np.size(v)) for v in backbone.values())),
        "loaded": trunk is not None,
        "stored": BACKBONE_FILE if trunk is not None else None,
        "architecture": (
            {"blocks": list(trunk[1]), "width": trunk[2], "tensors": len(trunk[0])} if trunk is not None else None
        ),
        "note": (
            f"resnet101.* trunk stored as {BACKBONE_FILE} (torchvision keys); "
            "msdn_tf.export --with-images serves from it"
            if trunk is not None
            else "backbone tensors are reported, not loaded: no resnet101.* trunk"
            if backbone
            else "none found"
        ),
    }


def _version() -> str:
    from msdn_tf import __version__

    return __version__


def _model_variable(model, key):
    layer, attr = _MODEL_ATTRS[key]
    owner = model if layer is None else getattr(model, layer)
    return getattr(owner, attr)


def _build_model(config, weights: Dict[str, np.ndarray], K, D, F, C, seen, unseen):
    from msdn_tf.model import MSDN

    m, loss = config.model, config.loss
    model = MSDN(
        num_classes=C,
        num_attributes=K,
        feature_dim=F,
        seen_classes=seen,
        unseen_classes=unseen,
        embed_dim=D,
        normalize_attribute_vectors=m.normalize_attribute_vectors,
        fusion_weights=m.fusion_weights,
        branches=m.branches,
        attention=m.attention,
        bias=float(weights["bias"].reshape(())),
        lambda_cal=loss.lambda_cal,
        distill_weight=loss.distill_weight,
        cross_entropy=loss.cross_entropy,
        calibration=loss.calibration,
        distillation=loss.distillation,
        seed=config.train.seed,
    )
    model.build((None, None, F))
    for key in MSDN_KEY_MAP:
        var = _model_variable(model, key)
        value = weights[key].reshape(tuple(var.shape))
        var.assign(value)
    return model


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MSDNError(f"--out {out_dir} exists and is not a directory")
    present = [f for f in (*_RUN_FILES, *_TRAINED_RUN) if (out_dir / f).exists()]
    if present and not overwrite:
        raise MSDNError(
            f"--out {out_dir} already holds a run ({', '.join(present)}); choose another directory or pass --overwrite"
        )


def _write_run(out_dir: Path, config, model, weights, meta) -> list:
    """Write config.yaml, model.keras (verified by reloading) and metadata.json."""
    import keras

    from msdn_tf.config import save_config
    from msdn_tf.utils import atomic_path, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / METADATA_FILE
    if stale.exists() and meta is None:
        stale.unlink()  # --overwrite without metadata: do not leave another run's names behind
    save_config(config, out_dir / "config.yaml")
    with atomic_path(out_dir / "model.keras") as tmp:
        model.save(tmp)
        reloaded = keras.models.load_model(tmp, compile=False)
        for key in MSDN_KEY_MAP:
            got = np.asarray(_model_variable(reloaded, key)).reshape(weights[key].shape)
            if not np.array_equal(got, weights[key]):
                raise MSDNError(f"internal error: '{key}' changed when model.keras was reloaded")
    written = ["config.yaml", "model.keras", REPORT_FILE]
    if meta is not None:
        write_json(
            out_dir / METADATA_FILE,
            {
                "dataset": config.data.dataset,
                "source": meta["att_splits"],
                "class_names": meta["class_names"],
                "attribute_names": meta["attribute_names"],
                "seen_classes": meta["seen"],
                "unseen_classes": meta["unseen"],
            },
        )
        written.append(METADATA_FILE)
    return written


# --------------------------------------------------------------------------- readable summary
def summary(report: dict) -> str:
    """A readable multi-line summary of a conversion report."""
    s = report["sizes"]
    mask = report["mask_bias"]
    back = report["backbone"]
    lines = [
        f"converted {report['source'].get('path')} ({report['dataset']}"
        + (f", {report['released_checkpoint']['variant']} checkpoint" if report.get("released_checkpoint") else "")
        + ")",
        f"  sha256     {report['source'].get('sha256', '-')}",
        f"  sizes      K={s['K']} attributes, D={s['D']}, F={s['F']}, C={s['C']} classes "
        f"({mask['num_seen']} seen, {mask['num_unseen']} unseen from mask_bias)",
        "  mapped     " + ", ".join(f"{k} {tuple(v['shape'])}" for k, v in report["mapped_keys"].items()),
        "  ignored    " + (", ".join(f"{k} ({r})" for k, r in report["ignored_keys"].items()) or "none"),
        f"  backbone   {back['count']} tensor{'' if back['count'] == 1 else 's'}, "
        f"{back['total_parameters']:,} parameters"
        + (
            " ("
            + ", ".join(f"{n} under '{p}'" if p else f"{n} without prefix" for p, n in back["prefixes"].items())
            + (f"; trunk stored as {back['stored']})" if back.get("stored") else "; reported, not loaded)")
            if back["count"]
            else ""
        ),
        f"  bias       {report['bias']:g}",
        f"  fusion     {report['config']['fusion_weights']} (A->V, V->A)",
    ]
    if report["cast_to_float32"]:
        lines.append("  cast       " + ", ".join(f"{k}: {v}" for k, v in report["cast_to_float32"].items()))
    meta = report["metadata"]
    if meta.get("data_dir"):
        lines.append(
            f"  metadata   {meta['att_splits']}: att max |diff| {meta['att_max_abs_diff']:.3g}, "
            f"seen/unseen {'match' if meta.get('seen_unseen_match') else 'not checked'}"
        )
    for w in report["warnings"]:
        lines.append(f"  WARNING    {w}")
    lines.append(f"  run dir    {report['out_dir']} ({', '.join(report.get('files', []))})")
    return "\n".join(lines)
