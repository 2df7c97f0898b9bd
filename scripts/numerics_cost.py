"""Cost of the training step's numeric checks (docs/reliability.md): ``PYTHONPATH=. python scripts/numerics_cost.py``.

Times, interleaved over 15 repeats, at CUB shapes (B=50, R=196, F=2048, K=312, C=200):
the compiled training step with ``check_numerics`` on and off, and ``MSDN.nonfinite_code`` alone.
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf

from msdn_tf.model import MSDN
from msdn_tf.perf.model_speed import build_bench_model

model, seen = build_bench_model(196, 2048, 312, 200, 50, 300, jit=False)
x = tf.constant(np.random.default_rng(0).random((50, 196, 2048), dtype=np.float32))
y = tf.constant(np.asarray(seen)[np.random.default_rng(1).integers(0, 150, 50)])
variables = model.trainable_variables
grads = [tf.constant(np.ones(v.shape, "float32")) for v in variables]
check = tf.function(lambda: MSDN.nonfinite_code(x, grads, variables))
fns = {}
for flag in (True, False):
    m, _ = build_bench_model(196, 2048, 312, 200, 50, 300, jit=False)
    m.check_numerics = flag
    m.make_train_function()
    fns[flag] = lambda m=m: float(m.train_function([(x, y)])["loss"])
fns["check_only"] = lambda: float(check())
times = {k: [] for k in fns}
for f in fns.values():  # warm up
    f()
    f()
for _ in range(15):  # interleaved: load changes hit all alike
    for k, f in fns.items():
        t = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t)
for k, t in times.items():
    print(f"{str(k):10s} median {statistics.median(t) * 1e3:8.2f} ms  min {min(t) * 1e3:8.2f} ms")
print("load", os.getloadavg())
