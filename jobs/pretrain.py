"""Pretrain SkySense on a cube with Ray Data + Ray Train (stage 1 self-distillation, stage 2 masked semantics).

    python jobs/pretrain.py --cube CUBE --preset NAME --stage 1|2 --steps N --batch-size N --workers N [--gpu]
                            --out RUN_DIR [--name RUN_NAME] [--labels RASTER] [--num-classes K] [--lr LR]
                            [--checkpoint-every K] [--window PX] [--seed S] [--init CKPT] [--ray-address ADDR]
    ray job submit --working-dir . -- python jobs/pretrain.py ...

The run lives in RUN_DIR/RUN_NAME: checkpoints, metrics.csv, loss_curve.png, model.safetensors, model_card.json.
Re-running with the same --out and --name continues from the last checkpoint up to --steps (a larger --steps
trains further; a finished run is not started over). Exit codes: 0 done, 1 training failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any cwd
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline import zarr_cube  # noqa: E402
from pipeline.training import PretrainJobConfig, run_pretraining  # noqa: E402


def _kv(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv=None) -> argparse.Namespace:
    d = PretrainJobConfig(cube="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cube", required=True, help="the Zarr cube (jobs/ingest.py)")
    p.add_argument("--preset", default=d.preset, help="model preset: tiny, small, base, huge")
    p.add_argument("--stage", type=int, default=d.stage, choices=[1, 2], help="1: SkySense, 2: SkySense++ semantics")
    p.add_argument("--steps", type=int, required=True, help="total optimiser steps of the run")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over the workers")
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    p.add_argument("--out", required=True, help="run storage directory; the run is OUT/NAME")
    p.add_argument("--name", default=None, help="run name (default PRESET-stageN); the same name continues a run")
    p.add_argument("--labels", default=None, help="stage 2: label raster (default: the demo region's truth)")
    p.add_argument("--num-classes", type=int, default=None, help="stage 2: classes (default: from the raster)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate (AdamW, warm-up then cosine); default 5e-4 for stage 1, 2e-4 for stage 2 "
                        "(the official SkySense++ value, with layer-wise decay 0.7 and its frozen blocks)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--window", type=int, default=None, help="training window in S2 pixels (multiple of 4)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init", default=None, help="safetensors weights to start from (e.g. stage 1 for stage 2)")
    p.add_argument("--max-failures", type=int, default=d.max_failures, help="worker-group restarts allowed")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="Ray CPUs per train worker (default 0.5 on small machines, else 1)")
    p.add_argument("--min-valid", type=float, default=d.min_valid,
                   help="skip training windows with less data coverage than this fraction (0: keep all)")
    p.add_argument("--data-cpus", type=float, default=d.data_cpus, help="Ray CPUs per read / view task")
    p.add_argument("--views-in-loop", action="store_true", help="stage 1: make views in the training loop")
    p.add_argument("--set", dest="model_overrides", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field (repeatable)")
    p.add_argument("--pretrain-set", dest="pretrain_overrides", type=_kv, action="append", default=[],
                   metavar="KEY=VALUE", help="override a PretrainConfig / AugmentConfig field (repeatable)")
    p.add_argument("--write-pids", action="store_true", help=argparse.SUPPRESS)  # tests: ranks write their pids
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster: an address, 'auto' or 'local'. Default: RAY_ADDRESS if set (ray job submit sets it), "
        "else a fresh local Ray",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = PretrainJobConfig(
        cube=args.cube, preset=args.preset, stage=args.stage, steps=args.steps, batch_size=args.batch_size,
        workers=args.workers, gpu=args.gpu, out=args.out, name=args.name, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, checkpoint_every=args.checkpoint_every,
        window=args.window, labels=args.labels, num_classes=args.num_classes, seed=args.seed, init=args.init,
        model_overrides=dict(args.model_overrides), pretrain_overrides=dict(args.pretrain_overrides),
        max_failures=args.max_failures, cpus_per_worker=args.cpus_per_worker, data_cpus=args.data_cpus,
        views_on_data_workers=not args.views_in_loop, write_pids=args.write_pids,
    )
    try:
        run_pretraining(cfg, ray_address=args.ray_address)
    except (ValueError, zarr_cube.CubeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # training failed beyond its retries (ray.train.TrainingFailedError and kin)
        print(f"error: training failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
