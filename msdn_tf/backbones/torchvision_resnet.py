"""torchvision-layout ResNet (v1.5 bottleneck) in Keras, with weights read from ``.pth`` files.

The reference features of MSDN/TransZero come from ``torchvision.models.resnet101``
truncated before the pooling head (``nn.Sequential(*list(resnet101.children())[:-2])``,
i.e. conv1, bn1, relu, maxpool, layer1..layer4). This module builds that trunk as a
Keras functional model (channel-last) whose layers carry torchvision's module paths as
names (``conv1``, ``bn1``, ``layer3.17.conv2``, ``layer1.0.downsample.0``...), and loads
its weights, without torch, from

* a torchvision ``resnet101`` ``state_dict`` file (``resnet101-63fe2227.pth``,
  ``resnet101-cd907fc2.pth`` or ``torch.save(model.state_dict(), ...)``): keys
  ``conv1.weight``, ``layer1.0.bn2.running_var``...; ``fc.*`` (the classifier, not part
  of the trunk) is skipped;
* the ``resnet101.<child>.*`` keys of a released MSDN checkpoint
  (``CUB_MSDN_GZSL.pth``...), where the child index is the position in
  ``children()[:-2]``: 0 conv1, 1 bn1, 4 layer1, 5 layer2, 6 layer3, 7 layer4.

Both go through the restricted unpickler of :mod:`msdn_tf.interop.torch_checkpoint`. Every
tensor maps by name; a missing, extra or wrong-shape tensor is a
:class:`~msdn_tf.errors.DataError` naming the file and the key.

Architecture (torchvision's ``Bottleneck``, "ResNet v1.5"): each block is 1x1 conv ->
BN -> ReLU -> 3x3 conv (stride here) -> BN -> ReLU -> 1x1 conv (4x channels) -> BN,
plus the identity or ``downsample`` (1x1 conv with the stride, BN), then ReLU. All
convolutions are bias-free, BatchNorm eps is 1e-5 (inference: running statistics).
Padding is explicit zero padding (3 for conv1, 1 for 3x3 convs and the max pool),
which equals torch's ``-inf`` max-pool padding because the pool's input is a ReLU
output (>= 0).

Example:
    >>> from msdn_tf.backbones.torchvision_resnet import build_torchvision_resnet
    >>> net = build_torchvision_resnet(blocks=(1, 1, 1, 1), width=4)
    >>> net.output_shape
    (None, None, None, 128)

Reference:
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (Eq. 2, the
    bottleneck of Fig. 5); torchvision's ResNet v1.5 variant (stride on the 3x3
    convolution). Chen et al., "MSDN", CVPR 2022, Sec. 4 (ResNet-101 features, 448
    input).
"""

from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from msdn_tf.errors import DataError

__all__ = [
    "TORCHVISION_WEIGHTS_HINT",
    "build_torchvision_backbone",
    "RESNET101_BLOCKS",
    "BN_EPSILON",
    "MSDN_CHILD_INDEX",
    "build_torchvision_resnet",
    "expected_state_shapes",
    "normalize_backbone_keys",
    "load_torchvision_weights",
    "check_trunk_state",
    "trunk_from_checkpoint",
    "save_trunk_npz",
    "load_backbone_file",
    "infer_architecture",
]

#: Bottleneck blocks per stage of ResNet-101 (torchvision ``resnet101``).
RESNET101_BLOCKS: Tuple[int, int, int, int] = (3, 4, 23, 3)
#: torchvision's ``nn.BatchNorm2d`` default epsilon.
BN_EPSILON = 1e-5
EXPANSION = 4
#: Child index of ``nn.Sequential(*list(resnet101.children())[:-2])`` -> module name.
MSDN_CHILD_INDEX: Dict[str, str] = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}
#: Keys of a torchvision state_dict that are not part of the trunk (skipped).
HEAD_PREFIXES = ("fc.",)
_BN_PARTS = ("weight", "bias", "running_mean", "running_var")
_BN_OPTIONAL = "num_batches_tracked"


