"""The run directory contract shared by train, evaluate, export, visualize and convert.

A run directory holds at least ``config.yaml`` (the resolved
:class:`~msdn_tf.config.Config`) and ``model.keras`` (the trained
:class:`~msdn_tf.model.MSDN`). ``python -m msdn_tf.train`` writes one;
``python -m msdn_tf.convert`` writes one from a PyTorch checkpoint. Optional:
``results.json``, ``metadata.json`` (class and attribute names).
"""

from __future__ import annotations

from pathlib import Path

from msdn_tf.config import Config, from_dict, load_yaml
from msdn_tf.errors import MSDNError

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.keras"


def load_run_config(run_dir) -> Config:
    """The resolved config of a run directory; clear error if it is not a run directory."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise MSDNError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise MSDNError(
            f"{run_dir}: not a run directory (no {CONFIG_FILE}); "
            "make one with python -m msdn_tf.train or python -m msdn_tf.convert"
        )
    return from_dict(load_yaml(path), str(path))


def load_run_model(run_dir):
    """The trained :class:`~msdn_tf.model.MSDN` of a run directory."""
    import keras

    import msdn_tf.model  # noqa: F401  (registers the custom objects)

    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise MSDNError(
            f"{path}: not found; the run has not finished (resume it with "
            f"python -m msdn_tf.train --run-dir {run_dir} --resume)"
        )
    from msdn_tf.limits import check_keras_archive

    check_keras_archive(path)  # the weight shapes its config declares, before Keras allocates them
    return keras.models.load_model(path, compile=False)


def load_run(run_dir):
    """``(config, model)`` of a run directory."""
    return load_run_config(run_dir), load_run_model(run_dir)
