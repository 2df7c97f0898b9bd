"""Helpers shared by the test modules: the ONE tiny demo, tiny weights, fixture paths, real metadata.

Test modules import from here (never from each other); ``tests/conftest.py`` holds
the pytest fixtures built on these.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_ZSL = Path(os.environ.get("MSDN_SHARED_DATA", REPO.parent / "shared" / "data" / "zsl"))
TORCH_FIXTURES = str(REPO / "tests" / "fixtures")

# ------------------------------------------------------------------ the one tiny demo
#: Size of the tiny synthetic demo every training, evaluation and visualisation test uses.
TINY_DEMO_FIELDS = dict(
    num_classes=10,
    num_unseen=3,
    num_attributes=8,
    attributes_per_class=3,
    images_per_class=12,
    map_size=3,
    feature_dim=32,
    embed_dim=16,
)
#: Its training schedule: a few seconds on a CPU (sections of the config, as in a YAML file).
TINY_TRAIN = {
    "data": {"batch_size": 16, "eval_batch_size": 32},
    "optimizer": {"learning_rate": 0.003},
    "train": {"iterations": 60, "eval_every": 30, "log_every": 10, "verbose": 0},
}
#: A shorter schedule for tests that only need a trained model quickly (``--set`` overrides).
QUICK_TRAIN = [
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "train.iterations=12",
    "train.eval_every=6",
    "train.log_every=6",
]
#: The tiny demo and its schedule as YAML text (``--config`` of the commands).
TINY = yaml.safe_dump({"demo": TINY_DEMO_FIELDS, **TINY_TRAIN}, sort_keys=False)
#: The same bench shapes for every benchmark test (``python -m msdn_tf.bench`` arguments).
BENCH_TINY_ARGS = [
    "--regions",
    "9",
    "4",
    "--batch",
    "4",
    "--eval-batch",
    "6",
    "--attributes",
    "8",
    "--classes",
    "10",
    "--unseen",
    "3",
    "--features",
    "16",
    "--embed",
    "5",
    "--steps",
    "1",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--matmul-steps",
    "1",
]


class Interrupt(Exception):
    """Raised by an evaluation hook to simulate a crash in the middle of a run."""


def tiny_demo():
    """The tiny demo's :class:`msdn_tf.config.DemoConfig`."""
    from msdn_tf.config import DemoConfig

    return DemoConfig(**TINY_DEMO_FIELDS)


def write_tiny_yaml(folder, **train) -> Path:
    """``folder/tiny.yaml``: the tiny demo and its schedule, with ``train.<key>`` overrides."""
    content = {"demo": dict(TINY_DEMO_FIELDS), **{k: dict(v) for k, v in TINY_TRAIN.items()}}
    content["train"].update(train)
    path = Path(folder) / "tiny.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def tiny_demo_config(data_dir, *overrides):
    """The resolved config of the tiny demo (data under ``data_dir``), plus ``--set`` style overrides."""
    from msdn_tf.config import resolve_config

    folder = Path(data_dir).parent
    folder.mkdir(parents=True, exist_ok=True)
    return resolve_config("demo", [write_tiny_yaml(folder)], [f"data.data_dir={data_dir}", *overrides])


# ------------------------------------------------------------------ tiny weights, fixtures, real data
def tiny_problem(rng, B=4, R=6, F=10, K=5, D=4, C=7, unseen=(3, 6)):
    """Random non-zero weights and inputs of a tiny MSDN (channel-first features like the reference)."""
    seen = [c for c in range(C) if c not in unseen]
    mask_bias = -np.ones((1, C))
    mask_bias[0, list(unseen)] = 1.0
    return {
        "fmap_bfr": rng.random((B, F, R)) + 0.05,
        "V": rng.normal(size=(K, D)),
        "W_1": rng.normal(scale=0.7, size=(D, F)),
        "W_2": rng.normal(scale=0.7, size=(D, F)),
        "W_1_1": rng.normal(scale=0.7, size=(F, D)),
        "W_2_1": rng.normal(scale=0.7, size=(D, F)),
        "att": rng.random((C, K)),
        "labels": rng.choice(seen, size=B),
        "seen": seen,
        "unseen": list(unseen),
        # The margin (docs/reference.md §2): random and non-zero, so that every term sees it.
        "bias": float(rng.uniform(0.3, 1.7)),
        "mask_bias": mask_bias,
    }


def torch_fixture(stem: str) -> str:
    """Path of a tiny .pth fixture written once by real PyTorch (tests/fixtures/make_torch_fixtures.py)."""
    return os.path.join(TORCH_FIXTURES, stem + ".pth")


def shared_zsl_dir() -> Path:
    """The real CUB/SUN/AWA2 metadata, or skip: it is provided beside the checkout in CI only."""
    if not SHARED_ZSL.is_dir():
        pytest.skip(
            f"real zsl metadata not found at {SHARED_ZSL}; CI provides ../shared "
            "(set MSDN_SHARED_DATA to point elsewhere)"
        )
    return SHARED_ZSL


# ------------------------------------------------------------------ crafted torch checkpoints
def pickle_str(text: str) -> bytes:
    """Pickle opcode BINUNICODE for ``text``."""
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def pickle_int(value: int) -> bytes:
    """Pickle opcode for ``value`` (BININT, or LONG1/LONG4 outside the int32 range)."""
    if -(1 << 31) <= value < (1 << 31):
        return b"J" + value.to_bytes(4, "little", signed=True)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    if len(data) < 256:
        return b"\x8a" + bytes([len(data)]) + data
    return b"\x8b" + len(data).to_bytes(4, "little") + data


def pickle_int_tuple(values) -> bytes:
    return b"(" + b"".join(pickle_int(v) for v in values) + b"t"


def torch_tensor_pickle(storage_key, numel, size, stride, offset=0, storage_type="FloatStorage") -> bytes:
    """The opcodes torch.save writes for one tensor: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + pickle_str("storage")
        + b"ctorch\n"
        + storage_type.encode()
        + b"\n"
        + pickle_str(storage_key)
        + pickle_str("cpu")
        + pickle_int(numel)
        + b"tQ"
        + pickle_int(offset)
        + pickle_int_tuple(size)
        + pickle_int_tuple(stride)
        + b"\x89)tR"
    )


def torch_state_dict_pickle(entries) -> bytes:
    """data.pkl of an OrderedDict ``{key: tensor_opcodes}`` (``entries``: (key, opcodes) pairs)."""
    body = b"".join(pickle_str(key) + opcodes for key, opcodes in entries)
    return b"\x80\x02ccollections\nOrderedDict\n)R(" + body + b"u."


def write_torch_zip(path, pickled: bytes, records=(), archive="archive", compress=None) -> str:
    """A zip laid out like torch.save output: ``data.pkl`` = ``pickled``, ``records`` = ((key, bytes), ...)."""
    import zipfile

    compress = zipfile.ZIP_STORED if compress is None else compress
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(archive + "/data.pkl", pickled)
        zf.writestr(archive + "/byteorder", "little")
        zf.writestr(archive + "/version", "3\n")
        for key, data in records:
            zf.writestr("%s/data/%s" % (archive, key), data, compress_type=compress)
    return str(path)