def _module_specs(blocks: Sequence[int], width: int):
    """Yield ``(name, kind, shape)``: conv weights (out, in, kh, kw), bn (channels,)."""
    yield "conv1", "conv", (width, 3, 7, 7)
    yield "bn1", "bn", (width,)
    inplanes = width
    for stage, n in enumerate(blocks):
        planes = width * 2**stage
        for b in range(n):
            p = f"layer{stage + 1}.{b}"
            yield f"{p}.conv1", "conv", (planes, inplanes, 1, 1)
            yield f"{p}.bn1", "bn", (planes,)
            yield f"{p}.conv2", "conv", (planes, planes, 3, 3)
            yield f"{p}.bn2", "bn", (planes,)
            yield f"{p}.conv3", "conv", (planes * EXPANSION, planes, 1, 1)
            yield f"{p}.bn3", "bn", (planes * EXPANSION,)
            if b == 0 and (stage > 0 or inplanes != planes * EXPANSION):
                yield f"{p}.downsample.0", "conv", (planes * EXPANSION, inplanes, 1, 1)
                yield f"{p}.downsample.1", "bn", (planes * EXPANSION,)
            inplanes = planes * EXPANSION


def expected_state_shapes(blocks: Sequence[int] = RESNET101_BLOCKS, width: int = 64) -> Dict[str, tuple]:
    """torchvision state_dict key -> shape for the trunk (without ``num_batches_tracked``).

    Example:
        >>> shapes = expected_state_shapes()
        >>> len(shapes), shapes["layer4.2.conv3.weight"]
        (520, (2048, 512, 1, 1))
    """
    out = {}
    for name, kind, shape in _module_specs(blocks, width):
        if kind == "conv":
            out[f"{name}.weight"] = shape
        else:
            for part in _BN_PARTS:
                out[f"{name}.{part}"] = shape
    return out


def build_torchvision_resnet(
    blocks: Sequence[int] = RESNET101_BLOCKS,
    width: int = 64,
    image_size: Optional[int] = None,
    name: Optional[str] = None,
):
    """The torchvision ResNet trunk (conv1 .. layer4) as a Keras functional model.

    Args:
        blocks: bottleneck blocks per stage; ``(3, 4, 23, 3)`` is ResNet-101,
            ``(3, 4, 6, 3)`` ResNet-50; tests use e.g. ``(1, 2, 1, 1)``.
        width: channels of conv1 (64 in torchvision); stage ``i`` has ``width * 2**i``
            inner channels and 4x that many outputs (2048 for width 64).
        image_size: fixed square input size, or ``None`` for any size.
        name: model name (default ``torchvision_resnet<depth>``).

    Returns:
        ``keras.Model`` mapping ``(B, H, W, 3)`` normalised RGB (ImageNet mean/std, see
        :mod:`msdn_tf.backbones.preprocessing`) to ``(B, H/32, W/32, 32 * width)`` --
        layer4's output after its final ReLU. Layer names are torchvision's module paths.

    Example:
        >>> net = build_torchvision_resnet(blocks=(1, 1, 1, 1), width=4, image_size=64)
        >>> net.output_shape, net.get_layer("layer2.0.downsample.0").strides
        ((None, 2, 2, 128), (2, 2))

    Reference:
        He et al., CVPR 2016, Eq. 2 (y = F(x) + W_s x) and the bottleneck of Fig. 5.
    """
    import keras
    from keras import layers

    blocks = tuple(int(b) for b in blocks)
    if len(blocks) != 4 or min(blocks) < 1 or int(width) < 1:
        raise ValueError(f"blocks must be 4 positive counts and width positive, got {blocks}, {width}")
    depth = 3 * sum(blocks) + 2
    size = None if image_size is None else int(image_size)
    inputs = keras.Input((size, size, 3), name="image")

    def conv(x, filters, kernel, stride, pad, lname):
        if pad:
            x = layers.ZeroPadding2D(pad, name=f"{lname}.pad")(x)
        return layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False, name=lname)(x)

    def bn(x, lname):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.9, name=lname)(x)

    x = conv(inputs, width, 7, 2, 3, "conv1")
    x = bn(x, "bn1")
    x = layers.ReLU(name="relu")(x)
    x = layers.ZeroPadding2D(1, name="maxpool.pad")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
    inplanes = width
    for stage, n in enumerate(blocks):
        planes = width * 2**stage
        for b in range(n):
            p = f"layer{stage + 1}.{b}"
            stride = 2 if (b == 0 and stage > 0) else 1
            y = conv(x, planes, 1, 1, 0, f"{p}.conv1")
            y = layers.ReLU(name=f"{p}.relu1")(bn(y, f"{p}.bn1"))
            y = conv(y, planes, 3, stride, 1, f"{p}.conv2")
            y = layers.ReLU(name=f"{p}.relu2")(bn(y, f"{p}.bn2"))
            y = bn(conv(y, planes * EXPANSION, 1, 1, 0, f"{p}.conv3"), f"{p}.bn3")
            if b == 0 and (stage > 0 or inplanes != planes * EXPANSION):
                shortcut = bn(conv(x, planes * EXPANSION, 1, stride, 0, f"{p}.downsample.0"), f"{p}.downsample.1")
            else:
                shortcut = x
            x = layers.ReLU(name=f"{p}.relu")(layers.Add(name=f"{p}.add")([y, shortcut]))
            inplanes = planes * EXPANSION
    model = keras.Model(inputs, x, name=name or f"torchvision_resnet{depth}")
    model.trainable = False
    return model


