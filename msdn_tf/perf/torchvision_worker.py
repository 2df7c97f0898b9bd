"""The torchvision side of ``python -m msdn_tf.bench_extract --torch-python PY``: a worker process.

Run BY PATH under another interpreter (the one with ``torch`` and ``torchvision``,
e.g. a separate virtual environment), so this file imports only the standard library,
numpy, Pillow, torch and torchvision, never ``msdn_tf``:

    PY torchvision_worker.py --weights STATE.npz --images LIST.txt --image-size 448 \
        --batch 4 --batch-input X.npy --out DIR

It builds torchvision's ResNet trunk (``ResNet(Bottleneck, blocks)``, as ``resnet101``
builds it, children up to ``layer4``, ``eval()``), loads the benchmark's weights (a
torchvision ``state_dict`` saved as npz by
:func:`msdn_tf.backbones.torchvision_resnet.torchvision_state`), and writes to ``DIR``:
``features.npy`` (the trunk on the benchmark's own preprocessed batch, NHWC, so the
parent compares the two networks' features) and ``preprocessed.npy`` (torchvision's
``Resize/CenterCrop/ToTensor/Normalize`` of the batch's images, NHWC). Then it prints
``ready`` and answers one command per stdin line with one JSON line:

* ``net``: the trunk on the batch, as the reference runs it (NCHW, ``inference_mode``);
* ``net_channels_last``: the same with the model and input in ``channels_last``;
* ``end_to_end``: every listed image decoded and preprocessed with torchvision's
  transforms by a thread pool one batch ahead, then the trunk, batch by batch (the
  scheme :mod:`msdn_tf.data.extraction` uses);
* ``quit``.

A reply is ``{"seconds": s}`` (timed in the worker) or ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _fail(message: str) -> None:
    print(json.dumps({"error": message}), flush=True)
    sys.exit(2)


def _trunk(state_path: str):
    import torch
    import torchvision

    state = dict(np.load(state_path))
    blocks = tuple(
        1 + max((int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")), default=-1) for i in range(1, 5)
    )
    width = int(state["conv1.weight"].shape[0])
    if width != 64 or min(blocks) < 1:
        _fail(f"{state_path}: conv1 has {width} channels, blocks {list(blocks)}; torchvision's ResNets have 64")
    # resnet50/101/152 are ResNet(Bottleneck, [3, 4, 6|23|36, 3]); any block counts build the same way.
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(blocks))
    trunk = torch.nn.Sequential(*list(model.children())[:-2])
    missing, unexpected = trunk.load_state_dict(
        {_trunk_key(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        _fail(f"{state_path}: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
    return trunk.eval()


def _trunk_key(key: str) -> str:
    """torchvision ResNet keys -> the keys of ``Sequential(children[:-2])`` (conv1 0, bn1 1, layerN 4..7)."""
    head, _, rest = key.partition(".")
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}[head]
    return f"{index}.{rest}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--batch-input", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    try:
        import torch
        import torchvision
        from PIL import Image
        from torchvision import transforms
    except ImportError as e:
        _fail(f"{sys.executable} cannot import torch/torchvision ({e}); --torch-python needs both")

    from concurrent.futures import ThreadPoolExecutor

    size, batch = args.image_size, args.batch
    with open(args.images, encoding="utf-8") as f:
        paths = [line.rstrip("\n") for line in f if line.strip()]
    transform = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )

    def load(lo):
        return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[lo : lo + batch]])

    trunk = _trunk(args.weights)
    x = torch.from_numpy(np.ascontiguousarray(np.load(args.batch_input).transpose(0, 3, 1, 2)))
    trunk_cl = None
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        features = trunk(x)
        np.save(f"{args.out}/features.npy", features.permute(0, 2, 3, 1).numpy())
        np.save(f"{args.out}/preprocessed.npy", load(0).permute(0, 2, 3, 1).numpy())

    def end_to_end():
        starts = list(range(0, len(paths), batch))
        with ThreadPoolExecutor(max_workers=2) as pool, torch.inference_mode():
            pending = [pool.submit(load, lo) for lo in starts[:2]]
            nxt = 2
            while pending:
                xb = pending.pop(0).result()
                if nxt < len(starts):
                    pending.append(pool.submit(load, starts[nxt]))
                    nxt += 1
                out = trunk(xb)
                if not bool(torch.isfinite(out).all()):
                    raise RuntimeError("non-finite features")

    def net():
        with torch.inference_mode():
            trunk(x)

    def net_channels_last():
        nonlocal trunk_cl
        if trunk_cl is None:
            import copy

            trunk_cl = copy.deepcopy(trunk).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            trunk_cl(x_cl)

    commands = {"net": net, "net_channels_last": net_channels_last, "end_to_end": end_to_end}
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads()}
    print("ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        fn = commands.get(command)
        if fn is None:
            print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
            continue
        try:
            t0 = time.perf_counter()
            fn()
            print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        except Exception as e:  # reported to the parent, which raises with it
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
