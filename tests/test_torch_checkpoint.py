"""Tests for msdn_tf.interop.torch_checkpoint (torch-free reader of torch.save state_dicts).

The fixtures in tests/fixtures/ were written by real PyTorch with
tests/fixtures/make_torch_fixtures.py; tiny_msdn_expected.npz holds their exact
values, so these tests need neither torch nor tensorflow.
"""

import ast
import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from msdn_tf.errors import DataError
from msdn_tf.interop.torch_checkpoint import (
    IGNORED_KEYS,
    MSDN_KEY_MAP,
    backbone_prefixes,
    read_torch_state_dict,
    split_state_dict,
)
from tests.helpers import TORCH_FIXTURES as FIXTURES
from tests.helpers import pickle_str, torch_state_dict_pickle, torch_tensor_pickle, write_torch_zip
from tests.helpers import torch_fixture as fixture

STEMS = ("tiny_msdn", "tiny_msdn_backbone", "tiny_msdn_fp16")
C, UNSEEN = 7, (3, 6)


def rewrite_zip(src, dst, transform):
    """Copy zip ``src`` to ``dst``; ``transform(name, data)`` returns new bytes or None to drop."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = transform(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def make_checkpoint(path, pickled, archive="archive"):
    """A zip laid out like torch.save output whose data.pkl is ``pickled``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(archive + "/data.pkl", pickled)
        zf.writestr(archive + "/byteorder", "little")
        zf.writestr(archive + "/version", "3\n")
    return str(path)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("stem", STEMS)
def test_values_match_npz(stem, expected):
    state = read_torch_state_dict(fixture(stem))
    assert list(state) == [str(k) for k in expected[stem + "::__keys__"]]
    for key, value in state.items():
        want = expected["%s::%s" % (stem, key)]
        assert isinstance(value, np.ndarray), key
        assert value.dtype == want.dtype, (key, value.dtype, want.dtype)
        assert value.shape == want.shape, (key, value.shape, want.shape)
        assert value.dtype.isnative and value.flags.c_contiguous, key
        np.testing.assert_array_equal(value, want, err_msg=key)


def test_reference_key_set_and_dtypes():
    state = read_torch_state_dict(fixture("tiny_msdn"))
    assert list(state) == ["V", "att", "W_1", "W_2", "W_3", "W_1_1", "W_2_1", "W_3_1", "bias", "mask_bias", "weight_ce"]
    assert all(v.dtype == np.float32 for v in state.values())
    assert state["bias"].shape == () and state["bias"] == 0.0
    mask = np.full((1, C), -1.0, np.float32)
    mask[0, list(UNSEEN)] = 1.0
    np.testing.assert_array_equal(state["mask_bias"], mask)
    np.testing.assert_array_equal(state["weight_ce"], np.eye(C, dtype=np.float32))
    assert not state["W_3"].any() and not state["W_3_1"].any()
    assert np.all(state["W_1"] != 0) and np.all(state["W_2_1"] != 0)


def test_strided_offset_and_shared_storage_views(expected):
    state = read_torch_state_dict(fixture("tiny_msdn_backbone"))
    assert state["backbone.conv1.weight"].shape == (6, 3)  # transposed view
    assert state["backbone.bn1.running_var"].dtype == np.float64
    assert state["backbone.bn1.num_batches_tracked"].dtype == np.int64
    assert int(state["backbone.bn1.num_batches_tracked"]) == 1234
    # Two views of one storage come back as independent arrays.
    fc_w, fc_b = state["backbone.fc.weight"], state["backbone.fc.bias"]
    assert not np.shares_memory(fc_w, fc_b)
    fc_w[...] = 0
    np.testing.assert_array_equal(fc_b, expected["tiny_msdn_backbone::backbone.fc.bias"])


def test_half_and_bfloat16(expected):
    state = read_torch_state_dict(fixture("tiny_msdn_fp16"))
    assert state["V"].dtype == np.float16
    assert state["W_1"].dtype == np.float32  # bfloat16 widened exactly
    # bfloat16 keeps 8 mantissa bits: the low 16 bits of every float32 are zero...
    assert not (state["W_1"].view(np.uint32) & 0xFFFF).any()
    # ...and the values are the float32 originals rounded, not the originals.
    w1 = read_torch_state_dict(fixture("tiny_msdn"))["W_1"]
    np.testing.assert_allclose(state["W_1"], w1, rtol=2**-8)
    assert not np.array_equal(state["W_1"], w1)
    for key, dtype in [
        ("backbone.int32", np.int32),
        ("backbone.int16", np.int16),
        ("backbone.int8", np.int8),
        ("backbone.uint8", np.uint8),
        ("backbone.bool", np.bool_),
    ]:
        assert state[key].dtype == dtype, key