_MSDN_KEY = re.compile(r"^(?:module\.)?resnet101\.(\d+)\.(.+)$")


def normalize_backbone_keys(state: Mapping[str, np.ndarray], source: str) -> Dict[str, np.ndarray]:
    """Map a torchvision or MSDN-checkpoint key set to torchvision trunk keys.

    ``resnet101.<child>.<rest>`` becomes ``<module>.<rest>`` (:data:`MSDN_CHILD_INDEX`);
    a ``module.`` prefix (``nn.DataParallel``) is dropped; ``fc.*`` and
    ``num_batches_tracked`` are dropped. Other keys are kept, and rejected later as
    unexpected by :func:`load_torchvision_weights`.

    Raises:
        DataError: an MSDN key names a child index that has no parameters (2 relu,
            3 maxpool) or does not exist.
    """
    out: Dict[str, np.ndarray] = {}
    for key, value in state.items():
        m = _MSDN_KEY.match(key)
        if m:
            child, rest = m.groups()
            if child not in MSDN_CHILD_INDEX:
                raise DataError(
                    f"{source}: key '{key}' names child {child} of resnet101.children()[:-2], "
                    "which has no parameters (0 conv1, 1 bn1, 4-7 layer1-4)"
                )
            key = f"{MSDN_CHILD_INDEX[child]}.{rest}"
        elif key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith(HEAD_PREFIXES) or key.endswith("." + _BN_OPTIONAL):
            continue
        if key in out:
            raise DataError(f"{source}: the backbone tensor '{key}' appears twice (under two prefixes)")
        out[key] = value
    return out


def infer_architecture(keys) -> Tuple[Tuple[int, int, int, int], Optional[int]]:
    """``(blocks, None)``: the bottleneck blocks per stage of a torchvision-layout key set.

    The second value is reserved for the width, which callers read from ``conv1.weight``.
    """
    counts = [0, 0, 0, 0]
    for key in keys:
        m = re.match(r"^layer([1-4])\.(\d+)\.", key)
        if m:
            s, b = int(m.group(1)) - 1, int(m.group(2))
            counts[s] = max(counts[s], b + 1)
    return tuple(counts), None


def check_trunk_state(state: Mapping[str, np.ndarray], blocks: Sequence[int], width: int, source: str) -> None:
    """Every expected trunk tensor present, none extra, right shape, floating, finite.

    Raises:
        DataError: naming ``source`` and the first offending key(s).
    """
    want = expected_state_shapes(blocks, width)
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    depth = 3 * sum(blocks) + 2
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:4]}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s), e.g. {extra[:4]}")
        raise DataError(
            f"{source}: not the weights of a torchvision-layout ResNet-{depth} trunk (blocks "
            f"{list(blocks)}, width {width}): " + "; ".join(parts)
        )
    for key, shape in want.items():
        got = tuple(np.shape(state[key]))
        if got != shape:
            raise DataError(f"{source}: '{key}' has shape {got}, expected {shape} (ResNet-{depth}, width {width})")
        arr = np.asarray(state[key])
        if not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"{source}: '{key}' has dtype {arr.dtype}, expected floating point")
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{source}: '{key}' holds NaN or infinite values")


