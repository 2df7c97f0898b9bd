"""Small numerical helpers shared by the MSDN layers."""

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
            f"features must be (batch, regions, channels) or (batch, height, width, channels), got shape {features.shape}"
        )
    return features
