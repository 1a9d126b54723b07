"""Train the demo's U-Net and write the weights the package ships (``dsrewrite/shapes/shapes_unet.safetensors``).

Deterministic: one thread, ``torch.use_deterministic_algorithms(True)``, seeded data
(:mod:`dsrewrite.shapes`), seeded initialisation and batches, safetensors output (no
random archive ids): the same bytes on every run with the same torch build. The test
``tests/test_demo_trained.py::test_shipped_weights_are_what_the_script_trains`` (slow)
retrains and compares the SHA-256.

Run (about 3-6 minutes on 2 cores)::

    .venv/bin/python bench/train_demo.py            # writes the weights, prints mIoU and SHA-256
    .venv/bin/python bench/train_demo.py --out /tmp/w.safetensors   # elsewhere (the slow test does this)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_unet import train  # noqa: E402
from dsrewrite.shapes.trained import TRAIN_CONFIG, WEIGHTS  # noqa: E402


def train_demo_weights(out: Path, *, log: bool = True) -> dict[str, object]:
    """Train with :data:`TRAIN_CONFIG` deterministically and write the weights to ``out``; return the record."""
    import safetensors.torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(TRAIN_CONFIG["init_seed"])  # the initialisation (train() then seeds the batches)
    model, record = train(TRAIN_CONFIG, log=log)
    blob = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()},
                                  metadata={"producer": "bench/train_demo.py"})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(out)
    return {"test_miou": record["test_miou"], "final_loss": record["final_loss"],
            "train_seconds": round(record["train_seconds"], 1), "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob), "torch": torch.__version__}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=WEIGHTS, help=f"where to write the weights (default {WEIGHTS})")
    args = ap.parse_args(argv)
    print(json.dumps(train_demo_weights(args.out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
