"""The run directory contract shared by train, evaluate, export, visualize and convert.

A run directory holds at least ``config.yaml`` (the resolved
:class:`~msdn_tf.config.Config`) and ``model.keras`` (the trained
:class:`~msdn_tf.model.MSDN`). ``python -m msdn_tf.train`` writes one;
``python -m msdn_tf.convert`` writes one from a PyTorch checkpoint. Optional:
``results.json``, ``metadata.json`` (class and attribute names).
"""

from __future__ import annotations

import json
from pathlib import Path

from msdn_tf.config import Config, from_dict, load_yaml
from msdn_tf.errors import MSDNError

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.keras"


def load_run_config(run_dir) -> Config:
    """The resolved config of a run directory; clear error if it is not a run directory."""
    from msdn_tf.runlock import writer_of

    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise MSDNError(f"{run_dir}: run directory not found")
    writer = writer_of(run_dir)
    if writer and not (run_dir / MODEL_FILE).is_file():
        raise MSDNError(f"{run_dir} is being written by {writer}; it has no {MODEL_FILE} yet: wait for it to finish")
    if not path.is_file():
        raise MSDNError(
            f"{run_dir}: not a run directory (no {CONFIG_FILE}); "
            "make one with python -m msdn_tf.train or python -m msdn_tf.convert"
        )
    return from_dict(load_yaml(path), str(path))


def load_run_model(run_dir, log=None):
    """The trained :class:`~msdn_tf.model.MSDN` of a run directory.

    Refuses, in one line naming the file: a run being written by another process that
    has no model yet (instead of advising ``--resume``), a file Keras cannot read, a
    model that is not an MSDN, and a model holding code (a ``Lambda`` layer: Keras' safe
    mode stays on, nothing in the file is executed). A run being written that already
    holds a model (a resume, an ``--overwrite``) is read with a note on stderr.
    """
    import sys
    import zipfile

    import keras

    from msdn_tf.limits import check_keras_archive
    from msdn_tf.model import MSDN
    from msdn_tf.runlock import writer_of

    path = Path(run_dir) / MODEL_FILE
    writer = writer_of(run_dir)
    if not path.is_file():
        if writer:
            raise MSDNError(
                f"{run_dir} is being written by {writer}; it has no {MODEL_FILE} yet: wait for it to finish"
            )
        raise MSDNError(
            f"{path}: not found; the run has not finished (resume it with "
            f"python -m msdn_tf.train --run-dir {run_dir} --resume)"
        )
    if writer:
        (log or (lambda t: print(t, file=sys.stderr)))(
            f"note: {run_dir} is being written by {writer}; reading the {MODEL_FILE} it holds now"
        )
    check_keras_archive(path)  # the weight shapes its config declares, before Keras allocates them
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile, AttributeError) as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if "lambda" in detail.lower():
            raise MSDNError(
                f"{path}: holds a Lambda layer (Python code); msdn-tf never loads code from a model "
                "file: use a model.keras written by msdn-tf"
            ) from exc
        raise MSDNError(
            f"{path}: not a Keras model file msdn-tf can read ({type(exc).__name__}: {detail}); "
            "write it again with python -m msdn_tf.train or python -m msdn_tf.convert"
        ) from exc
    if not isinstance(model, MSDN):
        raise MSDNError(
            f"{path}: holds a {type(model).__name__}, not an MSDN model; evaluate, export and visualize "
            "need the model.keras that python -m msdn_tf.train or python -m msdn_tf.convert wrote"
        )
    return model


def load_run(run_dir):
    """``(config, model)`` of a run directory."""
    return load_run_config(run_dir), load_run_model(run_dir)


def class_names_for_run(run_dir, config) -> list:
    """Class names of a run: ``RUN/metadata.json`` ``class_names`` if present, else the dataset's."""
    meta_path = Path(run_dir) / "metadata.json"
    if meta_path.is_file():
        try:
            names = json.loads(meta_path.read_text()).get("class_names")
        except (OSError, ValueError) as exc:
            raise MSDNError(f"{meta_path}: not valid JSON ({exc})") from exc
        if names is not None:
            return [str(n) for n in names]
    from msdn_tf.data.registry import load_dataset

    try:
        return list(load_dataset(config).class_names)  # feature maps stay on disk: only metadata is read
    except MSDNError as exc:
        raise MSDNError(
            f"cannot get the class names of {run_dir}: no metadata.json with 'class_names' and the "
            f"dataset does not load ({exc}); pass --set data.data_dir=... or add "
            f"{meta_path}"
        ) from exc
