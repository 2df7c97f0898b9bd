"""Every option list of msdn-tf, defined once.

The config validation (:data:`CONFIG_CHOICES`, read by :func:`msdn_tf.config.validate`), the model's argument checks,
the losses, the distribution strategies, the precision policies and the commands'
``argparse`` choices all read these tuples; nothing else spells them out.
"""

from __future__ import annotations

#: ``data.sampler``: uniform batches (reference CUB), distinct seen classes (SUN/AWA2), shuffled epochs.
SAMPLERS = ("random", "class_balanced", "epoch")
#: ``data.cache_dtype``: dtype of the prepared feature cache.
CACHE_DTYPES = ("float16", "float32")
#: ``data.on_device``: hold the training rows in TensorFlow memory.
ON_DEVICE = (True, False, "auto")
#: ``model.branches``: which sub-nets are trained (Table 2 ablations).
BRANCHES = ("both", "a2v", "v2a")
#: ``model.attention``: A->V attention, or the global-average-pooling baseline.
ATTENTIONS = ("softmax", "uniform")
#: ``loss.cross_entropy``: softmax over all classes (reference) or seen classes (paper Eq. 7).
CROSS_ENTROPY_FORMS = ("all", "seen")
#: ``loss.calibration``: batch unseen mass (reference) or the paper's indicator form (Eq. 7).
CALIBRATION_FORMS = ("batch_mass", "indicator")
#: ``loss.distillation``: reference, paper (Eq. 8), one term only, or none.
DISTILLATION_FORMS = ("reference", "paper", "jsd", "logit", "none")
#: ``train.strategy``: tf.distribute strategies (TensorFlow backend only).
STRATEGIES = ("none", "mirrored", "multi_worker")
#: ``train.precision``: Keras dtype policies, or ``auto`` (bfloat16 where the hardware runs it natively).
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "auto")

#: ``(section, key)`` -> allowed values, for :func:`msdn_tf.config.validate`.
CONFIG_CHOICES = {
    ("data", "sampler"): SAMPLERS,
    ("data", "cache_dtype"): CACHE_DTYPES,
    ("data", "on_device"): ON_DEVICE,
    ("model", "branches"): BRANCHES,
    ("model", "attention"): ATTENTIONS,
    ("loss", "cross_entropy"): CROSS_ENTROPY_FORMS,
    ("loss", "calibration"): CALIBRATION_FORMS,
    ("loss", "distillation"): DISTILLATION_FORMS,
    ("train", "strategy"): STRATEGIES,
    ("train", "precision"): PRECISIONS,
}
