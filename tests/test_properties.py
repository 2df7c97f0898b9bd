"""Property-based tests (hypothesis) of the parsers of untrusted input (issue 21 §6).

Every parser that reads bytes a user may have been handed is fed generated input: random
bytes and text, token soups of the format's own syntax (YAML anchors and aliases, pickle
opcodes, CSV quoting), mutations of real files, and valid documents whose round trip must
be exact. The property is always the same: the parser returns a result or raises its ONE
documented error class, whose message is one line of bounded length; never another
exception, never more than a memory ceiling (``tracemalloc`` peak) and never past the
deadline of the settings profile.

Settings profiles (registered in ``tests/conftest.py``): ``msdn`` (the default, used by
``make test``: derandomized, a fixed number of examples per test, deadline 5 s per
example; all the tests of this file together take about 25 s on 2 idle cores) and
``fuzz`` (random, 20 times the examples) for a longer hunt::

    MSDN_HYPOTHESIS_PROFILE=fuzz python -m pytest -q tests/test_properties.py
"""

import contextlib
import csv
import io
import json
import os
import sys
import tempfile
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest
import yaml
from hypothesis import assume, example, given
from hypothesis import strategies as st

from msdn_tf.config import resolve_config
from msdn_tf.data import custom, wordvectors
from msdn_tf.errors import ConfigError, DataError
from msdn_tf.interop.torch_checkpoint import read_torch_state_dict
from tests.helpers import TORCH_FIXTURES, pickle_str, torch_tensor_pickle

MAX_MESSAGE = 2000  # characters in one error message


