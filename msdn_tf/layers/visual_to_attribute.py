"""The visual -> attribute attention sub-net of MSDN (V->A, output S2)."""

from __future__ import annotations

import keras
from keras import ops

from msdn_tf.layers.common import ScoresAndAttention, contract, softmax_dtype, split_last


@keras.saving.register_keras_serializable(package="msdn_tf")
class VisualToAttribute(ScoresAndAttention, keras.layers.Layer):
    """Visual -> attribute attention: each region attends over the attributes.

    With region features ``Fs`` (B, R, F), L2-normalised per region, and
    attribute vectors ``V`` (K, D)::

        T   = Fs (W_1_1 V^T)               # region-attribute scores      (B, R, K)
        Bw  = softmax_k((V W_2_1) Fs^T)    # attention over ATTRIBUTES    (B, K, R)
        phi = sum_r Bw[:, k, r] T[:, r, k] # attribute scores, a sum over regions (B, K)
        u   = Bw^T V                       # visual-based attribute features (B, R, D), optional

    Both weights start at zero (docs/reference.md §2), so at initialisation the
    scores are 0 and the attention is uniform over attributes. Both ``(F, K)``
    projections go through ONE ``(B*R, F) x (F, 2K)`` product (:meth:`projections`,
    then :meth:`attend`); :class:`~msdn_tf.model.MSDN` joins them with the A->V
    sub-net's into a single ``(F, 4K)`` product. Softmax and scores are computed
    in float32 under a mixed-precision policy.

    Args:
        feature_dim: int, F, channels of the region features.
        embed_dim: int, D, size of the attribute vectors.
        score_initializer: initializer of ``W_1_1`` (F, D); default zeros.
        attention_initializer: initializer of ``W_2_1`` (D, F); default zeros.
        **kwargs: forwarded to ``keras.layers.Layer``.

    Call args:
        inputs: a list ``[features, V]`` with shapes ``(B, R, F)`` and ``(K, D)``.
        return_features: bool, also return ``u`` under ``"features"``.

    Returns:
        dict with ``"scores"`` (B, K) and ``"attention"`` (B, K, R), plus
        ``"features"`` (B, R, D) when asked for.

    Example:
        >>> layer = VisualToAttribute(feature_dim=8, embed_dim=4)
        >>> out = layer([np.random.rand(2, 5, 8).astype("float32"),
        ...              np.random.rand(3, 4).astype("float32")])
        >>> out["attention"].shape   # sums to 1 over axis 1 (attributes)
        (2, 3, 5)

    Reference:
        Chen et al., MSDN, CVPR 2022, Eqs. 4-6 (V->A sub-net). As in the released
        code the attention is a softmax over attributes (the paper's Eq. 4 says
        regions) and the score is ``sum_r Bw * (f_r^T W_1_1 v_i)`` without the
        paper's ``W_att`` projection (docs/reference.md §3, §8).
    """

    def __init__(self, feature_dim, embed_dim, score_initializer="zeros", attention_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.feature_dim = int(feature_dim)
        self.embed_dim = int(embed_dim)
        self.score_initializer = keras.initializers.get(score_initializer)
        self.attention_initializer = keras.initializers.get(attention_initializer)

    def build(self, input_shape=None):
        self.W_1_1 = self.add_weight(
            name="W_1_1", shape=(self.feature_dim, self.embed_dim), initializer=self.score_initializer
        )
        self.W_2_1 = self.add_weight(
            name="W_2_1", shape=(self.embed_dim, self.feature_dim), initializer=self.attention_initializer
        )
        self.built = True

    def projections(self, V):
        """The ``(F, K)`` matrices this sub-net contracts with the features, ``V`` first.

        ``[W_1_1 V^T, (V W_2_1)^T]`` (score, attention logits); :meth:`attend` takes
        the products in this order.
        """
        dtype = self.compute_dtype
        V = ops.cast(V, dtype)
        score = ops.matmul(ops.cast(self.W_1_1, dtype), ops.transpose(V))  # (F, K)
        attention = ops.transpose(ops.matmul(V, ops.cast(self.W_2_1, dtype)))  # (F, K)
        return [score, attention]

    def attend(self, contracted, V=None, return_features=False):
        """Scores and attention from the contracted products.

        Args:
            contracted: ``[T, attention logits]``, each ``(B, R, K)``: ``features @ p``
                for each ``p`` of :meth:`projections`.
            V: ``(K, D)`` attribute vectors, needed only for ``u``.
            return_features: also return ``u``.
        """
        T = contracted[0]
        T = ops.cast(T, softmax_dtype(T.dtype))  # (B, R, K)
        Bw = ops.softmax(ops.cast(contracted[1], T.dtype), axis=-1)  # over attributes (B, R, K)
        phi = ops.sum(Bw * T, axis=1)  # (B, K), a sum over regions
        out = {"scores": phi, "attention": ops.transpose(Bw, (0, 2, 1))}  # (B, K), (B, K, R)
        if return_features:
            out["features"] = ops.matmul(Bw, ops.cast(V, Bw.dtype))  # (B, R, D)
        return out

    def call(self, inputs, return_features=False):
        features, V = inputs
        blocks = self.projections(V)
        products = contract(features, ops.concatenate(blocks, axis=1))  # (B, R, 2K)
        K = ops.shape(V)[0]
        return self.attend(split_last(products, [K, K]), V, return_features)

    def get_config(self):
        config = super().get_config()
        config.update(
            feature_dim=self.feature_dim,
            embed_dim=self.embed_dim,
            score_initializer=keras.initializers.serialize(self.score_initializer),
            attention_initializer=keras.initializers.serialize(self.attention_initializer),
        )
        return config