def trunk_from_checkpoint(backbone: Mapping[str, np.ndarray], source: str):
    """The ``resnet101.*`` tensors of an MSDN checkpoint as checked torchvision trunk keys.

    Args:
        backbone: the non-MSDN tensors of a checkpoint (third value of
            :func:`msdn_tf.interop.torch_checkpoint.split_state_dict`).
        source: file name for messages.

    Returns:
        ``(trunk, blocks, width)`` or ``None`` when there are no ``resnet101.*`` keys.
        The depth is read from the keys (the released files hold ResNet-101).

    Raises:
        DataError: the tensors do not form a complete torchvision-layout trunk.
    """
    picked = {k: v for k, v in backbone.items() if _MSDN_KEY.match(k)}
    if not picked:
        return None
    trunk = normalize_backbone_keys(picked, source)
    blocks, _ = infer_architecture(trunk)
    if min(blocks) < 1 or "conv1.weight" not in trunk or np.ndim(trunk["conv1.weight"]) != 4:
        raise DataError(
            f"{source}: the resnet101.* tensors do not form a ResNet trunk (stages {list(blocks)}, "
            f"conv1 {'present' if 'conv1.weight' in trunk else 'missing'})"
        )
    width = int(np.shape(trunk["conv1.weight"])[0])
    check_trunk_state(trunk, blocks, width, source)
    return trunk, blocks, width


