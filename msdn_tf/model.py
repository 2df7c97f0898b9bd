"""The MSDN model: two attention sub-nets, their losses, fusion and training step."""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np
from keras import ops

from msdn_tf import distribute as D
from msdn_tf import losses as L
from msdn_tf import options
from msdn_tf.backend import on_jax as _on_jax  # Keras' JAX trainer calls the steps with an explicit state
from msdn_tf.layers import AttributeEmbedding, AttributeToVisual, VisualToAttribute
from msdn_tf.layers.common import as_regions, contract, l2_normalize, split_last

LOSS_TERMS = ("ce_a2v", "cal_a2v", "ce_v2a", "cal_v2a", "distill", "loss")
NONFINITE = "nonfinite"
NONFINITE_CHECKS = ("input features", "gradients", "weights after the update")
# The outputs ``compile(metrics=...)`` may name (a dict of metrics); a list applies to ``logits``.
METRIC_OUTPUTS = ("logits", "logits_a2v", "logits_v2a")


@keras.saving.register_keras_serializable(package="msdn_tf")
class MSDN(keras.Model):
    """Mutually Semantic Distillation Network for zero-shot classification.

    The attribute->visual sub-net (:class:`AttributeToVisual`) and the
    visual->attribute sub-net (:class:`VisualToAttribute`) share the attribute
    vectors ``V`` and the class attributes ``att`` (:class:`AttributeEmbedding`).
    Each produces class logits ``att @ scores + bias * mask_bias``; the fused
    logits are ``w1 * S1 + w2 * S2``. ``train_step`` minimises, for each sub-net,
    cross-entropy plus ``lambda_cal`` times self-calibration, plus
    ``distill_weight`` times the mutual distillation (docs/reference.md §4).

    Use :func:`build_msdn` to make one from a dataset's arrays.

    ``call`` runs the four feature contractions of both sub-nets as ONE
    ``(B*R, F) x (F, 4K)`` product on the sub-nets' projections (their
    ``projections``/``attend`` methods; the layers' own ``call`` does the same per
    sub-net). Under a mixed-precision policy the product runs in the compute dtype
    while norms, softmaxes, scores, logits and losses stay float32.

    Args:
        num_classes: int, C.
        num_attributes: int, K.
        feature_dim: int, F (2048 for ResNet-101 maps).
        seen_classes, unseen_classes: class ids (0-based).
        embed_dim: int, D, word-vector size, default 300.
        normalize_attribute_vectors: bool, re-normalise ``V`` on every call (AWA2).
        fusion_weights: ``(w1, w2)`` for the A->V and V->A logits at test time.
        lambda_cal: weight of self-calibration, one for both sub-nets.
        distill_weight: weight of the distillation term.
        cross_entropy: ``"all"`` (reference) or ``"seen"`` (paper Eq. 7).
        calibration: ``"batch_mass"`` (reference) or ``"indicator"`` (paper Eq. 7).
        distillation: ``reference``, ``paper``, ``jsd``, ``logit`` or ``none`` (Eq. 8).
        branches: ``"both"``, ``"a2v"`` or ``"v2a"``: which sub-nets are trained
            (the ablations of Table 2).
        attention: ``"softmax"`` or ``"uniform"`` for the A->V sub-net (``uniform``
            is the global-average-pooling baseline).
        bias: float, the margin size: ``bias * mask_bias`` adds +bias to unseen and
            -bias to seen logits, in training and at test (the reference's default 1,
            docs/reference.md §2). Self-calibration and distillation see it; the cross-entropy
            removes it; the fused test logits keep it, which is calibrated stacking
            with gamma = 2 * bias. 0 disables it.
        return_features: bool, also return ``F_p`` and ``u`` (for visualisation).
        class_attributes, attribute_vectors: optional initial ``att`` and word vectors
            (not part of the config; they are restored from saved weights).
        seed: optional int seed of ``W_1``'s initializer.
        **kwargs: forwarded to ``keras.Model``; ``dtype`` (a Keras dtype policy such as
            ``"mixed_bfloat16"``, default the global policy) also sets the sub-layers'
            policy and is saved by ``get_config`` (``msdn_tf.precision``).

    Keras conventions: MSDN owns its loss, so ``compile(loss=...)`` is refused (set the
    ``loss.*`` keys of the config, or ``lambda_cal``, ``distill_weight``, ``cross_entropy``,
    ``calibration`` and ``distillation`` here). ``compile(metrics=[...])`` is honoured: a
    list is computed on the fused ``logits`` against the integer labels (``"accuracy"`` is
    the top-1 accuracy over all C classes, the margin included), a dict may name
    ``logits``, ``logits_a2v`` and ``logits_v2a``; ``fit`` and ``evaluate`` report them
    next to the loss terms. ``predict`` takes ``(B, R, F)`` and ``(B, H, W, F)`` features
    in any order; ``build`` on a built (or loaded) model checks the shape and keeps the weights.

    Call returns a dict: ``logits_a2v``, ``logits_v2a``, ``logits`` (B, C);
    ``scores_a2v``, ``scores_v2a`` (B, K); ``attention_a2v`` (B, K, R) summing to
    1 over regions; ``attention_v2a`` (B, K, R) summing to 1 over attributes; and
    with ``return_features``: ``features_a2v`` (B, K, F), ``features_v2a`` (B, R, D).

    Example:
        >>> model = build_msdn(att, w2v, seen, unseen, feature_dim=2048)
        >>> out = model(np.zeros((2, 196, 2048), "float32"))
        >>> out["logits"].shape
        (2, C)

    Reference:
        Chen et al., "MSDN: Mutually Semantic Distillation Network for Zero-Shot
        Learning", CVPR 2022, §3 (Eqs. 1-11); shiming-chen/MSDN at ec3598b.
    """

    def __init__(
        self,
        num_classes,
        num_attributes,
        feature_dim,
        seen_classes,
        unseen_classes,
        embed_dim=300,
        normalize_attribute_vectors=False,
        fusion_weights=(0.9, 0.1),
        lambda_cal=0.1,
        distill_weight=0.001,
        cross_entropy="all",
        calibration="batch_mass",
        distillation="reference",
        branches="both",
        attention="softmax",
        bias=1.0,
        return_features=False,
        class_attributes=None,
        attribute_vectors=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_choice("cross_entropy", cross_entropy, options.CROSS_ENTROPY_FORMS)
        _check_choice("calibration", calibration, options.CALIBRATION_FORMS)
        _check_choice("distillation", distillation, options.DISTILLATION_FORMS)
        _check_choice("branches", branches, options.BRANCHES)
        _check_choice("attention", attention, options.ATTENTIONS)
        self.num_classes = int(num_classes)
        self.num_attributes = int(num_attributes)
        self.feature_dim = int(feature_dim)
        self.embed_dim = int(embed_dim)
        self.seen_classes = [int(c) for c in seen_classes]
        self.unseen_classes = [int(c) for c in unseen_classes]
        _check_classes(self.seen_classes, self.unseen_classes, self.num_classes)
        self.normalize_attribute_vectors = bool(normalize_attribute_vectors)
        self.fusion_weights = tuple(float(w) for w in fusion_weights)
        if len(self.fusion_weights) != 2:
            raise ValueError(f"fusion_weights must be (w1, w2), got {fusion_weights!r}")
        self.lambda_cal = float(lambda_cal)
        self.distill_weight = float(distill_weight)
        self.cross_entropy = cross_entropy
        self.calibration = calibration
        self.distillation = distillation
        self.branches = branches
        self.attention = attention
        self.bias_value = float(bias)
        self.return_features = bool(return_features)
        self.seed = seed

        # The sub-layers follow the model's dtype policy (``dtype=`` or the global one),
        # which get_config saves, so a model trained mixed loads mixed.
        policy = self.dtype_policy
        self.embedding = AttributeEmbedding(
            self.num_attributes,
            self.embed_dim,
            self.num_classes,
            normalize=self.normalize_attribute_vectors,
            attribute_vectors=attribute_vectors,
            class_attributes=class_attributes,
            name="attribute_embedding",
            dtype=policy,
        )
        self.a2v = AttributeToVisual(
            self.feature_dim, self.embed_dim, attention=attention, seed=seed, name="attribute_to_visual", dtype=policy
        )
        self.v2a = VisualToAttribute(self.feature_dim, self.embed_dim, name="visual_to_attribute", dtype=policy)

        unseen = np.zeros((self.num_classes,), "float32")
        unseen[self.unseen_classes] = 1.0
        self._unseen_mask = unseen
        self._seen_mask = (1.0 - unseen).astype("float32")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_TERMS}
        # Sum over the steps of a fit() of the non-finite code (see nonfinite_code); 0 while all is finite.
        self.trackers[NONFINITE] = keras.metrics.Sum(name=NONFINITE)
        self.check_numerics = True  # a run-time switch, not part of the config (train.check_numerics)
        self._step_functions = {}  # (kind, input rank) -> Keras' compiled predict/test function

    # ------------------------------------------------------------------ Keras conventions
    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, metrics=None, **kwargs):
        """``keras.Model.compile`` without ``loss``/``loss_weights``: MSDN computes its own loss.

        Args:
            optimizer: as for Keras (the training loop uses ``msdn_tf.optimizers.TorchRMSprop``).
            loss, loss_weights: must be None; the loss is :meth:`compute_loss_terms`.
            metrics: a list of Keras metrics computed on the fused ``logits`` and the integer
                labels, or a dict keyed by ``logits``, ``logits_a2v``, ``logits_v2a``.
            **kwargs: ``weighted_metrics``, ``jit_compile``, ``steps_per_execution``, ... as for Keras.

        Raises:
            ValueError: a ``loss``/``loss_weights`` was given, or a metrics dict names another output.

        Example:
            >>> model.compile(optimizer=TorchRMSprop(1e-4), metrics=["accuracy"])
            >>> model.evaluate(features, labels, return_dict=True)["accuracy"]
        """
        if loss is not None or loss_weights is not None:
            raise ValueError(
                "MSDN computes its own loss (cross-entropy + lambda_cal * self-calibration per sub-net + "
                "distill_weight * distillation, docs/reference.md §4); compile() takes no loss= or loss_weights=. "
                "Set the loss.* keys of the config (loss.lambda_cal, loss.distill_weight, loss.cross_entropy, "
                "loss.calibration, loss.distillation) or the MSDN arguments of the same names."
            )
        for name, value in (("metrics", metrics), ("weighted_metrics", kwargs.get("weighted_metrics"))):
            if isinstance(value, dict) and not set(value) <= set(METRIC_OUTPUTS):
                raise ValueError(
                    f"compile({name}=...): a dict may name the outputs {', '.join(METRIC_OUTPUTS)}; "
                    f"got {sorted(set(value) - set(METRIC_OUTPUTS))}"
                )
        self._step_functions, self._predict_rank, self._test_rank = {}, None, None
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        """Compile a loaded model as it was saved (``keras.saving.load_model`` calls this).

        Keras skips ``compile`` on loading for a model whose ``compile`` is overridden
        unless the model says how; MSDN's takes the saved arguments unchanged (its saved
        ``loss`` is always None), so the optimizer and the compiled metrics come back.
        """
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)  # its variables, so the saved optimizer state loads

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Update the metrics of ``compile(metrics=...)`` on this batch; their results as a dict.

        ``y`` are the integer labels, ``y_pred`` the dict :meth:`call` returns. The loss
        trackers are updated by the steps themselves, not here.
        """
        compiled = self._compile_metrics
        if compiled is None:
            return {}
        if self._metrics_per_output():
            y_true = {name: y for name in METRIC_OUTPUTS}
            y_pred = {name: y_pred[name] for name in METRIC_OUTPUTS}
            weights = None if sample_weight is None else {name: sample_weight for name in METRIC_OUTPUTS}
        else:
            y_true, y_pred, weights = y, y_pred["logits"], sample_weight
        compiled.update_state(y_true, y_pred, sample_weight=weights)
        return dict(compiled.result())

    def _metrics_per_output(self) -> bool:
        compiled = self._compile_metrics
        return any(isinstance(m, dict) for m in (compiled._user_metrics, compiled._user_weighted_metrics))

    def _compiled_function(self, kind, x):
        """Keras' ``predict``/``test`` function for inputs of ``x``'s rank, one per rank.

        TensorFlow relaxes a ``tf.function`` traced with (B, R, F) to an unknown rank when
        it next sees (B, H, W, F); MSDN's reshape needs the rank, so each rank gets its own.
        """
        rank = _input_rank(x)
        attr = f"{kind}_function"
        current = getattr(self, f"_{kind}_rank", None)
        if rank is None or rank == current:
            return
        if current is not None and getattr(self, attr, None) is not None:
            self._step_functions[(kind, current)] = getattr(self, attr)
        setattr(self, attr, self._step_functions.get((kind, rank)))
        setattr(self, f"_{kind}_rank", rank)

    def predict(self, x, *args, **kwargs):
        self._compiled_function("predict", x)
        return super().predict(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        self._compiled_function("test", x)
        return super().evaluate(x, *args, **kwargs)

    # ------------------------------------------------------------------ weights
    def build(self, input_shape):
        """Create the weights for features of ``input_shape``: ``(B, R, F)`` or ``(B, H, W, F)``.

        On a model that is already built (e.g. loaded) only the shape is checked: the
        weights do not depend on ``B``, ``R``, ``H`` or ``W``.
        """
        shape = tuple(input_shape)
        if len(shape) not in (3, 4) or shape[-1] not in (None, self.feature_dim):
            raise ValueError(
                f"MSDN.build: features must be (batch, regions, {self.feature_dim}) or "
                f"(batch, height, width, {self.feature_dim}); got input_shape {shape}"
            )
        if self.built:
            return
        regions = shape[1]
        if len(shape) == 4:
            regions = None if None in shape[1:3] else shape[1] * shape[2]
        features = (shape[0], regions, self.feature_dim)
        vectors = (self.num_attributes, self.embed_dim)
        self.embedding.build(None)
        self.a2v.build([features, vectors])
        self.v2a.build([features, vectors])
        # Reference state_dict entries: margin size and sign (+1 unseen, -1 seen).
        self.bias = self.add_weight(
            name="bias",
            shape=(),
            trainable=False,
            autocast=False,
            initializer=keras.initializers.Constant(self.bias_value),
        )
        mask = (2.0 * self._unseen_mask - 1.0).reshape(1, -1)
        self.mask_bias = self.add_weight(
            name="mask_bias",
            shape=(1, self.num_classes),
            trainable=False,
            autocast=False,
            initializer=lambda shape, dtype=None: ops.convert_to_tensor(mask, dtype=dtype),
        )
        self.built = True

    @property
    def metrics(self):
        """The loss trackers (and the internal ``nonfinite`` check), then the metrics of ``compile``."""
        compiled = getattr(self, "_compile_metrics", None)
        return list(self.trackers.values()) + ([compiled] if compiled is not None else [])

    # ------------------------------------------------------------------ forward
    def margin(self):
        """``bias * mask_bias`` (1, C): the reference's additive class margin."""
        return self.bias * self.mask_bias

    def call(self, features, training=False, return_features=None):
        out = self.attribute_outputs(features, return_features=return_features)
        att = self.embedding.att  # (C, K)
        logits = self.class_logits(out["scores_a2v"], out["scores_v2a"], att, self.margin())
        return {**logits, **out}

    def attribute_outputs(self, features, return_features=None):
        """Everything of :meth:`call` that does not depend on the class set (keras.ops).

        Returns ``scores_a2v``, ``scores_v2a`` (B, K), ``attention_a2v``,
        ``attention_v2a`` (B, K, R) and, with ``return_features``, ``features_a2v``
        and ``features_v2a``. :meth:`class_logits` turns the scores into logits over
        any class-attribute matrix: ``call`` uses the model's ``att``, a re-targeted
        export (:mod:`msdn_tf.zeroshot`) the rows of another class set.
        """
        return_features = self.return_features if return_features is None else return_features
        features = as_regions(ops.convert_to_tensor(features))
        # Every region over its channels; the norm in float32 also under a mixed policy.
        features = ops.cast(l2_normalize(ops.cast(features, "float32"), axis=-1), self.compute_dtype)
        V = self.embedding(None)  # (K, D)
        # One (B*R, F) x (F, 4K) product for the four contractions of both sub-nets:
        # [(V W_1)^T, (V W_2)^T | W_1_1 V^T, (V W_2_1)^T], each (F, K), V contracted first.
        blocks_a2v = self.a2v.projections(V)
        blocks_v2a = self.v2a.projections(V)
        products = contract(features, ops.concatenate(blocks_a2v + blocks_v2a, axis=1))  # (B, R, 4K)
        parts = split_last(products, [self.num_attributes] * (len(blocks_a2v) + len(blocks_v2a)))
        out_a2v = self.a2v.attend(parts[: len(blocks_a2v)], features, return_features=return_features)
        out_v2a = self.v2a.attend(parts[len(blocks_a2v) :], V, return_features=return_features)
        out = {
            "scores_a2v": out_a2v["scores"],
            "scores_v2a": out_v2a["scores"],
            "attention_a2v": out_a2v["attention"],
            "attention_v2a": out_v2a["attention"],
        }
        if return_features:
            out["features_a2v"] = out_a2v["features"]
            out["features_v2a"] = out_v2a["features"]
        return out

    def class_logits(self, scores_a2v, scores_v2a, att, margin):
        """``logits_a2v``, ``logits_v2a`` and fused ``logits`` (B, C') over the class rows ``att``.

        Args:
            scores_a2v, scores_v2a: attribute scores (B, K) of :meth:`attribute_outputs`.
            att: (C', K) model-ready class attributes (rows L2-normalised, §1.4).
            margin: (1, C') or (C',) additive margin, ``bias * (+1 unseen, -1 seen)``.
        """
        dtype = scores_a2v.dtype  # float32 also under a mixed policy
        att = ops.cast(att, dtype)
        margin = ops.reshape(ops.cast(margin, dtype), (1, -1))
        logits_a2v = ops.matmul(scores_a2v, ops.transpose(att)) + margin  # (B, C')
        logits_v2a = ops.matmul(scores_v2a, ops.transpose(att)) + margin  # (B, C')
        w1, w2 = self.fusion_weights
        return {"logits_a2v": logits_a2v, "logits_v2a": logits_v2a, "logits": w1 * logits_a2v + w2 * logits_v2a}

    # ------------------------------------------------------------------ losses
    def compute_loss_terms(self, outputs, labels):
        """Every loss term of §4 from the model outputs, as a dict of scalars (keys ``LOSS_TERMS``).

        Under a ``tf.distribute`` strategy with several replicas, the batch-mass
        self-calibration is that of the global batch (all-reduced); the other terms
        are means over this replica's slice (see :meth:`train_step` for their weighting).
        """
        distributed = _distributed()
        margin = ops.cast(self.margin(), outputs["logits_a2v"].dtype)
        terms = {}
        for branch in ("a2v", "v2a"):
            logits = outputs[f"logits_{branch}"]
            if self.branches not in ("both", branch):
                terms[f"ce_{branch}"] = ops.zeros((), logits.dtype)
                terms[f"cal_{branch}"] = ops.zeros((), logits.dtype)
                continue
            # Only the cross-entropy removes the margin (docs/reference.md §4).
            raw = logits - margin
            if self.cross_entropy == "all":
                terms[f"ce_{branch}"] = L.cross_entropy(raw, labels)
            else:
                terms[f"ce_{branch}"] = L.cross_entropy_seen(raw, labels, self._seen_mask)
            if self.calibration == "batch_mass" and distributed:
                # -log of the GLOBAL batch-mean unseen mass (logits WITH the margin),
                # all-reduced over the replicas.
                terms[f"cal_{branch}"] = -D.cross_replica_log_mean_exp(L.log_unseen_mass(logits, self._unseen_mask))
            elif self.calibration == "batch_mass":
                # Reference: on the logits WITH the margin, the code's form of the ±1 indicator.
                terms[f"cal_{branch}"] = L.self_calibration(logits, self._unseen_mask)
            else:
                # Paper Eq. 7: its own ±1 indicator on the margin-free logits, whatever ``bias`` is.
                terms[f"cal_{branch}"] = L.self_calibration_paper(raw, self._unseen_mask)
        if self.branches == "both":
            # On the logits WITH the margin: it cancels in S1 - S2 but not in the JSD.
            terms["distill"] = L.distillation(outputs["logits_a2v"], outputs["logits_v2a"], self.distillation)
        else:
            terms["distill"] = ops.zeros((), outputs["logits"].dtype)
        terms["loss"] = (
            terms["ce_a2v"]
            + self.lambda_cal * terms["cal_a2v"]
            + terms["ce_v2a"]
            + self.lambda_cal * terms["cal_v2a"]
            + self.distill_weight * terms["distill"]
        )
        return terms

    # ------------------------------------------------------------------ the training step
    # One definition for both backends: ``step_loss`` (what is differentiated) and
    # ``record_step`` (trackers and non-finite checks). TensorFlow's ``train_step``
    # differentiates with a ``GradientTape``; JAX's (msdn_tf.training_jax) calls the
    # same two methods around ``jax.value_and_grad`` and ``optimizer.stateless_apply``.
    def step_loss(self, outputs, labels):
        """``(loss to differentiate, terms)`` of one training batch from the model outputs.

        ``terms`` is :meth:`compute_loss_terms`. Under a ``tf.distribute`` strategy with
        several replicas the loss is weighted by this replica's share of the global batch
        (the optimizer SUMS the replicas' gradients, so the sum is the gradient of the
        global-batch mean); then the optimizer scales it (a ``LossScaleOptimizer`` does,
        others pass it through).

        Args:
            outputs: the model's outputs for the batch (``call(..., training=True)``).
            labels: ``(B,)`` class ids.

        Returns:
            ``(scalar, dict of scalars)``.
        """
        terms = self.compute_loss_terms(outputs, labels)
        loss = terms["loss"]
        if _distributed():
            loss = loss * D.local_batch_weight(ops.shape(labels)[0], loss.dtype)
        return self.optimizer.scale_loss(loss), terms

    def record_step(self, terms, labels, features=None, grads=None, variables=None, outputs=None, log_nonfinite=False):
        """Add one step's loss terms to the trackers; the logs (their running means).

        With ``features``, ``grads`` and ``variables`` given and ``check_numerics`` on,
        also adds this step's :meth:`nonfinite_code` to the ``nonfinite`` tracker (not to
        the logs unless ``log_nonfinite``: it is not a metric; the non-finite guard reads
        the tracker; the stateless JAX step logs it, as its trackers live outside the model
        until the loop ends). With
        ``outputs`` the metrics of ``compile(metrics=...)`` are updated and logged
        (:meth:`compute_metrics`). Under several replicas the trackers are weighted by the
        replica's batch size, so they hold global-batch means.

        Args:
            terms: :meth:`compute_loss_terms` of the batch.
            labels: ``(B,)`` the batch's labels (for its size).
            features, grads, variables: the batch, the gradients and the weights after
                the update (training); ``None`` in evaluation.
            outputs: the dict :meth:`call` returned for the batch (for the compiled metrics).

        Returns:
            ``{name: running mean}`` for every term, and the compiled metrics' results.
        """
        weight = _replica_batch_weight(ops.shape(labels)[0], terms["loss"].dtype)
        for name, value in terms.items():
            self.trackers[name].update_state(value, sample_weight=weight)
        logs = {name: self.trackers[name].result() for name in terms}
        if self.check_numerics and grads is not None:
            self.trackers[NONFINITE].update_state(self.nonfinite_code(features, grads, variables))
            if log_nonfinite:
                logs[NONFINITE] = self.trackers[NONFINITE].result()
        if outputs is not None:
            logs.update(self.compute_metrics(features, labels, outputs))
        return logs

    def train_step(self, *args):
        """One optimizer step on ``(features, labels)``.

        TensorFlow: ``train_step(data)``, the gradient by ``tf.GradientTape``. JAX
        (Keras calls ``train_step(state, data)``): :func:`msdn_tf.training_jax.train_step`,
        the stateless form of the same step. Both run :meth:`step_loss` and
        :meth:`record_step`.
        """
        if _on_jax():
            from msdn_tf import training_jax

            return training_jax.train_step(self, *args)
        import tensorflow as tf  # TensorFlow-specific by design: the custom training step

        (data,) = args
        features, labels = data[0], data[1]
        with tf.GradientTape() as tape:
            outputs = self(features, training=True, return_features=False)
            loss, terms = self.step_loss(outputs, labels)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply(grads, variables)
        return self.record_step(terms, labels, features, grads, variables, outputs=outputs)

    @staticmethod
    def nonfinite_code(features, grads, variables):
        """One number saying which of :data:`NONFINITE_CHECKS` found a NaN or inf in this step.

        Digit ``i`` in base ``replicas + 1`` counts the replicas whose check ``i`` failed
        (input features, gradients, weights after the update), so the all-reduced sum
        over replicas still says which check failed; 0 when everything is finite. The
        loss terms need no check here: their running means in the logs turn non-finite
        at the same step. Cost: one ``isfinite`` pass over the batch and the weights.
        """
        base = float(D.num_replicas() + 1)

        def bad(tensors):
            flags = [ops.all(ops.isfinite(t)) for t in tensors if t is not None]
            return 1.0 - ops.cast(ops.all(ops.stack(flags)), "float32")  # small integers: exact

        return bad([features]) + base * bad(grads) + base * base * bad(variables)

    def test_step(self, *args):
        if _on_jax():  # Keras' JAX trainer calls test_step(state, data)
            from msdn_tf import training_jax

            return training_jax.test_step(self, *args)
        (data,) = args
        features, labels = data[0], data[1]
        outputs = self(features, training=False, return_features=False)
        return self.record_step(self.compute_loss_terms(outputs, labels), labels, features, outputs=outputs)

    def predict_step(self, *args):
        if _on_jax():  # Keras' JAX trainer calls predict_step(state, data)
            from msdn_tf import training_jax

            return training_jax.predict_step(self, *args)
        (data,) = args
        features = data[0] if isinstance(data, (tuple, list)) else data
        outputs = self(features, training=False, return_features=False)
        return {k: outputs[k] for k in ("logits", "logits_a2v", "logits_v2a")}

    # ------------------------------------------------------------------ config
    def get_config(self):
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "num_attributes": self.num_attributes,
            "feature_dim": self.feature_dim,
            "seen_classes": list(self.seen_classes),
            "unseen_classes": list(self.unseen_classes),
            "embed_dim": self.embed_dim,
            "normalize_attribute_vectors": self.normalize_attribute_vectors,
            "fusion_weights": list(self.fusion_weights),
            "lambda_cal": self.lambda_cal,
            "distill_weight": self.distill_weight,
            "cross_entropy": self.cross_entropy,
            "calibration": self.calibration,
            "distillation": self.distillation,
            "branches": self.branches,
            "attention": self.attention,
            "bias": self.bias_value,
            "return_features": self.return_features,
            "seed": self.seed,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }


