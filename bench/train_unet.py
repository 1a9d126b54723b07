"""The calibration benchmark's own model: a small U-Net with a ResNet-style encoder, trained on shapes.

Smaller than :func:`dsrewrite.demo.demo_unet` (ResNet18 widths would not train in a
few minutes on 2 CPU cores): a 3×3 stem (16 channels), three residual stages
(BasicBlocks, stride 2, 32/64/128 channels), a decoder of three blocks
(nearest 2× upsample → concatenate the skip → two conv3×3+BN+ReLU; 64/32/16
channels) and a 3×3 segmentation head. Top-level children are ``encoder``,
``decoder`` and ``segmentation_head``, as in smp, so ``decoder_only`` selects the
six decoder convs and ``all_3x3`` twelve convs (stem and head stay dense).

Training: AdamW + one-cycle schedule, cross-entropy, on :func:`bench.shapes_data.make_shapes`
at 64×64. The trained weights are cached under ``bench/.cache/`` keyed by the
configuration (delete the file to retrain).

Run ``python -m bench.train_unet`` to train (or load) and print the test mIoU.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.shapes_data import NUM_CLASSES, confusion, make_shapes, miou

__all__ = ["ShapesUnet", "TRAIN_CONFIG", "CACHE_DIR", "train_or_load", "evaluate_miou", "data_splits"]

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
TRAIN_CONFIG: dict[str, Any] = {
    "size": 64, "train_images": 4096, "test_images": 512, "steps": 600, "batch": 32, "lr": 3e-3,
    "weight_decay": 1e-4, "seed": 0, "widths": [16, 32, 64, 128], "decoder": [64, 32, 16], "version": 1,
}


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet BasicBlock with a 1×1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += idt
        return self.relu(out)


class Encoder(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, widths[0])
        self.layer1 = BasicBlock(widths[0], widths[1], 2)
        self.layer2 = BasicBlock(widths[1], widths[2], 2)
        self.layer3 = BasicBlock(widths[2], widths[3], 2)

    def forward(self, x: Tensor) -> list[Tensor]:
        f1 = self.stem(x)
        f2 = self.layer1(f1)
        f3 = self.layer2(f2)
        return [f1, f2, f3, self.layer3(f3)]


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin + skip, cout)
        self.conv2 = conv_bn_relu(cout, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class Decoder(nn.Module):
    def __init__(self, widths: list[int], channels: list[int]) -> None:
        super().__init__()
        ins = [widths[3]] + channels[:-1]
        skips = [widths[2], widths[1], widths[0]]
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, channels))

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            x = block(x, skip)
        return x


class ShapesUnet(nn.Module):
    """The benchmark U-Net; input ``(N, 3, H, W)`` with H, W divisible by 8; output logits ``(N, 4, H, W)``."""

    def __init__(self, widths: Optional[list[int]] = None, decoder: Optional[list[int]] = None,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        widths = widths or TRAIN_CONFIG["widths"]
        decoder = decoder or TRAIN_CONFIG["decoder"]
        self.encoder = Encoder(widths)
        self.decoder = Decoder(widths, decoder)
        self.segmentation_head = nn.Conv2d(decoder[-1], num_classes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))


def data_splits(config: dict[str, Any] = TRAIN_CONFIG) -> dict[str, tuple[Tensor, Tensor]]:
    """Train and test sets (different seeds), generated deterministically."""
    s = config["size"]
    return {
        "train": make_shapes(config["train_images"], size=s, seed=config["seed"] * 1000 + 1),
        "test": make_shapes(config["test_images"], size=s, seed=config["seed"] * 1000 + 2),
    }


@torch.no_grad()
def evaluate_miou(model: nn.Module, x: Tensor, y: Tensor, batch: int = 64) -> float:
    """mIoU of ``model`` (eval mode; flags restored) on images ``x`` with labels ``y``."""
    was = model.training
    model.eval()
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    try:
        for i in range(0, len(x), batch):
            conf += confusion(model(x[i : i + batch]).argmax(1), y[i : i + batch])
    finally:
        model.train(was)
    return miou(conf)


def _key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def train_or_load(config: dict[str, Any] = TRAIN_CONFIG, *, log: bool = True,
                  splits: Optional[dict[str, tuple[Tensor, Tensor]]] = None) -> tuple[ShapesUnet, dict[str, Any]]:
    """The trained model (eval mode) and its training record; trains and caches on first use."""
    path = CACHE_DIR / f"shapes_unet_{_key(config)}.pt"
    model = ShapesUnet(config["widths"], config["decoder"])
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        return model.eval(), dict(ckpt["record"], cached=True)
    splits = splits or data_splits(config)
    xtr, ytr = splits["train"]
    xte, yte = splits["test"]
    torch.manual_seed(config["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config["lr"], total_steps=config["steps"])
    g = torch.Generator().manual_seed(config["seed"])
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(config["steps"]):
        idx = torch.randint(0, len(xtr), (config["batch"],), generator=g)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % 50 == 0:
            print(f"[train] step {step + 1}/{config['steps']} loss {sum(losses[-50:]) / 50:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    record = {"train_seconds": seconds, "final_loss": sum(losses[-50:]) / 50,
              "test_miou": evaluate_miou(model, xte, yte), "config": config}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "record": record}, tmp)
    tmp.replace(path)
    return model, dict(record, cached=False)


if __name__ == "__main__":
    m, rec = train_or_load()
    print(json.dumps({k: v for k, v in rec.items() if k != "config"}, indent=2))
