"""Benchmark: does SkySense stage-1 pretraining help? A frozen-feature linear probe of land cover on held-out
tiles of the demo region, pretrained ``tiny`` weights against random-init weights with the same probe budget.

Prints one JSON object per line:

- ``pretrain``: the pretraining run (``pipeline.training.run_pretraining``: preset tiny, stage 1, ``--steps``
  steps of ``--batch-size`` windows of ``--window`` px, one Ray Train worker) and its wall time;
- ``probe`` twice (``weights`` = ``pretrained`` / ``random``): ``pipeline.finetune.run_finetune`` with the
  linear head (a 1x1 convolution on the frozen F_fus), the same epochs, learning rate, windows and the same
  held-out tiles (every 4th tile), validation mIoU and per-class IoU on the 10 m land-cover truth;
- ``result``: both mIoUs and the margin (pretrained - random).

The random-init model is the same preset built with the same seed as the pretraining run's initial weights.

    python bench/quality.py [--cube out/demo/cube.zarr] [--labels out/demo/region/truth/landcover_10m.tif]
                            [--steps 200] [--batch-size 8] [--window 16] [--probe-epochs 3] [--out DIR]

Without ``--cube``, the demo cube of ``make demo`` is used (run ``make demo`` first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cube", default=str(ROOT / "out/demo/cube.zarr"))
    p.add_argument("--labels", default=str(ROOT / "out/demo/region/truth/landcover_10m.tif"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--probe-epochs", type=int, default=3)
    p.add_argument("--probe-lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    a = p.parse_args(argv)
    for what, path in (("cube", a.cube), ("labels", a.labels)):
        if not Path(path).exists():
            print(f"error: {what} {path} does not exist (run `make demo` first, or pass --{what})", file=sys.stderr)
            return 2

    import torch

    from pipeline import zarr_cube
    from pipeline.finetune import FinetuneConfig, run_finetune
    from pipeline.ingest import init_ray
    from pipeline.training import PretrainJobConfig, run_pretraining
    from skysense_core import build_model
    from skysense_core.checkpoint import save_checkpoint

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="skysense-quality-"))
    hr_ratio = zarr_cube.cube_config(zarr_cube.open_cube(a.cube)).hr_ratio
    init_ray(None)

    t0 = time.perf_counter()
    job = PretrainJobConfig(cube=a.cube, preset="tiny", stage=1, steps=a.steps, batch_size=a.batch_size, workers=1,
                            out=str(out / "runs"), name="quality-tiny-s1", window=a.window, seed=a.seed,
                            checkpoint_every=max(a.steps // 4, 1))
    run_pretraining(job, progress=lambda s: print(s, file=sys.stderr))
    seconds = time.perf_counter() - t0
    print(json.dumps({"bench": "quality", "kind": "pretrain", "preset": "tiny", "stage": 1, "steps": a.steps,
                      "batch_size": a.batch_size, "window": a.window, "samples": a.steps * a.batch_size,
                      "seconds": round(seconds, 1), "cube": a.cube}), flush=True)

    torch.manual_seed(a.seed)
    random_ckpt = save_checkpoint(out / "random.safetensors", build_model("tiny", hr_ratio=hr_ratio),
                                  meta={"weights": "random init", "seed": a.seed})
    results = {}
    for name, ckpt in (("pretrained", job.run_dir / "model.safetensors"), ("random", random_ckpt)):
        m = run_finetune(FinetuneConfig(cube=a.cube, labels=a.labels, checkpoint=str(ckpt), out=str(out / name),
                                        head="linear", epochs=a.probe_epochs, lr=a.probe_lr, window=32,
                                        seed=a.seed), log=lambda s: print(s, file=sys.stderr))
        results[name] = m["miou"]
        print(json.dumps({"bench": "quality", "kind": "probe", "weights": name, "head": "linear",
                          "epochs": a.probe_epochs, "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"],
                          "per_class_iou": m["per_class_iou"], "val_tiles": m["val_tiles"],
                          "val_pixels": m["val_pixels"]}), flush=True)
    margin = results["pretrained"] - results["random"]
    print(json.dumps({"bench": "quality", "kind": "result", "miou_pretrained": results["pretrained"],
                      "miou_random": results["random"], "margin": margin, "pretrain_steps": a.steps,
                      "pretrain_samples": a.steps * a.batch_size, "pretrained_wins": margin > 0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