@contextlib.contextmanager
def memory_ceiling(limit_bytes):
    """Fail if the Python (and numpy) allocations inside the block peak above ``limit_bytes``."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
    assert peak <= limit_bytes, "peak %d bytes over the ceiling of %d" % (peak, limit_bytes)


def one_line(exc):
    text = str(exc)
    assert "\n" not in text, text[:500]
    assert len(text) <= MAX_MESSAGE, text[:500]
    return text


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="msdn-props-") as folder:
        yield folder


def write(folder, name, data):
    path = os.path.join(folder, name)
    with open(path, "wb") as fh:
        fh.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


# --------------------------------------------------------------------------- YAML config and --set

_YAML_TOKENS = [
    "train",
    "data",
    "model",
    "seed",
    "on_device",
    "fusion_weights",
    "iterations",
    "x",
    ": ",
    ":",
    "\n",
    "  ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "&a ",
    "&b ",
    "*a",
    "*b",
    "<<: ",
    "'",
    '"',
    "# c",
    "1",
    "-1",
    "1e400",
    ".nan",
    "null",
    "true",
    "!!python/object:os.system ",
    "!!binary ",
    "? ",
    "---\n",
    "%YAML 1.1\n",
    "\t",
    "\xe9",
]
yaml_soup = st.lists(st.sampled_from(_YAML_TOKENS), max_size=60).map("".join)


def _alias_ladder(depth, width):
    parts = ["&l0 [%s]" % ",".join(["1"] * width)]
    for i in range(1, depth):
        parts.append("&l%d [%s]" % (i, ",".join(["*l%d" % (i - 1)] * width)))
    return "data:\n  on_device: [%s]\n" % ", ".join(parts)


yaml_ladders = st.builds(_alias_ladder, st.integers(1, 6), st.integers(1, 9))  # up to 9**6 nodes expanded
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
yaml_documents = st.dictionaries(
    st.sampled_from(["data", "demo", "model", "loss", "optimizer", "train", "other"]),
    st.dictionaries(st.sampled_from(["seed", "on_device", "batch_size", "bias", "sampler", "x"]), yaml_values),
).map(lambda d: yaml.safe_dump(d))


@given(st.one_of(yaml_soup, yaml_ladders, yaml_documents, st.text(max_size=300), st.binary(max_size=300)))
def test_config_file_is_a_config_or_one_config_error(scratch, content):
    path = write(scratch, "config.yaml", content)
    with memory_ceiling(32 << 20):
        try:
            resolve_config("demo", [path])
        except ConfigError as exc:
            assert one_line(exc).startswith(path)


@given(st.one_of(yaml_soup, yaml_ladders.map(lambda t: t.split("on_device: ", 1)[1]), st.text(max_size=200)))
def test_set_override_is_a_config_or_one_config_error(value):
    text = "data.on_device=" + value
    with memory_ceiling(32 << 20):
        try:
            resolve_config("demo", overrides=[text])
        except ConfigError as exc:
            assert one_line(exc).startswith("--set ")


@given(
    seed=st.integers(0, 2**31 - 1),
    iterations=st.integers(1, 10**9),
    lam=st.floats(0, 1e6, allow_nan=False),
    name=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30),
    duplicate=st.sampled_from([None, "train", "loss"]),
)
def test_config_round_trip_and_duplicate_sections(scratch, seed, iterations, lam, name, duplicate):
    text = yaml.safe_dump({"train": {"seed": seed, "iterations": iterations, "run_name": name}})
    text += yaml.safe_dump({"loss": {"lambda_cal": lam}})
    if duplicate:
        text += "%s: {}\n" % duplicate
    path = write(scratch, "valid.yaml", text)
    if duplicate:
        with pytest.raises(ConfigError, match="key '%s' appears twice" % duplicate):
            resolve_config("demo", [path])
        return
    config = resolve_config("demo", [path])
    assert (config.train.seed, config.train.iterations, config.train.run_name) == (seed, iterations, name)
    assert config.loss.lambda_cal == lam
    assert resolve_config("demo", overrides=["train.seed=%d" % seed]).train.seed == seed


# --------------------------------------------------------------------------- the .pth reader

_PICKLE_TOKENS = [
    b"(",
    b")",
    b"]",
    b"}",
    b"a",
    b"e",
    b"s",
    b"u",
    b"t",
    b"l",
    b"d",
    b"0",
    b"1",
    b"2",
    b"\x85",
    b"\x86",
    b"\x87",
    b"R",
    b"b",
    b"Q",
    b"N",
    b"\x88",
    b"\x89",
    b"K\x01",
    b"K\xff",
    b"J\xff\xff\xff\x7f",
    b"\x8a\x09" + b"\xff" * 9,
    b"q\x00",
    b"q\x01",
    b"h\x00",
    b"h\x01",
    b"r\xff\xff\xff\x7f",
    b"\x94",
    b"\x8f",
    b"\x90",
    b"\x91",
    b"X\x01\x00\x00\x00V",
    b"X\xff\xff\xff\x7f",
    b"ccollections\nOrderedDict\n",
    b"ctorch\nFloatStorage\n",
    b"cos\nsystem\n",
    b"cbuiltins\neval\n",
    b"\x97",
    pickle_str("storage"),
    torch_tensor_pickle("0", 4, (2, 2), (2, 1)),
    torch_tensor_pickle("0", 4, (1 << 20, 1 << 20), (0, 0)),
]
pickle_soup = st.lists(st.sampled_from(_PICKLE_TOKENS), max_size=40).map(
    lambda parts: b"\x80\x02" + b"".join(parts) + b"."
)


def _fixture_bytes(stem):
    with open(os.path.join(TORCH_FIXTURES, stem + ".pth"), "rb") as fh:
        return fh.read()


@st.composite
def mutated_checkpoints(draw):
    """The bytes of a real torch.save file with a few bytes flipped, inserted or cut."""
    data = bytearray(_fixture_bytes(draw(st.sampled_from(["tiny_msdn", "tiny_msdn_backbone", "tiny_msdn_fp16"]))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "cut"]))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


def _with_pickle(pickled):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", np.arange(16, dtype=np.float32).tobytes())
    return buf.getvalue()


@given(
    st.one_of(
        pickle_soup.map(_with_pickle),
        st.binary(max_size=500).map(_with_pickle),
        mutated_checkpoints(),
        st.binary(max_size=500),
    )
)
def test_pth_reader_is_a_state_dict_or_one_data_error(scratch, data):
    path = write(scratch, "model.pth", data)
    budget = 1 << 20
    with memory_ceiling(4 * budget + (8 << 20)):
        try:
            state = read_torch_state_dict(path, max_bytes=budget)
        except DataError as exc:
            assert one_line(exc)
            return
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())
    assert sum(v.nbytes for v in state.values()) <= budget


# --------------------------------------------------------------------------- image, class and attribute lists

_CSV_TOKENS = [
    "a.jpg",
    "b/c.png",
    "/abs/d.jpg",
    "cat",
    "dog",
    "trainval",
    "test_seen",
    "test_unseen",
    "path",
    "class",
    "split",
    "red",
    "1",
    "0.5",
    "nan",
    "inf",
    "-",
    "",
    ",",
    ",",
    "\t",
    "\n",
    "\r\n",
    '"',
    '""',
    " ",
    "#",
    "\ufeff",
    "\x00",
    "\xe9",
]
csv_soup = st.lists(st.sampled_from(_CSV_TOKENS), max_size=60).map("".join)
text_inputs = st.one_of(csv_soup, st.text(max_size=300), st.binary(max_size=300))


@given(text_inputs)
def test_image_csv_is_entries_or_one_data_error(scratch, content):
    path = write(scratch, "images.csv", content)
    with memory_ceiling(16 << 20):
        try:
            entries = custom.read_image_csv(path)
        except DataError as exc:
            assert one_line(exc)
            return
    assert entries and all(e.path and e.cls for e in entries)


@given(text_inputs, st.sampled_from(["classes.csv", "classes.tsv"]))
def test_attribute_table_is_a_table_or_one_data_error(scratch, content, name):
    path = write(scratch, name, content)
    with memory_ceiling(16 << 20):
        try:
            table = custom.read_attribute_table(path, warn=lambda msg: None)
        except DataError as exc:
            assert one_line(exc)
            return
    assert table.values.shape == (len(table.class_names), len(table.attribute_names))
    assert np.isfinite(table.values).all()


_NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=12)


@given(
    classes=st.lists(_NAMES, min_size=1, max_size=6, unique=True),
    attributes=st.lists(_NAMES, min_size=1, max_size=5, unique=True),
    data=st.data(),
)
def test_attribute_table_round_trip(scratch, classes, attributes, data):
    assume(all(not c.startswith("\ufeff") for c in classes + attributes))
    values = np.array(
        data.draw(
            st.lists(
                st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=len(attributes), max_size=len(attributes)),
                min_size=len(classes),
                max_size=len(classes),
            )
        )
    )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class"] + attributes)
    for name, row in zip(classes, values):
        writer.writerow([name] + [repr(float(v)) for v in row])
    path = write(scratch, "round.csv", buf.getvalue())
    table = custom.read_attribute_table(path, warn=lambda msg: None)
    assert table.class_names == classes and table.attribute_names == attributes
    np.testing.assert_array_equal(table.values, values)


@given(text_inputs, st.sampled_from(["unseen.txt", "unseen.yaml"]))
def test_unseen_list_is_names_or_one_data_error(scratch, content, name):
    path = write(scratch, name, content)
    with memory_ceiling(16 << 20):
        try:
            names = custom.read_unseen_list(path)
        except DataError as exc:
            assert one_line(exc)
            return
    assert len(set(names)) == len(names)


@given(text_inputs)
def test_attribute_vector_csv_is_vectors_or_one_data_error(scratch, content):
    path = write(scratch, "vectors.csv", content)
    with memory_ceiling(16 << 20):
        try:
            arr = custom.read_attribute_vectors_file(path, ["red", "cat"])
        except DataError as exc:
            assert one_line(exc)
            return
    assert arr.shape[0] == 2 and np.isfinite(arr).all()


@given(st.one_of(csv_soup.map(lambda t: t.replace(",", " ")), st.text(max_size=300), st.binary(max_size=300)))
def test_word_vectors_are_vectors_or_one_data_error(scratch, content):
    path = write(scratch, "vectors.txt", content)
    with memory_ceiling(16 << 20):
        try:
            vectors, info = wordvectors.read_word_vectors(path, ["cat", "red", "1"])
        except DataError as exc:
            assert one_line(exc)
            return
    assert all(v.shape == (info["dim"],) and np.isfinite(v).all() for v in vectors.values())


# --------------------------------------------------------------------------- REST request parser


@pytest.fixture(scope="module")
def rest():
    """``_rest_predict`` of the local TF Serving test double (as ``predict(body)``) on a fake model.

    The signature (a float ``features`` (None, 4, 3) and a string ``image_bytes`` input,
    one float ``scores`` output) is a real SignatureDef, so the parser's own checks run;
    only the model function is a stand-in.
    """
    local_server = pytest.importorskip("msdn_tf.serving.local_server")
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2

    sig = meta_graph_pb2.SignatureDef()
    for key, dtype, dims in (("features", tf.float32, (-1, 4, 3)), ("image_bytes", tf.string, (-1,))):
        info = sig.inputs[key]
        info.dtype = dtype.as_datatype_enum
        for d in dims:
            info.tensor_shape.dim.add(size=d)
    sig.outputs["scores"].dtype = tf.float32.as_datatype_enum

    def model(features, image_bytes):
        return {"scores": tf.zeros((tf.shape(features)[0], 2))}

    servable = object.__new__(local_server._Servable)
    servable.name, servable.version, servable.path = "m", 1, "fake/1"
    servable.max_batch, servable.max_request_bytes = 16, 1 << 20
    servable.signature_defs = {"serving_default": sig}
    servable.functions = {"serving_default": model}
    served = object.__new__(local_server._Model)  # the model of the server, holding that one version
    served.name, served._current, served.max_request_bytes = "m", servable, servable.max_request_bytes

    def predict(body):
        return local_server._rest_predict(served, "m", None, None, body)

    return local_server, predict


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=30,
)
features = st.lists(st.lists(st.lists(st.floats(width=32), min_size=3, max_size=3), min_size=4, max_size=4), max_size=3)
rest_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda f, b, extra, form: json.dumps(
            {"inputs": {"features": f, "image_bytes": b, **extra}}
            if form == "inputs"
            else {"instances": [{"features": x, "image_bytes": "a"} for x in (f if isinstance(f, list) else [f])]}
        ).encode(),
        st.one_of(features, json_values),
        st.one_of(st.lists(st.text(max_size=4), max_size=3), json_values),
        st.dictionaries(st.sampled_from(["signature_name", "x"]), json_values, max_size=1),
        st.sampled_from(["inputs", "instances"]),
    ),
)


@given(rest_bodies)
def test_rest_request_is_an_answer_or_one_serving_error(rest, body):
    local_server, predict = rest
    with memory_ceiling(64 * len(body) + (16 << 20)):
        try:
            answer = predict(body)
        except local_server.ServingError as exc:
            assert "\n" not in exc.message and len(exc.message) <= MAX_MESSAGE
            return
    json.dumps(answer)


def _nested(value, depth):
    for _ in range(depth):
        value = [value]
    return value


@given(depth=st.integers(40, 990), position=st.integers(1, 3))
@example(depth=900, position=1)
def test_rest_string_input_nested_in_a_later_element_is_one_serving_error(rest, depth, position):
    local_server, predict = rest
    values = ["a"] * position + [_nested("a", depth)]
    body = json.dumps({"inputs": {"features": [[[0.0] * 3] * 4], "image_bytes": values}}).encode()
    outcome = []

    def parse():  # in a fresh thread, as the server's handler threads: the stack starts shallow
        try:
            outcome.append(predict(body))
        except BaseException as exc:  # noqa: BLE001 - the property is about which exception
            outcome.append(exc)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # Python's default, as in the server (hypothesis raises it while testing)
    try:
        worker = threading.Thread(target=parse)
        worker.start()
        worker.join()
    finally:
        sys.setrecursionlimit(limit)
    if isinstance(outcome[0], BaseException):
        assert isinstance(outcome[0], local_server.ServingError), repr(outcome[0])[:300]


@given(key=st.text(min_size=1, max_size=10).filter(lambda k: not k.isprintable()))
def test_rest_unknown_key_with_control_characters_is_one_line(rest, key):
    local_server, predict = rest
    body = json.dumps({"inputs": {key: 1}}).encode()
    with pytest.raises(local_server.ServingError) as info:
        predict(body)
    assert "\n" not in info.value.message and "\r" not in info.value.message
