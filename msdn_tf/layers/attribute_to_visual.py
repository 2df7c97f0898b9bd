"""The attribute -> visual attention sub-net of MSDN (A->V, output S1)."""

from __future__ import annotations

import keras
from keras import ops

from msdn_tf.layers.common import ScoresAndAttention, contract, softmax_dtype, split_last


@keras.saving.register_keras_serializable(package="msdn_tf")
class AttributeToVisual(ScoresAndAttention, keras.layers.Layer):
    """Attribute -> visual attention: each attribute attends over the image regions.

    With region features ``Fs`` (B, R, F), already L2-normalised per region, and
    attribute vectors ``V`` (K, D)::

        S   = (V W_1) Fs^T                 # region-attribute scores   (B, K, R)
        A   = softmax_r((V W_2) Fs^T)      # attention over REGIONS    (B, K, R)
        psi = sum_r A * S                  # attribute scores          (B, K)
        F_p = A Fs                         # attribute-based features  (B, K, F), optional

    ``V`` is contracted with the weights first (K x F), then with ``Fs``, the
    cheaper order; both projections go through ONE ``(B*R, F) x (F, 2K)`` product
    (:meth:`projections`, then :meth:`attend`). :class:`~msdn_tf.model.MSDN` joins
    them with the V->A sub-net's into a single ``(F, 4K)`` product. Softmax and
    scores are computed in float32 under a mixed-precision policy. The class
    logits ``att psi`` are formed by the model.

    Args:
        feature_dim: int, F, channels of the region features (2048 for ResNet-101).
        embed_dim: int, D, size of the attribute vectors (300).
        attention: ``"softmax"`` (default) or ``"uniform"``. ``uniform`` replaces the
            attention by 1/R, i.e. global average pooling mapped to attributes, the
            baseline of the paper's Table 2.
        score_initializer: initializer of ``W_1``; default standard normal N(0, 1)
            as in the reference.
        attention_initializer: initializer of ``W_2``; default zeros.
        seed: optional int seed of the default ``W_1`` initializer.
        **kwargs: forwarded to ``keras.layers.Layer``.

    Call args:
        inputs: a list ``[features, V]``: ``(B, R, F)`` normalised region features
            and ``(K, D)`` attribute vectors.
        return_features: bool, also return ``F_p`` under ``"features"``.

    Returns:
        dict with ``"scores"`` (B, K) and ``"attention"`` (B, K, R), plus
        ``"features"`` (B, K, F) when asked for.

    Example:
        >>> layer = AttributeToVisual(feature_dim=8, embed_dim=4, seed=0)
        >>> out = layer([np.random.rand(2, 5, 8).astype("float32"),
        ...              np.random.rand(3, 4).astype("float32")])
        >>> out["scores"].shape, out["attention"].shape
        ((2, 3), (2, 3, 5))

    Reference:
        Chen et al., MSDN, CVPR 2022, Eqs. 1-3 (A->V sub-net). The attention is a
        softmax over regions as in the released code; the paper's Eq. 1
        normalises over attributes (docs/reference.md §3, §8).
    """

    def __init__(
        self,
        feature_dim,
        embed_dim,
        attention="softmax",
        score_initializer=None,
        attention_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if attention not in ("softmax", "uniform"):
            raise ValueError(f"attention must be 'softmax' or 'uniform', got {attention!r}")
        self.feature_dim = int(feature_dim)
        self.embed_dim = int(embed_dim)
        self.attention = attention
        self.seed = seed
        self.score_initializer = keras.initializers.get(
            score_initializer or keras.initializers.RandomNormal(0.0, 1.0, seed=seed)
        )
        self.attention_initializer = keras.initializers.get(attention_initializer)

    def build(self, input_shape=None):
        shape = (self.embed_dim, self.feature_dim)
        self.W_1 = self.add_weight(name="W_1", shape=shape, initializer=self.score_initializer)
        self.W_2 = self.add_weight(name="W_2", shape=shape, initializer=self.attention_initializer)
        self.built = True

    def projections(self, V):
        """The ``(F, K)`` matrices this sub-net contracts with the features, ``V`` first.

        ``[(V W_1)^T, (V W_2)^T]`` (score, attention logits); only the first with
        uniform attention. :meth:`attend` takes the products in this order.
        """
        dtype = self.compute_dtype
        V = ops.cast(V, dtype)
        weights = [self.W_1] if self.attention == "uniform" else [self.W_1, self.W_2]
        return [ops.transpose(ops.matmul(V, ops.cast(w, dtype))) for w in weights]  # (F, K) each

    def attend(self, contracted, features=None, return_features=False):
        """Scores and attention from the contracted products.

        Args:
            contracted: list of ``(B, R, K)`` tensors, ``features @ p`` for each
                ``p`` of :meth:`projections`, in that order.
            features: ``(B, R, F)`` normalised features, needed only for ``F_p``.
            return_features: also return ``F_p``.
        """
        S = contracted[0]
        S = ops.cast(S, softmax_dtype(S.dtype))  # (B, R, K)
        if self.attention == "uniform":
            A = ops.ones_like(S) / ops.cast(ops.shape(S)[1], S.dtype)
        else:
            A = ops.softmax(ops.cast(contracted[1], S.dtype), axis=1)  # over regions (B, R, K)
        out = {"scores": ops.sum(A * S, axis=1), "attention": ops.transpose(A, (0, 2, 1))}  # (B, K), (B, K, R)
        if return_features:
            out["features"] = ops.einsum("brk,brf->bkf", A, ops.cast(features, A.dtype))  # (B, K, F)
        return out

    def call(self, inputs, return_features=False):
        features, V = inputs
        blocks = self.projections(V)
        products = contract(features, ops.concatenate(blocks, axis=1))  # (B, R, nK)
        K = ops.shape(V)[0]
        return self.attend(split_last(products, [K] * len(blocks)), features, return_features)

    def get_config(self):
        config = super().get_config()
        config.update(
            feature_dim=self.feature_dim,
            embed_dim=self.embed_dim,
            attention=self.attention,
            score_initializer=keras.initializers.serialize(self.score_initializer),
            attention_initializer=keras.initializers.serialize(self.attention_initializer),
            seed=self.seed,
        )
        return config