def _input_rank(x):
    """The rank of the features in ``x`` (an array, a tensor or a ``tf.data.Dataset``), or None."""
    if hasattr(x, "element_spec"):
        spec = x.element_spec
        x = spec[0] if isinstance(spec, (tuple, list)) else spec
    shape = getattr(x, "shape", None)
    try:
        return None if shape is None else len(shape)
    except TypeError:  # a TensorShape of unknown rank
        return None


def _distributed() -> bool:
    """True inside a replica context of a strategy with more than one replica."""
    return D.num_replicas() > 1


def _replica_batch_weight(batch, dtype):
    """Tracker sample weight: the replica's batch size under several replicas, else ``None`` (plain mean)."""
    return ops.cast(batch, dtype) if _distributed() else None


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_classes(seen, unseen, num_classes):
    overlap = sorted(set(seen) & set(unseen))
    if overlap:
        raise ValueError(f"seen and unseen classes overlap: {overlap[:10]}")
    bad = [c for c in list(seen) + list(unseen) if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class ids must lie in [0, {num_classes}), got {bad[:10]}")
    if not unseen:
        raise ValueError("unseen_classes is empty: zero-shot learning needs at least one unseen class")


def build_msdn(
    class_attributes,
    attribute_vectors,
    seen_classes,
    unseen_classes,
    feature_dim: int = 2048,
    num_regions: Optional[int] = None,
    **options,
) -> MSDN:
    """Build and initialise an MSDN model from a dataset's class semantics.

    Args:
        class_attributes: ``(C, K)`` class attributes, model-ready (rows
            L2-normalised, docs/reference.md §1.4; see
            :func:`msdn_tf.data.base.class_attributes_for_model`).
        attribute_vectors: ``(K, D)`` attribute word vectors; ``V`` starts as these
            with rows L2-normalised.
        seen_classes, unseen_classes: 0-based class ids.
        feature_dim: F, channels of the region features.
        num_regions: R, if known, to build with a fixed input shape (optional).
        **options: any other :class:`MSDN` argument (``fusion_weights``,
            ``lambda_cal``, ``distill_weight``, ``normalize_attribute_vectors``, ...).

    Returns:
        A built :class:`MSDN` (not compiled).

    Example:
        >>> model = build_msdn(data.att, data.w2v, data.seen_classes, data.unseen_classes,
        ...                    feature_dim=2048, fusion_weights=(0.9, 0.1))
    """
    att = np.asarray(class_attributes, dtype=np.float32)
    vectors = np.asarray(attribute_vectors, dtype=np.float32)
    if att.ndim != 2 or vectors.ndim != 2 or vectors.shape[0] != att.shape[1]:
        raise ValueError(
            f"class_attributes must be (C, K) and attribute_vectors (K, D) with the same K; "
            f"got {att.shape} and {vectors.shape}"
        )
    model = MSDN(
        num_classes=att.shape[0],
        num_attributes=att.shape[1],
        feature_dim=feature_dim,
        seen_classes=np.asarray(seen_classes).tolist(),
        unseen_classes=np.asarray(unseen_classes).tolist(),
        embed_dim=vectors.shape[1],
        class_attributes=att,
        attribute_vectors=vectors,
        **options,
    )
    model.build((None, num_regions, feature_dim))
    return model