def test_big_endian_byteorder_record(tmp_path, expected):
    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:  # every tensor of tiny_msdn is float32
            return np.frombuffer(data, "<f4").astype(">f4").tobytes()
        return data

    path = rewrite_zip(fixture("tiny_msdn"), tmp_path / "big.pth", to_big)
    state = read_torch_state_dict(path)
    for key, value in state.items():
        assert value.dtype == np.float32 and value.dtype.isnative
        np.testing.assert_array_equal(value, expected["tiny_msdn::" + key])


def test_accepts_pathlike_and_other_archive_name(tmp_path, expected):
    src = fixture("tiny_msdn")
    dst = tmp_path / "renamed.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr("archive/" + info.filename.split("/", 1)[1], zin.read(info))
    state = read_torch_state_dict(dst)
    np.testing.assert_array_equal(state["V"], expected["tiny_msdn::V"])


# --------------------------------------------------------------------------- split


def test_split_state_dict_classification():
    state = read_torch_state_dict(fixture("tiny_msdn"))
    msdn, ignored, backbone = split_state_dict(state)
    assert list(msdn) == ["V", "att", "W_1", "W_2", "W_1_1", "W_2_1", "bias", "mask_bias"]
    assert set(msdn) == set(MSDN_KEY_MAP)
    for key in msdn:
        assert msdn[key] is state[key]
    assert ignored == {
        "W_3": "dead code in the reference, always zero",
        "W_3_1": "dead code in the reference, always zero",
        "weight_ce": "identity matrix of the reference loss, not a parameter",
    }
    assert ignored == IGNORED_KEYS
    assert backbone == {}


def test_split_state_dict_backbone():
    state = read_torch_state_dict(fixture("tiny_msdn_backbone"))
    msdn, ignored, backbone = split_state_dict(state, source="tiny_msdn_backbone.pth")
    assert set(msdn) == set(MSDN_KEY_MAP) and set(ignored) == set(IGNORED_KEYS)
    assert list(backbone) == [
        "backbone.bn1.running_var",
        "backbone.bn1.num_batches_tracked",
        "backbone.conv1.weight",
        "backbone.fc.weight",
        "backbone.fc.bias",
    ]
    assert backbone_prefixes(backbone) == {"backbone.": 5}
    extra = dict(state)
    extra["resnet101.layer1.0.conv1.weight"] = np.zeros((1,))
    extra["stray"] = np.zeros((1,))
    _, _, backbone = split_state_dict(extra)
    assert backbone_prefixes(backbone) == {"backbone.": 5, "resnet101.": 1, "": 1}


def test_split_state_dict_errors():
    state = read_torch_state_dict(fixture("tiny_msdn"))
    missing = {k: v for k, v in state.items() if k != "W_2_1"}
    with pytest.raises(DataError, match="W_2_1"):
        split_state_dict(missing, source="ckpt.pth")
    wrong = dict(state, W_1_1=np.zeros((4, 6), np.float32))
    with pytest.raises(DataError, match="'W_1_1' has shape"):
        split_state_dict(wrong)
    wrong = dict(state, mask_bias=np.zeros((1, C + 1), np.float32))
    with pytest.raises(DataError, match="mask_bias"):
        split_state_dict(wrong)


# --------------------------------------------------------------------------- safety


class _SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalCall:
    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return (eval, (self.source,))


def _assert_refused(path, global_name, side_effect):
    with pytest.raises(DataError) as info:
        read_torch_state_dict(path)
    message = str(info.value)
    assert "refusing to load %s" % path in message
    assert "'%s'" % global_name in message
    assert "nothing was executed" in message
    assert not os.path.exists(side_effect)


def test_refuses_os_system_reduce(tmp_path):
    marker = tmp_path / "pwned.txt"
    payload = pickle.dumps(_SystemCall("echo pwned > %s" % marker), protocol=2)
    path = make_checkpoint(tmp_path / "evil_system.pth", payload)
    _assert_refused(path, "%s.system" % os.system.__module__, marker)  # posix.system


