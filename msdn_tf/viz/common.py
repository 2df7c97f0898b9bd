"""Helpers shared by the visualisations: names, splits, region grids, headless figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from msdn_tf.errors import DataError, MSDNError
from msdn_tf.limits import load_json_file
from msdn_tf.utils import atomic_path

SPLITS = ("test_unseen", "test_seen", "trainval")
EMBEDDING_SPLITS = ("test", "test_unseen", "test_seen", "trainval")
METADATA_FILE = "metadata.json"


class Names:
    """Class and attribute names of a run, with seen/unseen membership.

    Args:
        class_names: ``C`` names.
        attribute_names: ``K`` names.
        unseen_classes: unseen class ids.
        source: where the names came from (for notes in figures and logs).
    """

    def __init__(
        self, class_names: Sequence[str], attribute_names: Sequence[str], unseen_classes, source: str = "dataset"
    ):
        self.class_names = [str(n) for n in class_names]
        self.attribute_names = [str(n) for n in attribute_names]
        self.unseen = set(int(c) for c in unseen_classes)
        self.source = source

    def class_info(self, class_id) -> dict:
        c = int(class_id)
        return {"id": c, "name": self.class_names[c], "seen": c not in self.unseen}

    @classmethod
    def from_data(cls, data) -> "Names":
        return cls(data.class_names, data.attribute_names, data.unseen_classes, source=data.source)

    @classmethod
    def for_model(cls, model, run_dir=None, data=None, log=print) -> "Names":
        """Names from ``data``, else ``<run>/metadata.json``, else placeholders (with a note)."""
        C, K = model.num_classes, model.num_attributes
        if data is not None:
            return cls.from_data(data)
        path = Path(run_dir) / METADATA_FILE if run_dir is not None else None
        if path is not None and path.is_file():
            try:
                meta = load_json_file(path, "metadata")
                classes, attributes = meta["class_names"], meta["attribute_names"]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}: expected JSON with 'class_names' and 'attribute_names' ({exc})") from exc
            if len(classes) != C or len(attributes) != K:
                raise DataError(
                    f"{path}: {len(classes)} class and {len(attributes)} attribute names, "
                    f"the model has {C} classes and {K} attributes"
                )
            return cls(classes, attributes, model.unseen_classes, source=str(path))
        log("note: no dataset or metadata.json for names; using class_<id> and attribute_<id>")
        return cls(
            [f"class_{c}" for c in range(C)],
            [f"attribute_{k}" for k in range(K)],
            model.unseen_classes,
            source="placeholders",
        )


def split_rows(data, split: str) -> np.ndarray:
    """Row indices of a split; ``test`` is test_seen followed by test_unseen."""
    if split == "test":
        return np.concatenate([data.test_seen_loc, data.test_unseen_loc])
    if split not in SPLITS:
        raise MSDNError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return np.asarray(getattr(data, f"{split}_loc"))


def region_grid(num_regions: int, map_shape: Optional[Sequence[int]] = None) -> tuple:
    """``(H, W)`` of the region grid: from metadata if given, else ``sqrt(R)`` (square maps).

    Regions are row-major over the map (``r = h * W + w``), as the feature files store them.
    A non-square ``R`` without metadata is drawn as a ``1 x R`` strip.
    """
    R = int(num_regions)
    if map_shape is not None:
        h, w = (int(v) for v in map_shape)
        if h * w != R:
            raise DataError(f"map shape {h}x{w} does not hold {R} regions")
        return h, w
    side = int(round(math.sqrt(R)))
    if side * side == R:
        return side, side
    return 1, R


def map_shape_of(data) -> Optional[tuple]:
    """The ``(H, W)`` the feature source knows (HDF5 feature maps do), else ``None``."""
    shape = getattr(data.features, "map_shape", None)
    return tuple(int(v) for v in shape) if shape is not None else None


def new_figure(width_px: int, height_px: int, dpi: int = 100):
    """A matplotlib Figure of exactly ``width_px x height_px`` pixels on the Agg canvas (headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> Path:
    """Write ``fig`` as PNG atomically at its own size and dpi (no tight bbox: the pixel size is exact)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=fig.dpi, format="png")
    return path


def figure_to_array(fig) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB pixels of a figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def class_colours(n: int) -> np.ndarray:
    """``n`` distinguishable RGBA colours (tab20 up to 20 classes, then evenly spaced hues)."""
    from matplotlib import colormaps

    if n <= 20:
        return colormaps["tab20"](np.arange(n) % 20)
    return colormaps["hsv"](np.linspace(0.0, 1.0, n, endpoint=False))
