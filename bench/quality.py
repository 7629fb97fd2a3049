"""Benchmark: does the model earn its place? Land-cover quality on the held-out tiles of the demo region: the
fine-tuned model against the raw-pixel baseline, and pretrained against random-init weights at the same
fine-tuning budget.

Prints one JSON object per line:

- ``pretrain``: the pretraining run (``pipeline.training.run_pretraining``: preset tiny, stage 1, ``--steps``
  steps of ``--batch-size`` windows of ``--window`` px, one Ray Train worker; its exported EMA teacher is
  probed) and its wall time, or with ``--pretrained CKPT`` the existing stage-1 ``model.safetensors`` probed;
- ``finetune`` four times, ``weights`` pretrained / random x ``features`` ``dates+input`` (the recipe's default:
  F_fus, per-date tokens by month, the input as a skip) / ``dates`` (the encoder's features alone): the head of
  ``pipeline.finetune`` (linear, standardised, class-balanced, ``--head-steps`` L-BFGS iterations, best step by
  the selection tiles), its held-out mIoU, per-class IoU, pixel accuracy and seconds;
- ``baseline``: the raw-pixel classifier (``pipeline.baselines.raw_pixel_baseline``) fitted on the same training
  pixels, scored on the same held-out pixels;
- ``result``: model (pretrained, dates+input) - baseline, and pretrained - random per feature set (the goal:
  >= +0.10 mIoU; the pretraining budget is in the ``pretrain`` line);
- ``flood``: the demo flood event (``--flood-truth``, default the demo region's): a head fine-tuned by the same
  recipe on the flood truth, on the series up to the event date (``until_doy``), against the per-tile Otsu
  baseline (``pipeline.baselines.otsu_baseline``) on the same held-out tiles and dates, per class.

The random-init encoder is the preset built with the pretraining run's seed (its initial weights). Tiles are split
as fine-tuning splits them (``pipeline.finetune.split_for_finetune``). Features are computed once per encoder with
the inference window plan; the ``dates`` head reads the same cache without the input columns.

    python bench/quality.py [--cube out/demo/cube.zarr] [--labels out/demo/region/truth/landcover_10m.tif]
                            [--steps 100] [--batch-size 8] [--window 16] [--pretrained CKPT] [--head-steps 60]
                            [--out DIR]

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
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--pretrained", default=None, help="probe this stage-1 model.safetensors instead of pretraining")
    p.add_argument("--head-steps", type=int, default=60, help="L-BFGS iterations of every head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flood-truth", default=None,
                   help="flood truth raster (default: the demo region's truth/flood_*.tif next to --labels)")
    p.add_argument("--flood-date", default="2024-10-22", help="the event date of --flood-truth")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    a = p.parse_args(argv)
    for what, path in (("cube", a.cube), ("labels", a.labels)):
        if not Path(path).exists():
            print(f"error: {what} {path} does not exist (run `make demo` first, or pass --{what})", file=sys.stderr)
            return 2

    import dataclasses

    import torch

    from pipeline import zarr_cube
    from pipeline.baselines import raw_pixel_baseline
    from pipeline.finetune import FinetuneConfig, evaluate, extract_features, split_for_finetune, train_head
    from pipeline.ingest import init_ray
    from pipeline.labels import label_classes
    from pipeline.training import PretrainJobConfig, run_pretraining
    from skysense_core import build_model
    from skysense_core.checkpoint import save_checkpoint

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="skysense-quality-"))
    hr_ratio = zarr_cube.cube_config(zarr_cube.open_cube(a.cube)).hr_ratio
    init_ray(None, log_to_driver=False)  # stdout: JSON lines only

    def say(line: dict) -> None:
        print(json.dumps({"bench": "quality", **line}), flush=True)

    if a.pretrained:
        ckpt = Path(a.pretrained)
        card = json.loads((ckpt.parent / "model_card.json").read_text()) if (ckpt.parent / "model_card.json").exists() \
            else {}
        say({"kind": "pretrain", "checkpoint": str(ckpt), "steps": card.get("steps"),
             "samples": card.get("samples_seen"), "reused": True})
    else:
        t0 = time.perf_counter()
        job = PretrainJobConfig(cube=a.cube, preset="tiny", stage=1, steps=a.steps, batch_size=a.batch_size,
                                workers=1, out=str(out / "runs"), name="quality-tiny-s1", window=a.window,
                                seed=a.seed, lr=a.lr, checkpoint_every=max(a.steps // 4, 1))
        run_pretraining(job, progress=lambda s: print(s, file=sys.stderr))
        ckpt = job.run_dir / "model.safetensors"
        say({"kind": "pretrain", "preset": "tiny", "stage": 1, "steps": a.steps, "batch_size": a.batch_size,
             "window": a.window, "samples": a.steps * a.batch_size, "seconds": round(time.perf_counter() - t0, 1),
             "cube": a.cube, "checkpoint": str(ckpt), "weights": "EMA teacher"})

    torch.manual_seed(a.seed)  # the pretraining run's initial weights (training.train_loop_per_worker)
    random_ckpt = save_checkpoint(out / "random-init.safetensors", build_model("tiny", hr_ratio=hr_ratio),
                                  meta={"what": "random init, bench/quality.py"})
    cfg = FinetuneConfig(cube=a.cube, labels=a.labels, checkpoint=str(ckpt), out=str(out), steps=a.head_steps,
                         seed=a.seed)
    train_tiles, select_tiles, held_out = split_for_finetune(a.cube, cfg)
    num_classes = label_classes(a.labels)
    results: dict[tuple[str, str], float] = {}
    cached = {}
    for weights, path in (("pretrained", str(ckpt)), ("random", str(random_ckpt))):
        t0 = time.perf_counter()
        sets = {name: extract_features(a.cube, a.labels, path, tiles, "dates+input", sample=sample, seed=a.seed,
                                       log=lambda s: print(s, file=sys.stderr))
                for name, tiles, sample in (("train", train_tiles, cfg.pixels_per_tile),
                                            ("select", select_tiles, 8192), ("held_out", held_out, None))}
        feature_s = time.perf_counter() - t0
        cached[weights] = sets
        for features in ("dates+input", "dates"):
            # the cache is of 'dates+input': the 'dates' head reads its model columns only
            k = sets["train"].model_width("dates+input") if features == "dates" else sets["train"].x.shape[1]
            view = {n: dataclasses.replace(ts, x=ts.x[:, :k]) for n, ts in sets.items()}
            head, rec = train_head(dataclasses.replace(cfg, features=features), view["train"], view["select"],
                                   num_classes, k, log=lambda s: print(s, file=sys.stderr))
            m = evaluate(head, view["held_out"].x, view["held_out"].y, num_classes)
            results[(weights, features)] = m["miou"]
            say({"kind": "finetune", "weights": weights, "features": features, "head": cfg.head,
                 "head_steps": a.head_steps, "best_step": rec["best_step"], "feature_dim": k,
                 "train_pixels": len(view["train"].y), "val_pixels": m["pixels"], "val_tiles": held_out,
                 "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "per_class_iou": m["per_class_iou"],
                 "feature_seconds": round(feature_s, 1), "head_seconds": round(rec["seconds"], 1)})
    tr, te = cached["pretrained"]["train"], cached["pretrained"]["held_out"]
    base = raw_pixel_baseline(tr.inputs, tr.y, te.inputs, te.y, num_classes, seed=a.seed)
    say({"kind": "baseline", **{k: v for k, v in base.items() if k != "pixels"}, "val_pixels": base["pixels"]})
    model = results[("pretrained", "dates+input")]
    say({"kind": "result", "miou_model": model, "miou_baseline": base["miou"],
         "model_minus_baseline": model - base["miou"],
         "model_wins": model > base["miou"], "within_0.02_of_baseline": model >= base["miou"] - 0.02,
         **{f"pretrained_minus_random[{f}]": results[("pretrained", f)] - results[("random", f)]
            for f in ("dates+input", "dates")},
         **{f"miou[{w},{f}]": v for (w, f), v in results.items()}})

    from datetime import date

    from pipeline.baselines import otsu_baseline
    from pipeline.finetune import run_finetune

    flood = Path(a.flood_truth) if a.flood_truth else next(iter(sorted(Path(a.labels).parent.glob("flood_*.tif"))),
                                                             None)
    if flood is None or not flood.exists():
        say({"kind": "flood", "skipped": f"no flood truth raster ({a.flood_truth or 'flood_*.tif beside --labels'})"})
        return 0
    event = date.fromisoformat(a.flood_date).timetuple().tm_yday
    t0 = time.perf_counter()
    m = run_finetune(dataclasses.replace(cfg, labels=str(flood), out=str(out / "flood-head"), until_doy=event),
                     log=lambda s: print(s, file=sys.stderr))
    o = otsu_baseline(a.cube, str(flood), m["val_tiles"], until_doy=event)
    say({"kind": "flood", "truth": str(flood), "event_doy": event, "val_tiles": m["val_tiles"],
         "val_pixels": m["val_pixels"], "class_names": m["class_names"], "miou_model": m["miou"],
         "per_class_iou_model": list(m["per_class_iou"].values()), "miou_otsu": o["miou"],
         "per_class_iou_otsu": o["per_class_iou"], "model_minus_otsu": m["miou"] - o["miou"],
         "model_wins": m["miou"] >= o["miou"], "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
