"""Shared attribute semantics of MSDN: the attribute vectors ``V`` and class attributes ``att``."""

from __future__ import annotations

import keras
import numpy as np

from msdn_tf.layers.common import l2_normalize


@keras.saving.register_keras_serializable(package="msdn_tf")
class AttributeEmbedding(keras.layers.Layer):
    """Holds the attribute vectors ``V`` (trainable) and the class-attribute matrix ``att`` (fixed).

    Both sub-nets read ``V``; the class logits are ``att`` times the attribute
    scores. ``V`` is initialised from the attribute word vectors with every row
    L2-normalised (eps 1e-12; an all-zero row stays zero). Calling the layer
    returns ``V`` itself, or ``V`` with rows re-normalised on every call when
    ``normalize=True`` (the reference does so for AWA2).

    The initial arrays are not part of ``get_config()``: a model rebuilt from its
    config gets them back from its saved weights.

    Args:
        num_attributes: int, K.
        embed_dim: int, D, the word-vector size (300 in the reference).
        num_classes: int, C.
        normalize: bool, default False. Re-normalise the rows of ``V`` on every call.
        attribute_vectors: optional ``(K, D)`` array, the word vectors that
            initialise ``V`` (rows are L2-normalised here). Zeros if omitted.
        class_attributes: optional ``(C, K)`` array, the model-ready class
            attributes (docs/reference.md §1.4). Zeros if omitted.
        **kwargs: forwarded to ``keras.layers.Layer``.

    Example:
        >>> layer = AttributeEmbedding(3, 4, 2, attribute_vectors=np.ones((3, 4)),
        ...                            class_attributes=np.eye(2, 3))
        >>> v = layer(None)  # (3, 4), each row with unit norm

    Reference:
        Chen et al., MSDN, CVPR 2022, §3 (semantic attribute vectors v_a, class
        semantic vectors z^c); docs/reference.md §2 (``V``, ``att``).
    """

    def __init__(
        self,
        num_attributes,
        embed_dim,
        num_classes,
        normalize=False,
        attribute_vectors=None,
        class_attributes=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_attributes = int(num_attributes)
        self.embed_dim = int(embed_dim)
        self.num_classes = int(num_classes)
        self.normalize = bool(normalize)
        self._initial_V = None
        self._initial_att = None
        if attribute_vectors is not None:
            vectors = np.asarray(attribute_vectors, dtype=np.float64)
            if vectors.shape != (self.num_attributes, self.embed_dim):
                raise ValueError(
                    f"attribute_vectors must have shape ({self.num_attributes}, {self.embed_dim}), got {vectors.shape}"
                )
            norm = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            self._initial_V = (vectors / norm).astype("float32")
        if class_attributes is not None:
            att = np.asarray(class_attributes, dtype=np.float32)
            if att.shape != (self.num_classes, self.num_attributes):
                raise ValueError(
                    f"class_attributes must have shape ({self.num_classes}, {self.num_attributes}), got {att.shape}"
                )
            self._initial_att = att

    def build(self, input_shape=None):
        def init(value):
            if value is None:
                return "zeros"
            return lambda shape, dtype=None: keras.ops.convert_to_tensor(value, dtype=dtype)

        self.V = self.add_weight(
            name="V", shape=(self.num_attributes, self.embed_dim), initializer=init(self._initial_V), trainable=True
        )
        # autocast=False: the logits att @ scores stay float32 under a mixed-precision policy.
        self.att = self.add_weight(
            name="att",
            shape=(self.num_classes, self.num_attributes),
            initializer=init(self._initial_att),
            trainable=False,
            autocast=False,
        )
        self.built = True

    def call(self, inputs=None):
        """Returns ``V`` (K, D), row-normalised when ``normalize`` is set. ``inputs`` is ignored."""
        V = keras.ops.convert_to_tensor(self.V)
        return l2_normalize(V, axis=-1) if self.normalize else V

    def compute_output_shape(self, input_shape=None):
        return (self.num_attributes, self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_attributes=self.num_attributes,
            embed_dim=self.embed_dim,
            num_classes=self.num_classes,
            normalize=self.normalize,
        )
        return config