def test_refuses_os_system_global_inside_state_dict(tmp_path):
    marker = tmp_path / "pwned.txt"
    command = ("echo pwned > %s" % marker).encode()
    # OrderedDict() then {"V": os.system(command)}, written with the "os" module name.
    payload = (
        b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00V"
        b"cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85Ru."
    )
    path = make_checkpoint(tmp_path / "evil_nested.pth", payload)
    _assert_refused(path, "os.system", marker)


def test_refuses_builtins_eval(tmp_path):
    marker = tmp_path / "pwned_eval.txt"
    source = "open(%r, 'w').write('pwned')" % str(marker)
    payload = pickle.dumps(collections.OrderedDict(V=_EvalCall(source)), protocol=4)
    path = make_checkpoint(tmp_path / "evil_eval.pth", payload)
    _assert_refused(path, "builtins.eval", marker)
    # Protocol 2 spells it the Python 2 way; the message names what the file says.
    payload = pickle.dumps(_EvalCall(source), protocol=2)
    path = make_checkpoint(tmp_path / "evil_eval2.pth", payload)
    _assert_refused(path, "__builtin__.eval", marker)


def test_build_cannot_tamper_with_allowed_objects(tmp_path):
    # BUILD (None, {"fn": 1}) on the object standing in for collections.OrderedDict.
    payload = b"\x80\x02ccollections\nOrderedDict\nN}X\x02\x00\x00\x00fnK\x01s\x86b."
    path = make_checkpoint(tmp_path / "tamper.pth", payload)
    with pytest.raises(DataError, match="tamper.pth"):
        read_torch_state_dict(path)
    assert "V" in read_torch_state_dict(fixture("tiny_msdn"))  # still works afterwards


def test_non_state_dict_pickles(tmp_path):
    path = make_checkpoint(tmp_path / "list.pth", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DataError, match="not a state_dict"):
        read_torch_state_dict(path)
    nested = collections.OrderedDict(epoch=3, state_dict=collections.OrderedDict())
    path = make_checkpoint(tmp_path / "nested.pth", pickle.dumps(nested, protocol=2))
    with pytest.raises(DataError, match="not a plain state_dict.*nested"):
        read_torch_state_dict(path)


_TENSOR = (
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
    b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00"
)


@pytest.mark.parametrize(
    "shape_stride, message",
    [
        (b"K\x02\x85K\x01\x85", "reaches element 1 but storage '0' holds only 1"),
        (b"J\x00\x00\x10\x00M\x00\x04\x86K\x00K\x00\x86", "expands its storage"),
        (b"K\x02\x85K\x01K\x01\x86", "differ in length"),
    ],
)
def test_rejects_malformed_tensor_records(tmp_path, shape_stride, message):
    # One FloatStorage element; the tensor's (size, stride) do not fit it.
    path = make_checkpoint(tmp_path / "bad_tensor.pth", _TENSOR + shape_stride + b"\x89)tR.")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("archive/data/0", b"\x00\x00\x80\x3f")
    with pytest.raises(DataError, match=message):
        read_torch_state_dict(path)
    with pytest.raises(DataError, match="'torch.load', which this reader does not allow"):
        read_torch_state_dict(make_checkpoint(tmp_path / "load.pth", b"\x80\x02ctorch\nload\n."))


# --------------------------------------------------------------------------- corrupt files


def test_truncated_file(tmp_path):
    data = open(fixture("tiny_msdn"), "rb").read()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt zip") as info:
        read_torch_state_dict(path)
    assert str(path) in str(info.value)


