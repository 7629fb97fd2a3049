"""Benchmark: does SkySense stage-1 pretraining help? A frozen-feature linear probe of land cover on held-out
tiles of the demo region, pretrained ``tiny`` weights against random-init weights with the same probe budget.

Prints one JSON object per line:

- ``pretrain``: the pretraining run (``pipeline.training.run_pretraining``: preset tiny, stage 1, ``--steps``
  steps of ``--batch-size`` windows of ``--window`` px, one Ray Train worker) and its wall time (skipped with
  ``--pretrained CKPT``, which probes an existing stage-1 ``model.safetensors`` instead);
- ``probe`` twice (``weights`` = ``pretrained`` / ``random``): the linear probe and its validation mIoU,
  per-class IoU and pixel accuracy on the held-out tiles;
- ``result``: both mIoUs and the margin (pretrained - random).

The probe (the same for both encoders, the standard frozen-feature protocol): the cube is read once through the
Ray Data datasource in ``--probe-window`` px windows with the 10 m land-cover truth (``labels_grid``); each
encoder computes F_fus (``SkySense(...).fused``, (B, 2D, h, w) on the 10 m grid) with no gradient; the features
of every labelled pixel are kept (train tiles subsampled to ``--max-train-pixels``), standardised with the
training mean and std, and a linear classifier (a 1x1 convolution, i.e. multinomial logistic regression per
pixel) is trained with AdamW for ``--probe-steps`` full-batch steps. Tiles are split as fine-tuning splits them
(``pipeline.finetune.split_tiles``: every 4th tile held out). The random-init encoder is the same preset built
with the same seed as the pretraining run's initial weights.

    python bench/quality.py [--cube out/demo/cube.zarr] [--labels out/demo/region/truth/landcover_10m.tif]
                            [--steps 100] [--batch-size 8] [--window 16] [--pretrained CKPT] [--out DIR]

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


def extract_features(models: dict, cube: str, labels: str, tiles: list[str], window: int, batch_size: int):
    """Per model name: (features (N, C) float32, labels (N,) int64) of the labelled 10 m pixels of ``tiles``.
    One pass over the data feeds every model."""
    import numpy as np
    import torch

    from pipeline.datasource import read_cube, rows_to_input
    from pipeline.labels import NODATA

    feats = {k: [] for k in models}
    ys = []
    ds = read_cube(cube, tiles=tiles, window=window, labels=labels, min_valid=0.01)
    with torch.no_grad():
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            inp, _ = rows_to_input(batch)
            lab = torch.from_numpy(np.asarray(batch["labels_grid"], dtype=np.int64))
            keep = lab != NODATA  # (B, H, W)
            ys.append(lab[keep])
            for name, model in models.items():
                f = model(inp).fused.float()  # (B, C, H, W)
                feats[name].append(f.permute(0, 2, 3, 1)[keep])
    y = torch.cat(ys)
    return {k: (torch.cat(v), y) for k, v in feats.items()}


def linear_probe(x_tr, y_tr, x_va, y_va, num_classes: int, steps: int, lr: float, seed: int) -> dict:
    """Multinomial logistic regression on standardised features; validation confusion-based metrics."""
    import numpy as np
    import torch

    from pipeline.finetune import iou_from_confusion

    torch.manual_seed(seed)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
    x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std
    clf = torch.nn.Linear(x_tr.shape[1], num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(clf(x_tr), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = clf(x_va).argmax(1)
    cm = torch.bincount(y_va * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    ious = iou_from_confusion(cm)
    present = [v for v in ious if v is not None]
    return {"miou": float(np.mean(present)), "pixel_accuracy": float(cm.diag().sum() / cm.sum()),
            "per_class_iou": ious, "train_loss": float(loss.detach())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cube", default=str(ROOT / "out/demo/cube.zarr"))
    p.add_argument("--labels", default=str(ROOT / "out/demo/region/truth/landcover_10m.tif"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--pretrained", default=None, help="probe this stage-1 model.safetensors instead of pretraining")
    p.add_argument("--probe-window", type=int, default=32)
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--probe-lr", type=float, default=0.05)
    p.add_argument("--max-train-pixels", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    a = p.parse_args(argv)
    for what, path in (("cube", a.cube), ("labels", a.labels)):
        if not Path(path).exists():
            print(f"error: {what} {path} does not exist (run `make demo` first, or pass --{what})", file=sys.stderr)
            return 2

    import torch

    from pipeline import zarr_cube
    from pipeline.datasource import done_tiles
    from pipeline.finetune import split_tiles
    from pipeline.ingest import init_ray
    from pipeline.labels import label_classes
    from pipeline.training import PretrainJobConfig, run_pretraining
    from skysense_core import build_model
    from skysense_core.checkpoint import load_checkpoint

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="skysense-quality-"))
    hr_ratio = zarr_cube.cube_config(zarr_cube.open_cube(a.cube)).hr_ratio
    init_ray(None, log_to_driver=False)  # stdout: JSON lines only

    if a.pretrained:
        ckpt = Path(a.pretrained)
        card = json.loads((ckpt.parent / "model_card.json").read_text()) if (ckpt.parent / "model_card.json").exists() \
            else {}
        print(json.dumps({"bench": "quality", "kind": "pretrain", "checkpoint": str(ckpt),
                          "steps": card.get("steps"), "samples": card.get("samples_seen"),
                          "reused": True}), flush=True)
    else:
        t0 = time.perf_counter()
        job = PretrainJobConfig(cube=a.cube, preset="tiny", stage=1, steps=a.steps, batch_size=a.batch_size,
                                workers=1, out=str(out / "runs"), name="quality-tiny-s1", window=a.window,
                                seed=a.seed, lr=a.lr, checkpoint_every=max(a.steps // 4, 1))
        run_pretraining(job, progress=lambda s: print(s, file=sys.stderr))
        seconds = time.perf_counter() - t0
        ckpt = job.run_dir / "model.safetensors"
        print(json.dumps({"bench": "quality", "kind": "pretrain", "preset": "tiny", "stage": 1, "steps": a.steps,
                          "batch_size": a.batch_size, "window": a.window, "samples": a.steps * a.batch_size,
                          "seconds": round(seconds, 1), "cube": a.cube, "checkpoint": str(ckpt)}), flush=True)

    torch.manual_seed(a.seed)  # the pretraining run's initial weights (training.train_loop_per_worker)
    models = {"pretrained": load_checkpoint(ckpt)[0].eval(), "random": build_model("tiny", hr_ratio=hr_ratio).eval()}
    train_tiles, val_tiles = split_tiles(done_tiles(a.cube), 4)
    num_classes = label_classes(a.labels)
    t0 = time.perf_counter()
    tr = extract_features(models, a.cube, a.labels, train_tiles, a.probe_window, 8)
    va = extract_features(models, a.cube, a.labels, val_tiles, a.probe_window, 8)
    extract_s = time.perf_counter() - t0
    results = {}
    for name in models:
        x_tr, y_tr = tr[name]
        if len(y_tr) > a.max_train_pixels:  # the same pixels for both encoders (same seed)
            sel = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(a.seed))[: a.max_train_pixels]
            x_tr, y_tr = x_tr[sel], y_tr[sel]
        x_va, y_va = va[name]
        t1 = time.perf_counter()
        m = linear_probe(x_tr, y_tr, x_va, y_va, num_classes, a.probe_steps, a.probe_lr, a.seed)
        results[name] = m["miou"]
        print(json.dumps({"bench": "quality", "kind": "probe", "weights": name, "probe": "linear (frozen F_fus)",
                          "probe_steps": a.probe_steps, "train_pixels": len(y_tr), "val_pixels": len(y_va),
                          "val_tiles": val_tiles, "feature_dim": int(x_tr.shape[1]),
                          "probe_seconds": round(time.perf_counter() - t1, 1), **m}), flush=True)
    margin = results["pretrained"] - results["random"]
    print(json.dumps({"bench": "quality", "kind": "result", "miou_pretrained": results["pretrained"],
                      "miou_random": results["random"], "margin": margin, "feature_seconds": round(extract_s, 1),
                      "pretrained_wins": margin > 0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
