"""Calibration benchmark in 3-D: a small volumetric U-Net trained on generated shapes, rewritten, calibrated, healed.

Not a test. One command, from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python bench/calibration_3d.py --json /tmp/cal3d.json

1. Generates volumes (``--size``³ voxels, noise plus a ball (class 1) and a box (class 2) at random
   places and sizes) and trains a small 3-D U-Net (two 3×3×3 conv stages per level, BatchNorm3d,
   trilinear upsampling, skip concatenation; the decoder is the region ``decoder``) with
   cross-entropy, seeded.
2. Rewrites it with ``decoder_only`` (m=1, dw_pw and pw_dw; SVD init), calibrates on unlabeled
   training volumes (:func:`dsrewrite.refit.calibrate.calibrate`), then heals for ``--heal-steps``
   steps (:func:`dsrewrite.refit.heal.heal`).
3. Reports on held-out volumes: the MAC ratio, the output's relative L2 error against the dense
   model's logits and the mean foreground Dice, for the dense model, SVD init, calibrated and
   healed, with the time calibration and healing took.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrewrite.measure.macs import count_costs  # noqa: E402
from dsrewrite.planning.apply import apply_plan  # noqa: E402
from dsrewrite.planning.planner import plan  # noqa: E402
from dsrewrite.refit.calibrate import calibrate  # noqa: E402
from dsrewrite.refit.heal import heal  # noqa: E402


def volumes(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` volumes ``(n, 1, s, s, s)`` and labels ``(n, s, s, s)`` (0 background, 1 ball, 2 box)."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.arange(size, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    x = 0.3 * torch.randn(n, 1, size, size, size, generator=g)
    y = torch.zeros(n, size, size, size, dtype=torch.long)
    for i in range(n):
        c = torch.rand(3, generator=g) * size * 0.6 + size * 0.2
        r = float(torch.rand(1, generator=g)) * size * 0.15 + size * 0.1
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        lo = (torch.rand(3, generator=g) * size * 0.6).long()
        ext = (torch.rand(3, generator=g) * size * 0.25 + size * 0.15).long()
        box = ((zz >= lo[0]) & (zz < lo[0] + ext[0]) & (yy >= lo[1]) & (yy < lo[1] + ext[1])
               & (xx >= lo[2]) & (xx < lo[2] + ext[2]))
        y[i][box] = 2
        y[i][ball] = 1
        x[i, 0] += 0.8 * ball.float() + 0.5 * box.float()
    return x, y


def stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
                         nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class Decoder(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.block2 = stage(4 * w + 2 * w, 2 * w)
        self.block1 = stage(2 * w + w, w)

    def forward(self, b: Tensor, s2: Tensor, s1: Tensor) -> Tensor:
        d2 = self.block2(torch.cat([self.up(b), s2], 1))
        return self.block1(torch.cat([self.up(d2), s1], 1))


class UNet3d(nn.Module):
    def __init__(self, w: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.enc1, self.enc2, self.bottom = stage(1, w), stage(w, 2 * w), stage(2 * w, 4 * w)
        self.decoder = Decoder(w)
        self.head = nn.Conv3d(w, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool3d(s1, 2))
        b = self.bottom(F.max_pool3d(s2, 2))
        return self.head(self.decoder(b, s2, s1))


def dice(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean foreground Dice (classes 1, 2) over the volumes."""
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 4]).argmax(1) for i in range(0, len(x), 4)])
    out = []
    for c in (1, 2):
        p, t = pred == c, y == c
        out.append(float(2 * (p & t).sum() / (p.sum() + t.sum()).clamp_min(1)))
    return sum(out) / len(out)


def rel_err(model: nn.Module, ref: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        a = torch.cat([model(x[i:i + 4]) for i in range(0, len(x), 4)])
        b = torch.cat([ref(x[i:i + 4]) for i in range(0, len(x), 4)])
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--test", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--calib", type=int, default=16, help="unlabeled training volumes for calibration")
    ap.add_argument("--heal-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    xtr, ytr = volumes(a.train, a.size, 1)
    xte, yte = volumes(a.test, a.size, 2)
    net = UNet3d()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        perm = torch.randperm(a.train)
        for i in range(0, a.train, 4):
            idx = perm[i:i + 4]
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch}: loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - t0
    net.eval()
    out: dict = {"size": a.size, "threads": a.threads, "train_s": train_s, "dense_dice": dice(net, xte, yte), "rows": []}
    print(f"dense Dice {out['dense_dice']:.4f} (trained in {train_s:.0f} s)", flush=True)
    calib = [xtr[i:i + 4] for i in range(0, a.calib, 4)]
    dense_macs = count_costs(net, xte[:1]).total_macs
    for order in ("dw_pw", "pw_dw"):
        p = plan(net, "decoder_only", xte[:1], order=order)
        light = apply_plan(net, p).eval()
        row = {"order": order, "replaced": len(p.replaced),
               "mac_ratio": dense_macs / count_costs(light, xte[:1]).total_macs,
               "svd_err": rel_err(light, net, xte), "svd_dice": dice(light, xte, yte)}
        t = time.perf_counter()
        res = calibrate(net, light, calib)
        row["calib_s"] = time.perf_counter() - t
        row["calib_err"], row["calib_dice"] = rel_err(light.eval(), net, xte), dice(light.eval(), xte, yte)
        healed = copy.deepcopy(light)
        t = time.perf_counter()
        heal(healed, net, [xtr[i:i + 4] for i in range(0, a.train, 4)], steps=a.heal_steps, lr=1e-3, progress=False)
        row["heal_s"] = time.perf_counter() - t
        healed.eval()
        row["healed_err"], row["healed_dice"] = rel_err(healed, net, xte), dice(healed, xte, yte)
        row["calib_notes"] = list(res.notes)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