def test_short_storage_record(tmp_path):
    def cut(name, data):
        return data[: len(data) // 2] if name == "tiny_msdn/data/0" else data

    path = rewrite_zip(fixture("tiny_msdn"), tmp_path / "short.pth", cut)
    with pytest.raises(
        DataError,
        match=r"truncated: storage record 'tiny_msdn/data/0' has 40 "
        r"bytes but 20 FloatStorage elements need 80",
    ):
        read_torch_state_dict(path)


def test_missing_storage_record(tmp_path):
    def drop(name, data):
        return None if name == "tiny_msdn/data/3" else data

    path = rewrite_zip(fixture("tiny_msdn"), tmp_path / "missing.pth", drop)
    with pytest.raises(DataError, match="storage record 'tiny_msdn/data/3' is missing"):
        read_torch_state_dict(path)


def test_corrupt_record_bytes(tmp_path):
    data = bytearray(open(fixture("tiny_msdn"), "rb").read())
    with zipfile.ZipFile(fixture("tiny_msdn")) as zf:
        offset = zf.getinfo("tiny_msdn/data/2").header_offset
    name_len, extra_len = struct.unpack("<HH", bytes(data[offset + 26 : offset + 30]))
    data[offset + 30 + name_len + extra_len] ^= 0xFF  # first byte of the stored record
    path = tmp_path / "crc.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt"):
        read_torch_state_dict(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(DataError, match="not a PyTorch zip checkpoint"):
        read_torch_state_dict(path)
    legacy = tmp_path / "legacy.pth"  # pickled magic number, as old torch.save wrote
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
    with pytest.raises(DataError, match="legacy"):
        read_torch_state_dict(legacy)
    with pytest.raises(DataError, match="does not exist"):
        read_torch_state_dict(tmp_path / "absent.pth")
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(DataError, match="no '<archive>/data.pkl'"):
        read_torch_state_dict(other)


def test_module_does_not_import_tensorflow_keras_or_torch():
    import msdn_tf.interop.torch_checkpoint as mod

    tree = ast.parse(open(mod.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"tensorflow", "keras", "torch"}


# --------------------------------------------------------------------------- against torch


def test_matches_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    script = os.path.join(FIXTURES, "make_torch_fixtures.py")
    run = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "tiny_msdn_expected.npz" in run.stdout
    paths = [tmp_path / (stem + ".pth") for stem in STEMS] + [fixture(s) for s in STEMS]
    for path in paths:
        assert os.path.getsize(path) < 20 * 1024
        ours = read_torch_state_dict(path)
        theirs = torch.load(path, map_location="cpu", weights_only=True)
        assert list(ours) == list(theirs)
        for key, tensor in theirs.items():
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            want = tensor.detach().contiguous().numpy()
            assert ours[key].dtype == want.dtype, (path, key)
            np.testing.assert_array_equal(ours[key], want, err_msg="%s %s" % (path, key))


# --------------------------------------------------------------------------- budgets (issue 21 §4)


def _dag_key_pickle(levels):
    """``{k: 1}`` where k = (x, x), x = (y, y), ... ``levels`` deep: each level reuses the previous tuple twice."""
    body = b"\x80\x02}q\x00" + pickle_str("a") + b"q\x010"
    body += b"h\x01h\x01\x86q\x010" * levels
    return body + b"h\x01K\x01s."


def test_dag_key_of_1_7_kb_is_refused_at_once(tmp_path):
    # The example: on main hashing the key (and the error message's repr of it)
    # takes 2**levels steps; 1.7 KB is about 200 levels. A subprocess keeps a regression
    # from hanging the suite.
    pickled = _dag_key_pickle(210)
    assert 1600 < len(pickled) < 1800
    path = write_torch_zip(tmp_path / "dag.pth", pickled)
    code = (
        "import sys\nfrom msdn_tf.interop.torch_checkpoint import read_torch_state_dict\n"
        "try:\n    read_torch_state_dict(sys.argv[1])\nexcept Exception as e:\n    print(e)\n"
    )
    from tests.helpers import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60, env=env, cwd=str(REPO)
    )
    assert "nested deeper than 64 levels" in run.stdout, run.stdout + run.stderr
    assert "refusing to load %s" % path in run.stdout
    assert len(run.stdout) < 500


@pytest.mark.parametrize(
    "pickled, message",
    [
        # 70 nested lists as a value (protocol 2: EMPTY_LIST ... APPEND).
        (b"\x80\x02}X\x01\x00\x00\x00a" + b"]" * 70 + b"a" * 69 + b"s.", "nested deeper than 64"),
        # the same with LIST (protocol 0) and with tuples
        (b"\x80\x02(" * 70 + b"l" * 70 + b".", "nested deeper than 64"),
        (b"\x80\x02K\x01" + b"\x85" * 70 + b".", "nested deeper than 64"),
        # a tuple as a dict key (hashed while unpickling), an int key (collisions can be chosen)
        (b"\x80\x02}K\x01K\x02\x86K\x01s.", "a dict key is a tuple, not a string"),
        (b"\x80\x02}(K\x01K\x01K\x02K\x02u.", "a dict key is a atom, not a string"),
        # sets are hashed too; a state_dict has none
        (b"\x80\x02(K\x01K\x02\x91.", "sets are not allowed"),
        # a 10-byte pickle whose memo index makes CPython allocate 2 x 16M pointers (main: 256 MB)
        (b"\x80\x02K\x01r\xff\xff\xff\x00.", "memo index 16777215"),
        # a list modified after it was put in a tuple; a list that holds itself
        (b"\x80\x02]q\x00\x85h\x00K\x01a.", "modified after it was placed inside"),
        (b"\x80\x02]q\x00h\x00a.", "contains itself"),
        # protocol 5 out-of-band buffer; truncated stream
        (b"\x80\x05\x97.", "NEXT_BUFFER is not allowed"),
        (b"\x80\x02X\xff\xff\xff\x00abc.", "malformed pickle"),
    ],
    ids=[
        "deep-list-value",
        "deep-list-protocol-0",
        "deep-tuple",
        "tuple-key",
        "int-keys",
        "frozenset",
        "memo-index",
        "modified-after-nesting",
        "self-reference",
        "out-of-band-buffer",
        "truncated",
    ],
)
def test_pickle_scan_refuses_before_unpickling(tmp_path, pickled, message):
    path = write_torch_zip(tmp_path / "crafted.pth", pickled)
    with pytest.raises(DataError, match=message) as info:
        read_torch_state_dict(path)
    assert "nothing was unpickled" in str(info.value) and path in str(info.value)


def test_data_pkl_size_is_capped_before_reading(tmp_path, monkeypatch):
    import msdn_tf.interop.torch_checkpoint as tc

    monkeypatch.setattr(tc, "MAX_PICKLE_BYTES", 100)
    path = write_torch_zip(tmp_path / "big.pth", b"\x80\x02" + pickle_str("x" * 200) + b".")
    with pytest.raises(DataError, match=r"'archive/data.pkl' is \d+ bytes, over the limit of 100"):
        read_torch_state_dict(path)


def _views_of_one_storage(tmp_path, n_views, numel, compress=zipfile.ZIP_DEFLATED, name="views.pth"):
    entries = [("t%d" % i, torch_tensor_pickle("0", numel, (numel,), (1,))) for i in range(n_views)]
    return write_torch_zip(
        tmp_path / name, torch_state_dict_pickle(entries), [("0", bytes(4 * numel))], compress=compress
    )


def test_views_of_one_compressed_storage_are_budgeted(tmp_path):
    # The example, scaled down: a deflated storage of 16 MiB of zeros is 16 KB on
    # disk; 8 tensors viewing all of it would materialise 128 MiB. Refused before the
    # allocation that crosses the budget (64 MiB here: the floor for small files).
    import tracemalloc

    numel = 4 << 20
    path = _views_of_one_storage(tmp_path, 8, numel)
    assert os.path.getsize(path) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"over this load's budget of 67108864 bytes") as info:
            read_torch_state_dict(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "a tensor of size (4194304,)" in str(info.value)
    assert peak < 80 << 20, peak
    # An explicit budget: the storage alone (16 MiB) does not fit 8 MiB.
    with pytest.raises(DataError, match=r"storage record 'archive/data/0' needs 16777216 more bytes"):
        read_torch_state_dict(path, max_bytes=8 << 20)
    # A legal file of the same content (one view) reads within the default budget.
    one = _views_of_one_storage(tmp_path, 1, numel, name="one.pth")
    assert read_torch_state_dict(one)["t0"].shape == (numel,)


def test_default_budget_scales_with_the_file(tmp_path):
    # Stored (not deflated) records: 3 views of a 24 MiB storage on a 24 MiB file need
    # 24 + 72 MiB, within 3 x 24 MiB? No: 96 > 72, refused; 2 views (72 MiB) fit.
    numel = 6 << 20
    three = _views_of_one_storage(tmp_path, 3, numel, compress=zipfile.ZIP_STORED, name="three.pth")
    with pytest.raises(DataError, match="budget"):
        read_torch_state_dict(three)
    two = _views_of_one_storage(tmp_path, 2, numel, compress=zipfile.ZIP_STORED, name="two.pth")
    assert len(read_torch_state_dict(two)) == 2


def test_messages_never_repr_untrusted_values(tmp_path):
    # A tensor size of 100 000 ints, a huge int offset and a long string key: the messages
    # stay short and are built without repr-ing the values.
    long_size = torch_state_dict_pickle([("V", torch_tensor_pickle("0", 1, (1,) * 100_000, (1,) * 100_000))])
    huge_offset = torch_state_dict_pickle([("V", torch_tensor_pickle("0", 1, (1,), (1,), offset=1 << 5000))])
    long_key = b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00VK\x01u."
    for i, (pickled, message) in enumerate(
        [
            (
                long_size,
                r"tensor size must be a short tuple of 64-bit ints, got \(1, 1, 1, 1, 1, 1, ... 100000 items\)",
            ),
            (huge_offset, "bad storage offset an integer of 5001 bits"),
            (long_key, "1 entries are not named tensors"),
        ]
    ):
        path = write_torch_zip(tmp_path / ("m%d.pth" % i), pickled, [("0", bytes(4))])
        with pytest.raises(DataError, match=message) as info:
            read_torch_state_dict(path)
        assert len(str(info.value)) < 400, str(info.value)[:1000]
    key = "k" * 100_000
    pickled = torch_state_dict_pickle([(key, torch_tensor_pickle("0", 1, (2,), (1,)))])
    path = write_torch_zip(tmp_path / "longkey.pth", pickled, [("0", bytes(4))])
    with pytest.raises(DataError, match="reaches element 1") as info:
        read_torch_state_dict(path)
    assert len(str(info.value)) < 400


def test_ordered_dict_arguments_are_checked_before_hashing(tmp_path):
    # OrderedDict([((1, 2), x)]) via REDUCE: the key would be hashed inside OrderedDict().
    pickled = b"\x80\x02ccollections\nOrderedDict\n]K\x01K\x02\x86K\x03\x86a\x85R."
    path = write_torch_zip(tmp_path / "od.pth", pickled)
    with pytest.raises(DataError, match=r"OrderedDict item \(\(1, 2\), 3\) is not a \(string, value\) pair"):
        read_torch_state_dict(path)


def test_real_checkpoints_pass_the_scan():
    from msdn_tf.interop.pickle_scan import scan_pickle

    for stem in STEMS + ("tiny_msdn_with_resnet", "tiny_tv_resnet"):
        with zipfile.ZipFile(fixture(stem)) as zf:
            name = [n for n in zf.namelist() if n.endswith("/data.pkl")][0]
            scan_pickle(zf.read(name), max_depth=8)  # torch's pickles are shallow


def _patch_zip_entry(data: bytes, name: str, flags=None, method=None) -> bytes:
    """Set the general-purpose flags and/or compression method of ``name`` in both of its zip headers."""
    data = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        local = zf.getinfo(name).header_offset
    encoded = name.encode()
    central = data.find(b"PK\x01\x02")
    while central != -1:
        name_len = struct.unpack("<H", data[central + 28 : central + 30])[0]
        if bytes(data[central + 46 : central + 46 + name_len]) == encoded:
            break
        central = data.find(b"PK\x01\x02", central + 4)
    for at, flag_at, method_at in ((local, 6, 8), (central, 8, 10)):
        if flags is not None:
            data[at + flag_at : at + flag_at + 2] = struct.pack("<H", flags)
        if method is not None:
            data[at + method_at : at + method_at + 2] = struct.pack("<H", method)
    return bytes(data)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"method": 99}, "compression method is not supported"),  # AES: zipfile raises NotImplementedError
        ({"flags": 1}, "encrypted"),  # zipfile raises RuntimeError
        ({"flags": 1 << 6}, "strong encryption"),
    ],
    ids=["unsupported-method", "encrypted", "strong-encryption"],
)
def test_zip_features_torch_never_writes_are_one_data_error(tmp_path, patch, message):
    # Found by tests/test_properties.py (fuzz profile): these escaped as tracebacks.
    data = _patch_zip_entry(open(fixture("tiny_msdn"), "rb").read(), "tiny_msdn/data.pkl", **patch)
    path = tmp_path / "odd.pth"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as info:
        read_torch_state_dict(path)
    assert "re-save it with torch.save" in str(info.value)
