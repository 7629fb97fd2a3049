"""Fine-tune a land-cover head on labelled cube tiles and report held-out mIoU per class beside the raw-pixel
baseline.

    python jobs/finetune.py --cube CUBE --labels LABELS_COG --checkpoint CKPT --out DIR
                            [--train head] [--features dates+input] [--head linear|mlp] [--steps 60]
    ray job submit --working-dir . -- python jobs/finetune.py ...

The recipe (pipeline.finetune): every 4th tile (sorted ids) is held out for testing and every 6th remaining tile
chooses the best step; the frozen encoder's per-pixel features are computed once with the inference window plan
and cached; the head (standardisation folded in, class-balanced loss) trains on pixels drawn across all training
tiles. ``--train fusion`` first trains the fusion and date encoding on the frozen encoders' outputs, computed
once per tile and cached (``--model-steps``, ``--batch-size`` pixels per step, ``--gpu``); ``--train all`` trains
the whole model on Ray Train (``--workers``, ``--gpu``, ``--model-steps``; checkpoints in DIR/model, a
re-submitted job resumes there); either then fits the head on the trained model's features. Labels are any
categorical raster (class ids, 255 = nodata), reprojected onto the cube grid. Writes DIR/head.safetensors,
DIR/metrics.json and DIR/baseline.json and prints one JSON line: the model's held-out mIoU and per-class IoU,
the baseline's, and the seconds. Exit codes: 0 done, 1 failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any cwd
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline.finetune import HEADS, TRAIN_PARTS, FinetuneConfig, check_inputs, finetune  # noqa: E402
from skysense_core.pixel_features import FEATURE_SETS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = FinetuneConfig
    p.add_argument("--cube", required=True)
    p.add_argument("--labels", required=True, help="categorical label raster (GeoTIFF / COG), 255 = nodata")
    p.add_argument("--checkpoint", required=True, help="a skysense checkpoint (.safetensors) from jobs/pretrain.py")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the head an existing --out holds")
    p.add_argument("--train", choices=TRAIN_PARTS, default=d.train,
                   help="what is trained: head (frozen encoder, cached features), fusion, all")
    p.add_argument("--features", choices=FEATURE_SETS, default=d.features,
                   help="what the head reads per pixel (skysense_core.pixel_features)")
    p.add_argument("--head", choices=HEADS, default=d.head)
    p.add_argument("--hidden", type=int, default=d.hidden, help="MLP head width")
    p.add_argument("--optimizer", choices=("lbfgs", "adamw"), default=d.optimizer)
    p.add_argument("--steps", type=int, default=d.steps, help="L-BFGS iterations (adamw: minibatch steps)")
    p.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)  # old name of --steps
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between model-selection checks")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="adamw, and --train fusion: pixels per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--pixels-per-tile", type=int, default=d.pixels_per_tile,
                   help="labelled pixels sampled from each training tile")
    p.add_argument("--window", type=int, default=d.window, help="--train all: training window in 10 m pixels")
    p.add_argument("--val-every", type=int, default=d.val_every, help="hold out every N-th tile for testing")
    p.add_argument("--select-every", type=int, default=d.select_every,
                   help="every N-th remaining tile chooses the best step")
    p.add_argument("--workers", type=int, default=d.workers, help="--train all: Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="fusion: train on this process's GPU; all: one GPU per worker")
    p.add_argument("--model-steps", type=int, default=FinetuneConfig.model_steps,
                   help="fusion / all: optimiser steps on the model's parts")
    p.add_argument("--model-batch", type=int, default=FinetuneConfig.model_batch,
                   help="fusion / all: global batch of windows")
    p.add_argument("--model-lr", type=float, default=FinetuneConfig.model_lr, help="fusion / all: peak learning rate")
    p.add_argument("--write-pids", action="store_true", help=argparse.SUPPRESS)  # tests: ranks write their pids
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the raw-pixel baseline")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    for what, path in (("cube", a.cube), ("labels", a.labels), ("checkpoint", a.checkpoint)):
        if not Path(path).exists():
            print(f"error: {what} {path} does not exist", file=sys.stderr)
            return 2
    if a.window % 4:
        print("error: --window must be a multiple of 4", file=sys.stderr)
        return 2
    for flag, value in (("--steps", a.max_steps or a.steps), ("--model-steps", a.model_steps),
                        ("--batch-size", a.batch_size), ("--pixels-per-tile", a.pixels_per_tile),
                        ("--workers", a.workers), ("--val-every", a.val_every), ("--eval-every", a.eval_every)):
        if value < 1:
            print(f"error: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 2
    import ray

    from pipeline.baselines import raw_pixel_baseline
    from pipeline.ingest import init_ray

    try:
        cfg = FinetuneConfig(cube=a.cube, labels=a.labels, checkpoint=a.checkpoint, out=a.out, head=a.head,
                             features=a.features, train=a.train, num_classes=a.num_classes,
                             steps=a.max_steps or a.steps, optimizer=a.optimizer, batch_size=a.batch_size, lr=a.lr,
                             weight_decay=a.weight_decay, hidden=a.hidden, window=a.window, val_every=a.val_every,
                             select_every=a.select_every, eval_every=a.eval_every,
                             pixels_per_tile=a.pixels_per_tile, seed=a.seed, workers=a.workers, gpu=a.gpu,
                             model_steps=a.model_steps, model_batch=a.model_batch, model_lr=a.model_lr,
                             write_pids=a.write_pids)
        check_inputs(cfg, overwrite=a.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_ray(a.ray_address)
    try:
        metrics, feats = finetune(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    keep = ("head", "features", "train", "num_classes", "steps", "best_step", "miou", "pixel_accuracy",
            "per_class_iou", "val_tiles", "val_pixels", "seconds")
    line = {k: metrics[k] for k in keep}
    if not a.no_baseline:
        base = raw_pixel_baseline(feats["train"].inputs, feats["train"].y, feats["held_out"].inputs,
                                  feats["held_out"].y, metrics["num_classes"], seed=a.seed)
        (Path(a.out) / "baseline.json").write_text(json.dumps(base, indent=2))
        line["baseline"] = {"miou": base["miou"], "classifier": base["classifier"],
                            "per_class_iou": dict(zip(metrics["class_names"], base["per_class_iou"], strict=True))}
        line["model_minus_baseline"] = metrics["miou"] - base["miou"]
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
