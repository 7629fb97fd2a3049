"""Fine-tune a segmentation head on labelled cube tiles and report validation mIoU per class.

    python jobs/finetune.py --cube CUBE --labels LABELS_COG --checkpoint CKPT --head upernet|linear --out DIR
    ray job submit --working-dir . -- python jobs/finetune.py ...

Labels are any categorical raster (class ids, 255 = nodata), reprojected onto the cube grid. Every 4th tile
(sorted ids) is held out for validation. Writes DIR/head.safetensors and DIR/metrics.json and prints the metrics
as one JSON line. Exit codes: 0 done, 1 failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any cwd
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline.finetune import HEADS, FinetuneConfig, run_finetune  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cube", required=True)
    p.add_argument("--labels", required=True, help="categorical label raster (GeoTIFF / COG), 255 = nodata")
    p.add_argument("--checkpoint", required=True, help="a skysense checkpoint (.safetensors) from jobs/pretrain.py")
    p.add_argument("--head", choices=HEADS, default="upernet")
    p.add_argument("--out", required=True)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--window", type=int, default=32, help="training window in 10 m pixels (multiple of 4)")
    p.add_argument("--val-every", type=int, default=4, help="hold out every N-th tile for validation")
    p.add_argument("--unfreeze", action="store_true", help="train the encoder too (default: frozen)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop training after N optimiser steps")
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
    import ray

    from pipeline.ingest import init_ray

    init_ray(a.ray_address)
    cfg = FinetuneConfig(cube=a.cube, labels=a.labels, checkpoint=a.checkpoint, out=a.out, head=a.head,
                         num_classes=a.num_classes, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                         window=a.window, val_every=a.val_every, freeze_encoder=not a.unfreeze, seed=a.seed,
                         max_steps=a.max_steps)
    try:
        metrics = run_finetune(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    keep = ("head", "num_classes", "steps", "miou", "pixel_accuracy", "per_class_iou", "val_tiles", "val_pixels")
    print(json.dumps({k: metrics[k] for k in keep}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
