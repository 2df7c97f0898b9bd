"""Crafted small inputs against the readers' budgets (docs/reliability.md, "Limits").

Writes each crafted file into a scratch folder, then runs the reader on it in a child
process (``timeout`` seconds, at most) and prints one row per case: file size, wall time,
the child's peak resident memory and the first line of what it said. Run it from the
repository whose code you want to measure (``PYTHONPATH`` picks the checkout)::

    PYTHONPATH=. python scripts/budget_cases.py --out /tmp/budget_cases [--timeout 60] [--only pth yaml npz keras]
"""

import argparse
import io
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np


def _str(text):
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def _int(v):
    return b"J" + v.to_bytes(4, "little", signed=True)


def _tensor(key, numel):
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + _str("storage")
        + b"ctorch\nFloatStorage\n"
        + _str(key)
        + _str("cpu")
        + _int(numel)
        + b"tQ"
        + _int(0)
        + b"("
        + _int(numel)
        + b"t("
        + _int(1)
        + b"t\x89)tR"
    )


def _pth(path, pickled, records=(), compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", "little")
        for key, data in records:
            zf.writestr("archive/data/" + key, data, compress_type=compress)


def build(out):
    os.makedirs(out, exist_ok=True)
    cases = []
    # 1.7 KB pickle: a dict key of 210 nested tuples, each holding the previous one twice
    body = b"\x80\x02}q\x00" + _str("a") + b"q\x010" + b"h\x01h\x01\x86q\x010" * 210 + b"h\x01K\x01s."
    _pth(os.path.join(out, "dag.pth"), body)
    cases.append(("pth: 1.7 KB nested-key pickle", "pth", "dag.pth"))
    # 10-byte pickle whose memo index makes CPython allocate a 4 GiB table
    _pth(os.path.join(out, "memo.pth"), b"\x80\x02K\x01r\xff\xff\xff\x0f.")
    cases.append(("pth: memo index 2**28 - 1", "pth", "memo.pth"))
    # tensors all viewing one deflated storage of 64 MiB of zeros
    numel = 16 << 20
    pickled = (
        b"\x80\x02ccollections\nOrderedDict\n)R("
        + b"".join(_str("t%d" % i) + _tensor("0", numel) for i in range(12))
        + b"u."
    )
    _pth(os.path.join(out, "views.pth"), pickled, [("0", bytes(4 * numel))], zipfile.ZIP_DEFLATED)
    cases.append(("pth: 12 views of one deflated 64 MiB storage", "pth", "views.pth"))
    # YAML alias bomb: 9 levels of 9 aliases
    parts = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        parts.append("&%s [%s]" % ("abcdefghi"[i], ",".join(["*" + "abcdefghi"[i - 1]] * 9)))
    with open(os.path.join(out, "bomb.yaml"), "w") as fh:
        fh.write("data:\n  on_device: [%s]\n" % ",\n    ".join(parts))
    cases.append(("config: 9 x 9 alias bomb", "yaml", "bomb.yaml"))
    # npz image list whose labels deflate from 256 MiB of zeros
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": (32 << 20,)})
    with zipfile.ZipFile(os.path.join(out, "image_list.npz"), "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("labels.npy", buf.getvalue() + bytes(256 << 20))
        zf.writestr("image_files.npy", buf.getvalue() + bytes(256 << 20))
    cases.append(("npz: image list deflating to 2 x 256 MiB", "npz", "image_list.npz"))
    # a tiny MSDN .keras whose config.json declares feature_dim = embed_dim = 8000
    tiny = os.path.join(out, "tiny.keras")
    subprocess.run([sys.executable, "-c", _BUILD_KERAS, tiny], check=True, capture_output=True)
    with zipfile.ZipFile(tiny) as zf:
        items = {i.filename: zf.read(i) for i in zf.infolist()}
    config = json.loads(items["config.json"])
    config["config"].update(feature_dim=8000, embed_dim=8000)
    config["build_config"]["input_shape"] = [1, 6, 8000]
    items["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(os.path.join(out, "tampered.keras"), "w") as zf:
        for name, data in items.items():
            zf.writestr(name, data)
    cases.append(("keras: model.keras declaring F = D = 8000", "keras", "tampered.keras"))
    return cases


_BUILD_KERAS = """import sys, numpy as np
from msdn_tf.model import MSDN
m = MSDN(7, 5, 10, [0, 1, 2, 4, 5], [3, 6], embed_dim=4, class_attributes=np.ones((7, 5), 'float32'),
         attribute_vectors=np.ones((5, 4), 'float32'))
m(np.zeros((1, 6, 10), 'float32'))
m.save(sys.argv[1])
"""


READERS = {  # kind: (imports, the call that reads p)
    "pth": ("from msdn_tf.interop.torch_checkpoint import read_torch_state_dict as r", "r(p)"),
    "yaml": ("from msdn_tf.config import resolve_config", "resolve_config('demo', [p])"),
    "npz": ("from msdn_tf.data.xlsa17 import load_image_list as r", "r(p)"),
    "keras": ("import msdn_tf, msdn_tf.model", "msdn_tf.load_model(p, compile=False)"),
}


# VmHWM (peak resident memory of this process image), not ru_maxrss: Linux carries
# ru_maxrss across exec, so a child would report its parent's peak.
_CHILD = """import sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) // 1024
p = sys.argv[1]
{imports}
before = rss()
try:
    {call}
    said = 'read'
except Exception as e:
    said = type(e).__name__ + ': ' + str(e)[:160]
print(said)
print(before, rss())
"""


def run(kind, path, timeout):
    """``(wall s, (peak RSS MB after imports, after the read) or None if killed, first line it said)``."""
    imports, call = READERS[kind]
    code = _CHILD.format(imports=imports, call=call)
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=timeout)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode or len(lines) < 2:
            return time.perf_counter() - t, None, (proc.stderr.strip().splitlines() or ["?"])[-1][:170]
        return time.perf_counter() - t, tuple(int(x) for x in lines[-1].split()), lines[0][:170]
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t, None, "still running after %d s (killed)" % timeout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--only", nargs="*", help="kinds to run (pth, yaml, npz, keras); default all")
    args = parser.parse_args()
    for label, kind, name in build(args.out):
        if args.only and kind not in args.only:
            continue
        path = os.path.join(args.out, name)
        wall, peak, said = run(kind, path, args.timeout)
        peak_text = "%d -> %d MB" % peak if peak is not None else "?"
        size = os.path.getsize(path)
        print("%-46s %9d B  %6.1f s  peak RSS (imports -> read) %s  | %s" % (label, size, wall, peak_text, said))


if __name__ == "__main__":
    main()
