"""Training precision: ``train.precision`` / ``--precision``, resolved against the hardware.

``float32`` (the default) computes exactly the reference numerics.
``mixed_bfloat16`` and ``mixed_float16`` are Keras dtype policies: the large
feature contraction (the ``(B*R, F) x (F, 4K)`` product, reference note §10) runs
in the 16-bit compute dtype, while variables, the optimizer state, the feature
L2 norm, the softmaxes, the scores, the logits and every loss stay float32
(``MSDN.call`` and the layers cast back before them). ``mixed_float16`` also
wraps the optimizer in a ``LossScaleOptimizer`` (float16's narrow exponent range
would flush small gradients to zero).

``auto`` takes ``mixed_bfloat16`` where the hardware runs bfloat16 natively and
``float32`` elsewhere:

* a CPU with the flag ``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``;
* a GPU of compute capability 8.0 or newer (Ampere, Hopper, ...).

On CPUs without those flags TensorFlow emulates bfloat16, which is slower than
float32 (measured 0.6x on a 2-core Xeon without them, docs/performance.md).

``mixed_float16`` needs float16 hardware: a GPU of compute capability 7.0 or newer,
or a CPU with ``avx512_fp16`` or ``amx_fp16``. Elsewhere (most CPUs) TensorFlow
emulates float16 matrix products, much slower than float32, so asking for it is
an error naming ``train.precision``; set the environment variable
``MSDN_ALLOW_EMULATED_FLOAT16=1`` to run it anyway (for testing the loss-scaling
path on such a machine).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from msdn_tf.errors import ConfigError
from msdn_tf.options import PRECISIONS

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")
EMULATED_FLOAT16_ENV = "MSDN_ALLOW_EMULATED_FLOAT16"


@dataclasses.dataclass(frozen=True)
class Precision:
    """The precision a run uses.

    Attributes:
        requested: the configured value (``auto`` or a policy name).
        policy: the Keras dtype policy actually used (never ``auto``).
        reason: why, in words (for logs, ``results.json`` and the bench report).
    """

    requested: str
    policy: str
    reason: str

    @property
    def loss_scaling(self) -> bool:
        return self.policy == "mixed_float16"

    def to_dict(self) -> dict:
        return {"requested": self.requested, "used": self.policy, "reason": self.reason}


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set:
    """The CPU feature flags of the first processor in ``cpuinfo_path`` (empty where unreadable)."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_compute_capabilities() -> list:
    """``[(major, minor), ...]`` of the visible GPUs (empty on a CPU-only machine), from the Keras backend."""
    from msdn_tf.backend import current

    if current() == "jax":
        import jax

        out = []
        for d in jax.devices():
            if d.platform == "gpu":
                cc = str(getattr(d, "compute_capability", "0.0")).split(".")
                out.append((int(cc[0]), int(cc[1]) if len(cc) > 1 else 0))
        return out
    import tensorflow as tf

    out = []
    for gpu in tf.config.list_physical_devices("GPU"):
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        out.append(tuple(cc) if cc else (0, 0))
    return out


def _backend(backend: Optional[str]) -> str:
    from msdn_tf.backend import current

    return current() if backend is None else backend


JAX_CPU_BF16_NOTE = (
    "JAX's CPU compiler (XLA:CPU) does not use the CPU's bfloat16 instructions: its bfloat16 products "
    "measured slower than its float32 ones (docs/performance.md)"
)


def _native(
    min_cc: tuple, gpu_note: str, cpu_flag_names, flags: Optional[set], gpus: Optional[list], cpu_counts: bool = True
) -> Optional[str]:
    """Why a dtype runs natively here: every GPU at ``min_cc`` or above, or (no GPU, ``cpu_counts``)
    one of ``cpu_flag_names`` among the CPU flags; ``None`` where it does not."""
    gpus = gpu_compute_capabilities() if gpus is None else gpus
    if gpus:
        if all(cc >= min_cc for cc in gpus):
            return f"GPU compute capability {'.'.join(map(str, min(gpus)))} ({gpu_note})"
        return None
    if not cpu_counts:
        return None
    flags = cpu_flags() if flags is None else flags
    found = [f for f in cpu_flag_names if f in flags]
    return f"CPU flag {' and '.join(found)}" if found else None