def save_trunk_npz(path, trunk: Mapping[str, np.ndarray], blocks: Sequence[int], width: int) -> None:
    """Write trunk tensors (torchvision keys, float32) and their architecture to ``path`` atomically."""
    from msdn_tf.utils import atomic_path

    arrays = {k: np.asarray(v, np.float32) for k, v in trunk.items()}
    arrays["__blocks__"] = np.asarray(list(blocks), np.int64)
    arrays["__width__"] = np.asarray(int(width), np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _read_trunk_npz(path: str):
    from msdn_tf.limits import check_npz

    check_npz(path)  # each array's declared size against its stored bytes, before inflating it
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz backbone file ({type(exc).__name__}: {exc})") from None
    if "__blocks__" not in arrays or "__width__" not in arrays:
        raise DataError(f"{path}: lacks '__blocks__'/'__width__' (not written by msdn_tf.convert)")
    blocks = tuple(int(b) for b in arrays.pop("__blocks__"))
    width = int(arrays.pop("__width__"))
    return arrays, blocks, width


def load_torchvision_weights(model, state: Mapping[str, np.ndarray], source: str = "state_dict") -> None:
    """Set ``model``'s weights from torchvision-layout tensors, every one mapped by name.

    Args:
        model: from :func:`build_torchvision_resnet`.
        state: torchvision trunk keys (``conv1.weight``...), e.g. from
            :func:`normalize_backbone_keys`.
        source: the file name for error messages.

    Raises:
        DataError: a tensor is missing, unexpected (e.g. a ResNet-50 file misses
            ``layer3.6.*``; a ResNet-18 file has ``layer1.0.conv1.weight`` of shape
            (64, 64, 3, 3)), has the wrong shape, or is not finite.
    """
    blocks, width = _model_arch(model)
    check_trunk_state(state, blocks, width, source)
    for name, kind, _ in _module_specs(blocks, width):
        layer = model.get_layer(name)
        if kind == "conv":
            kernel = np.transpose(np.asarray(state[f"{name}.weight"], np.float32), (2, 3, 1, 0))
            layer.set_weights([kernel])
        else:
            layer.set_weights(
                [
                    np.asarray(state[f"{name}.{part}"], np.float32)
                    for part in ("weight", "bias", "running_mean", "running_var")
                ]
            )


def torchvision_state(model) -> Dict[str, np.ndarray]:
    """``model``'s weights as a torchvision ``state_dict`` (numpy): the inverse of :func:`load_torchvision_weights`.

    Convolution kernels go back to ``(out, in, kh, kw)``; BatchNormalization to ``weight``,
    ``bias``, ``running_mean``, ``running_var``. ``torch.from_numpy`` of each value loads
    into torchvision's ResNet trunk (the extraction benchmark runs torchvision on the same
    weights this way).

    Args:
        model: from :func:`build_torchvision_resnet` (not :func:`inference_trunk`: its
            BatchNorms are folded away).

    Example:
        >>> trunk = build_torchvision_resnet((1, 1, 1, 1), width=4, image_size=32)
        >>> torchvision_state(trunk)["conv1.weight"].shape
        (4, 3, 7, 7)
    """
    blocks, width = _model_arch(model)
    state = {}
    for name, kind, _ in _module_specs(blocks, width):
        weights = model.get_layer(name).get_weights()
        if kind == "conv":
            state[f"{name}.weight"] = np.ascontiguousarray(np.transpose(weights[0], (3, 2, 0, 1)))
        else:
            for part, value in zip(("weight", "bias", "running_mean", "running_var"), weights):
                state[f"{name}.{part}"] = np.asarray(value)
    return state


def _model_arch(model) -> Tuple[Tuple[int, ...], int]:
    names = [layer.name for layer in model.layers]
    blocks = tuple(sum(1 for n in names if re.fullmatch(rf"layer{s}\.\d+\.conv1", n)) for s in range(1, 5))
    width = int(model.get_layer("conv1").filters)
    return blocks, width


def load_backbone_file(
    path, blocks: Optional[Sequence[int]] = RESNET101_BLOCKS, width: int = 64, image_size: Optional[int] = None
):
    """Build the trunk and load a torchvision state_dict or MSDN checkpoint file into it.

    Args:
        path: ``.pth`` file (torchvision ``resnet101`` state_dict, an MSDN checkpoint
            with ``resnet101.*`` keys, or a backbone file written by ``msdn_tf.convert``).
        blocks: stage depths; default ResNet-101's. ``None`` also accepts what the file
            holds when it is a smaller test network (depth read from its keys).
        width: conv1 channels (64 for torchvision's networks).
        image_size: fixed input size or ``None``.

    Returns:
        ``(model, info)``: the Keras model and ``{"source", "format", "blocks", "width",
        "tensors"}``.

    Raises:
        DataError: not a torch zip file (e.g. a Keras ``.h5`` file, random bytes), or
            the tensors do not fit (message names the key).

    Example:
        >>> model, info = load_backbone_file("CUB_MSDN_GZSL.pth")   # doctest: +SKIP
        >>> info["format"], model.output_shape                        # doctest: +SKIP
        ('msdn_checkpoint', (None, None, None, 2048))
    """
    from msdn_tf.interop.torch_checkpoint import read_torch_state_dict

    path = str(path)
    if path.lower().endswith(".npz"):
        trunk, file_blocks, file_width = _read_trunk_npz(path)
        if blocks is not None and tuple(blocks) != file_blocks:
            raise DataError(f"{path}: holds a ResNet with blocks {list(file_blocks)}, expected {list(blocks)}")
        model = build_torchvision_resnet(file_blocks, file_width, image_size=image_size)
        load_torchvision_weights(model, trunk, path)
        return model, {
            "source": path,
            "format": "npz",
            "blocks": list(file_blocks),
            "width": file_width,
            "tensors": len(trunk),
        }
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the backbone weights file ({exc})") from None
    if head.startswith(b"\x89HDF"):
        raise DataError(
            f"{path} is an HDF5 (Keras .h5) file; --weights for the torchvision backbone takes a "
            "PyTorch .pth state_dict (use --backbone keras_resnet101 for Keras weights)"
        )
    state = read_torch_state_dict(path)
    fmt = "msdn_checkpoint" if any(_MSDN_KEY.match(k) for k in state) else "torchvision_state_dict"
    if fmt == "msdn_checkpoint":
        state = {k: v for k, v in state.items() if _MSDN_KEY.match(k)}
    trunk = normalize_backbone_keys(state, path)
    if not trunk:
        raise DataError(
            f"{path}: no ResNet tensors (expected torchvision keys such as 'conv1.weight' or MSDN "
            "keys 'resnet101.0.weight'...)"
        )
    if blocks is None:
        blocks, _ = infer_architecture(trunk)
        if min(blocks) < 1:
            raise DataError(f"{path}: cannot read the stage depths from its keys (found blocks {list(blocks)})")
        if "conv1.weight" in trunk and np.ndim(trunk["conv1.weight"]) == 4:
            width = int(np.shape(trunk["conv1.weight"])[0])
    model = build_torchvision_resnet(blocks, width, image_size=image_size)
    load_torchvision_weights(model, trunk, path)
    return model, {"source": path, "format": fmt, "blocks": list(blocks), "width": int(width), "tensors": len(trunk)}


TORCHVISION_WEIGHTS_HINT = (
    "--backbone torchvision_resnet101 needs --weights FILE: a torchvision resnet101 state_dict (the ImageNet V1 "
    "weights the reference used: https://download.pytorch.org/models/resnet101-63fe2227.pth) or a released MSDN "
    "checkpoint (CUB_MSDN_GZSL.pth...)"
)


def build_torchvision_backbone(weights, image_size: Optional[int] = None):
    """torchvision-layout ResNet-101 trunk with weights from a ``.pth``/``.npz`` file.

    Args:
        weights: a torchvision ``resnet101`` state_dict (e.g. ``resnet101-63fe2227.pth``,
            the ImageNet V1 weights TransZero/MSDN used), a released MSDN checkpoint
            (its ``resnet101.*`` keys) or the ``backbone_resnet101.npz`` that
            ``msdn_tf.convert`` writes into a run directory.
    """
    if weights in (None, "", "imagenet", "none", "None"):
        raise DataError(TORCHVISION_WEIGHTS_HINT)
    if not os.path.isfile(str(weights)):
        raise DataError(f"{weights}: weights file not found")
    model, _ = load_backbone_file(str(weights), image_size=image_size)
    return model


def inference_trunk(model, dtype: str = "float32"):
    """The trunk of ``model`` for extraction: every BatchNormalization folded into its convolution.

    In inference a BatchNormalization is a per-channel affine map, so conv + BN is one
    convolution with kernel ``W * s`` and bias ``beta - mean * s`` (``s = gamma /
    sqrt(var + eps)``, computed in float64). With a bias and the ReLU in the same
    ``Conv2D``, TensorFlow's graph optimiser runs one fused oneDNN kernel per
    convolution (``_FusedConv2D`` with BiasAdd and Relu) instead of a convolution and
    four element-wise passes over each activation map. Stride-1 convolutions padded by
    ``k // 2`` use ``padding="same"`` (the same zeros, no separate ``ZeroPadding2D``
    copy); the stride-2 ones keep torchvision's symmetric padding (``"same"`` would pad
    asymmetrically). The feature maps equal ``model``'s up to float32 rounding
    (the fixture tests: relative L2 < 1e-5 against torchvision).

    Args:
        model: from :func:`build_torchvision_resnet`, weights loaded.
        dtype: a Keras dtype policy for the convolutions: ``"float32"`` or
            ``"mixed_bfloat16"`` (bfloat16 products, float32 weights; the output is cast
            back to float32).

    Returns:
        A ``keras.Model`` with the same input and output shapes as ``model``.

    Example:
        >>> fast = inference_trunk(load_backbone_file("resnet101-63fe2227.pth")[0])
    """
    import keras
    from keras import layers

    blocks, width = _model_arch(model)
    names = {layer.name for layer in model.layers}
    inputs = keras.Input(model.input_shape[1:], name="image")

    def conv_bn(x, conv_name, bn_name, relu):
        conv, bn = model.get_layer(conv_name), model.get_layer(bn_name)
        kernel = np.asarray(conv.get_weights()[0], np.float64)
        gamma, beta, mean, var = (np.asarray(w, np.float64) for w in bn.get_weights())
        scale = gamma / np.sqrt(var + bn.epsilon)
        size, stride = kernel.shape[0], conv.strides[0]
        pad = model.get_layer(f"{conv_name}.pad").padding[0][0] if f"{conv_name}.pad" in names else 0
        padding = "valid"
        if pad and stride == 1 and size == 2 * pad + 1:
            padding = "same"
        elif pad:
            x = layers.ZeroPadding2D(pad, name=f"{conv_name}.pad", dtype=dtype)(x)
        out = layers.Conv2D(
            kernel.shape[-1],
            size,
            strides=stride,
            padding=padding,
            use_bias=True,
            activation="relu" if relu else None,
            name=conv_name,
            dtype=dtype,
        )
        y = out(x)
        out.set_weights([(kernel * scale).astype(np.float32), (beta - mean * scale).astype(np.float32)])
        return y

    x = conv_bn(inputs, "conv1", "bn1", relu=True)
    x = layers.ZeroPadding2D(1, name="maxpool.pad", dtype=dtype)(x)
    x = layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool", dtype=dtype)(x)
    for stage, n in enumerate(blocks):
        for b in range(n):
            p = f"layer{stage + 1}.{b}"
            y = conv_bn(x, f"{p}.conv1", f"{p}.bn1", relu=True)
            y = conv_bn(y, f"{p}.conv2", f"{p}.bn2", relu=True)
            y = conv_bn(y, f"{p}.conv3", f"{p}.bn3", relu=False)
            shortcut = (
                conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", False) if f"{p}.downsample.0" in names else x
            )
            x = layers.ReLU(name=f"{p}.relu", dtype=dtype)(layers.Add(name=f"{p}.add", dtype=dtype)([y, shortcut]))
    x = layers.Activation("linear", dtype="float32", name="features")(x)  # float32 out under any policy
    folded = keras.Model(inputs, x, name=f"{model.name}_inference")
    folded.trainable = False
    return folded
