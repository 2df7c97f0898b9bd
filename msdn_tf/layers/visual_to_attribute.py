"""The visual -> attribute attention sub-net of MSDN (V->A, output S2)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="msdn_tf")
class VisualToAttribute(keras.layers.Layer):
    """Visual -> attribute attention: each region attends over the attributes.

    With region features ``Fs`` (B, R, F), L2-normalised per region, and
    attribute vectors ``V`` (K, D)::

        T   = Fs (W_1_1 V^T)               # region-attribute scores      (B, R, K)
        Bw  = softmax_k((V W_2_1) Fs^T)    # attention over ATTRIBUTES    (B, K, R)
        phi = sum_r Bw[:, k, r] T[:, r, k] # attribute scores, a sum over regions (B, K)
        u   = Bw^T V                       # visual-based attribute features (B, R, D), optional

    Both weights start at zero (reference note §2), so at initialisation the
    scores are 0 and the attention is uniform over attributes.

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
        paper's ``W_att`` projection (reference note §3, §8).
    """

    def __init__(self, feature_dim, embed_dim, score_initializer="zeros",
                 attention_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.feature_dim = int(feature_dim)
        self.embed_dim = int(embed_dim)
        self.score_initializer = keras.initializers.get(score_initializer)
        self.attention_initializer = keras.initializers.get(attention_initializer)

    def build(self, input_shape=None):
        self.W_1_1 = self.add_weight(name="W_1_1", shape=(self.feature_dim, self.embed_dim),
                                     initializer=self.score_initializer)
        self.W_2_1 = self.add_weight(name="W_2_1", shape=(self.embed_dim, self.feature_dim),
                                     initializer=self.attention_initializer)
        self.built = True

    def call(self, inputs, return_features=False):
        features, V = inputs
        score_proj = ops.matmul(self.W_1_1, ops.transpose(V))  # (F, K)
        T = ops.einsum("brf,fk->brk", features, score_proj)  # (B, R, K)
        att_proj = ops.matmul(V, self.W_2_1)  # (K, F)
        Bw = ops.softmax(ops.einsum("kf,brf->bkr", att_proj, features), axis=1)  # over attributes
        phi = ops.sum(Bw * ops.transpose(T, (0, 2, 1)), axis=-1)  # (B, K)
        out = {"scores": phi, "attention": Bw}
        if return_features:
            out["features"] = ops.einsum("bkr,kd->brd", Bw, V)  # (B, R, D)
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            feature_dim=self.feature_dim,
            embed_dim=self.embed_dim,
            score_initializer=keras.initializers.serialize(self.score_initializer),
            attention_initializer=keras.initializers.serialize(self.attention_initializer),
        )
        return config