def native_bfloat16(
    flags: Optional[set] = None, gpus: Optional[list] = None, backend: Optional[str] = None
) -> Optional[str]:
    """Why bfloat16 runs natively here (a short text), or ``None`` where it does not.

    ``backend``: the Keras backend (default the current one). On JAX a CPU's bfloat16
    flags do not count (:data:`JAX_CPU_BF16_NOTE`); GPUs do on both backends.
    """
    cpu_counts = gpus or _backend(backend) != "jax"
    return _native((8, 0), ">= 8.0 runs bfloat16 natively", BF16_CPU_FLAGS, flags, gpus, cpu_counts=bool(cpu_counts))


def native_float16(flags: Optional[set] = None, gpus: Optional[list] = None) -> Optional[str]:
    """Why float16 runs natively here (a short text), or ``None`` where it does not."""
    return _native((7, 0), ">= 7.0 has float16 tensor cores", FP16_CPU_FLAGS, flags, gpus)


def resolve_precision(
    name: str,
    setting: str = "train.precision",
    flags: Optional[set] = None,
    gpus: Optional[list] = None,
    environ=None,
    backend: Optional[str] = None,
) -> Precision:
    """The :class:`Precision` to use for the configured ``name``.

    Args:
        name: ``float32``, ``mixed_bfloat16``, ``mixed_float16`` or ``auto``.
        setting: the config key or option named in errors.
        flags, gpus, environ: the CPU flags, GPU compute capabilities and environment
            to decide on (default: this machine's; injectable for tests).
        backend: the Keras backend (default the current one): on JAX, ``auto`` ignores
            the CPU's bfloat16 flags (:data:`JAX_CPU_BF16_NOTE`).

    Returns:
        A :class:`Precision` whose ``policy`` is never ``auto``.

    Raises:
        ConfigError: an unknown name, or ``mixed_float16`` without float16 hardware.

    Example:
        >>> resolve_precision("auto", flags={"avx512_bf16"}, gpus=[]).policy
        'mixed_bfloat16'
    """
    environ = os.environ if environ is None else environ
    if name not in PRECISIONS:
        raise ConfigError(f"'{setting}' must be one of {', '.join(PRECISIONS)}; got {name!r}")
    if name == "float32":
        return Precision(name, "float32", "requested")
    if name == "mixed_bfloat16":
        why = native_bfloat16(flags, gpus, backend)
        return Precision(
            name,
            name,
            "requested" + ("" if why else " (no native bfloat16 here: emulated, expect it slower than float32)"),
        )
    if name == "mixed_float16":
        why = native_float16(flags, gpus)
        if why:
            return Precision(name, name, f"requested; {why}")
        if environ.get(EMULATED_FLOAT16_ENV) == "1":
            return Precision(name, name, f"requested; float16 emulated ({EMULATED_FLOAT16_ENV}=1)")
        raise ConfigError(
            f"'{setting}' is mixed_float16 but this machine has no float16 hardware (no GPU of compute "
            f"capability >= 7.0, no CPU flag {' or '.join(FP16_CPU_FLAGS)}); TensorFlow would emulate it, "
            f"far slower than float32. Use auto, mixed_bfloat16 or float32 (or set "
            f"{EMULATED_FLOAT16_ENV}=1 to run it emulated anyway)"
        )
    why = native_bfloat16(flags, gpus, backend)
    if why:
        return Precision(name, "mixed_bfloat16", f"auto: {why}")
    if not gpus and _backend(backend) == "jax":
        return Precision(name, "float32", f"auto: no GPU; {JAX_CPU_BF16_NOTE}")
    return Precision(
        name,
        "float32",
        f"auto: no native bfloat16 (no GPU of compute capability >= 8.0, no CPU flag {' or '.join(BF16_CPU_FLAGS)})",
    )
