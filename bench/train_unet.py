"""The calibration benchmark's own model: a small U-Net with a ResNet-style encoder, trained on shapes.

Smaller than :func:`dsrewrite.demo.demo_unet` (ResNet18 widths would not train in a
few minutes on 2 CPU cores): a 3×3 stem (16 channels), three residual stages
(BasicBlocks, stride 2, 32/64/128 channels), a decoder of three blocks
(nearest 2× upsample → concatenate the skip → two conv3×3+BN+ReLU; 64/32/16
channels) and a 3×3 segmentation head. Top-level children are ``encoder``,
``decoder`` and ``segmentation_head``, as in smp, so ``decoder_only`` selects the
six decoder convs and ``all_3x3`` twelve convs (stem and head stay dense).

The model and the data live in :mod:`dsrewrite.shapes` (the demo ships them). Training: AdamW + one-cycle
schedule, cross-entropy, on :func:`dsrewrite.shapes.make_shapes`
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

from dsrewrite.shapes.data import make_shapes
from dsrewrite.shapes.trained import evaluate_miou
from dsrewrite.shapes.unet import ShapesUnet

__all__ = ["ShapesUnet", "TRAIN_CONFIG", "CACHE_DIR", "train", "train_or_load", "evaluate_miou", "data_splits"]

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
#: The calibration benchmark's model (docs/calibration.md); the shipped demo has its own (dsrewrite.shapes.TRAIN_CONFIG).
TRAIN_CONFIG: dict[str, Any] = {
    "size": 64, "train_images": 4096, "test_images": 512, "steps": 600, "batch": 32, "lr": 3e-3,
    "weight_decay": 1e-4, "seed": 0, "widths": [16, 32, 64, 128], "decoder": [64, 32, 16], "version": 1,
}


def data_splits(config: dict[str, Any] = TRAIN_CONFIG) -> dict[str, tuple[Tensor, Tensor]]:
    """Train and test sets (different seeds), generated deterministically."""
    s = config["size"]
    return {
        "train": make_shapes(config["train_images"], size=s, seed=config["seed"] * 1000 + 1),
        "test": make_shapes(config["test_images"], size=s, seed=config["seed"] * 1000 + 2),
    }


def _key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def train(config: dict[str, Any] = TRAIN_CONFIG, *, log: bool = True,
          splits: Optional[dict[str, tuple[Tensor, Tensor]]] = None) -> tuple[ShapesUnet, dict[str, Any]]:
    """Train from scratch (AdamW + one-cycle, cross-entropy); the model in eval mode and its record.

    The model is built before the seed is set (as the calibration benchmark always did): seed the global
    generator before calling this for a reproducible initialisation (bench/train_demo.py does).
    """
    model = ShapesUnet(config["widths"], config["decoder"])
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
    return model, record


def train_or_load(config: dict[str, Any] = TRAIN_CONFIG, *, log: bool = True,
                  splits: Optional[dict[str, tuple[Tensor, Tensor]]] = None) -> tuple[ShapesUnet, dict[str, Any]]:
    """The trained model (eval mode) and its training record; trains and caches on first use."""
    path = CACHE_DIR / f"shapes_unet_{_key(config)}.pt"
    if path.is_file():
        model = ShapesUnet(config["widths"], config["decoder"])
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        return model.eval(), dict(ckpt["record"], cached=True)
    model, record = train(config, log=log, splits=splits)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "record": record}, tmp)
    tmp.replace(path)
    return model, dict(record, cached=False)


if __name__ == "__main__":
    m, rec = train_or_load()
    print(json.dumps({k: v for k, v in rec.items() if k != "config"}, indent=2))
