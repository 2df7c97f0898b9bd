"""Small numerical helpers shared by the MSDN layers."""

import keras
from keras import ops


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """``x / max(||x||_2, epsilon)`` along ``axis``, as ``torch.nn.functional.normalize``.

    Args:
        x: tensor.
        axis: axis to normalise over.
        epsilon: lower bound of the norm (the reference uses 1e-12), so a zero
            vector stays zero.
    """
    norm = ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True))
    return x / ops.maximum(norm, epsilon)


def as_regions(features):
    """Reshape channel-last feature maps ``(B, H, W, F)`` to ``(B, H*W, F)``; ``(B, R, F)`` passes through.

    Regions are row-major over the map (``r = h * W + w``), as in the reference.
    """
    shape = ops.shape(features)
    if len(features.shape) == 4:
        return ops.reshape(features, (shape[0], shape[1] * shape[2], shape[3]))
    if len(features.shape) != 3:
        raise ValueError(
            "features must be (batch, regions, channels) or (batch, height, width, channels), "
            f"got shape {features.shape}"
        )
    return features


def contract(features, projection):
    """``features (B, R, F) @ projection (F, N) -> (B, R, N)`` as ONE 2-D matrix product.

    Reshaping to ``(B*R, F)`` gives a single large GEMM (the shape a CPU or GPU
    runs fastest) instead of a batched product broadcast over ``B``; its weight
    gradient ``(F, B*R) x (B*R, N)`` is one GEMM too.
    """
    shape = ops.shape(features)
    flat = ops.reshape(features, (-1, shape[-1]))
    out = ops.matmul(flat, projection)  # (B*R, N)
    return ops.reshape(out, (shape[0], shape[1], ops.shape(projection)[-1]))


def split_last(x, sizes):
    """Split ``x`` along its last axis into consecutive pieces of the given sizes.

    One split op: its gradient is one concatenation (slicing piece by piece would
    back-propagate a zero-padded full-size tensor per piece).
    """
    if len(sizes) == 1:
        return [x]
    bounds = [int(sum(sizes[: i + 1])) for i in range(len(sizes) - 1)]
    return ops.split(x, bounds, axis=-1)


def softmax_dtype(dtype):
    """float32 for half-precision compute dtypes (softmax and sums stay in float32), else ``dtype``."""
    name = getattr(dtype, "name", str(dtype))
    return "float32" if name in ("float16", "bfloat16") else name


class ScoresAndAttention:
    """The output shapes of the two attention sub-nets: ``{"scores": (B, K), "attention": (B, K, R)}``.

    A mixin placed before ``keras.layers.Layer``: ``compute_output_shape`` (what ``summary()``
    shows) from ``[features (B, R, F), V (K, D)]``; symbolic calls still trace ``call`` (exact
    dtypes and ``return_features``).
    """

    def compute_output_spec(self, *args, **kwargs):
        return super(keras.layers.Layer, self).compute_output_spec(*args, **kwargs)

    def compute_output_shape(self, input_shape):
        """``{"scores": (B, K), "attention": (B, K, R)}`` for ``input_shape = [(B, R, F), (K, D)]``."""
        try:
            (batch, regions, _), (attributes, _) = input_shape
        except (TypeError, ValueError):
            raise NotImplementedError("the output shape needs [features (B, R, F), V (K, D)] shapes") from None
        return {"scores": (batch, attributes), "attention": (batch, attributes, regions)}
