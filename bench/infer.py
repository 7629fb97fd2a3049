"""Benchmark: what does the Ray pipeline of ``jobs/infer.py`` cost over the bare model forward?

Two measurements of the same tiles, window plan, batch size, weights and torch thread count, in one process:

- ``forward``: the baseline. Every window of the tiles is cut from tile samples read into memory beforehand and
  collated into model inputs beforehand; the clock runs over ``model(x).fused`` + the head only (CPU or GPU, the
  same autocast as the pipeline).
- ``pipeline``: ``pipeline.inference.run_inference`` as the job runs it, from a fresh tile directory: cube read
  tasks -> the inference actor (sliding windows, Hann blending, nodata) -> the per-tile GeoTIFF sink -> the
  manifest; the clock is the pipeline's own (``InferenceResult.seconds["pipeline"]``: first row to last). The
  mosaic is timed too but is not part of the ratio (``bench/mosaic.py`` measures it).

Throughput = tile-core pixels (10 m) per second: both sides predict the same windows, and the forward side is
credited with the same core pixels. ``ratio`` = pipeline / forward pixels/s; the target is >= 0.8. With
``--repeats R`` both run R times and the result uses the medians.

    python bench/infer.py [--cube out/demo/cube.zarr] [--checkpoint HEAD_OR_RUN_DIR] [--tiles 6] [--window 32]
                          [--overlap 8] [--batch-size 4] [--repeats 1] [--gpu] [--out DIR]

Without ``--checkpoint`` a random-init ``tiny`` encoder and a linear head are made (the cost measured does not
depend on the weights). Without ``--cube`` the demo cube of ``make demo`` is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def random_head(cube: str, out: Path) -> Path:
    """A random-init encoder of the preset matching the cube's HR ratio, and a linear head on it."""
    import torch

    from pipeline import zarr_cube
    from pipeline.finetune import save_head
    from skysense_core import build_model
    from skysense_core.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("tiny", hr_ratio=zarr_cube.cube_config(zarr_cube.open_cube(cube)).hr_ratio)
    enc = save_checkpoint(out / "encoder.safetensors", model, meta={"what": "random init, bench/infer.py"})
    in_dim = model.cfg.fusion_dim * (2 if model.glbank is not None else 1)
    (out / "head").mkdir(parents=True, exist_ok=True)
    save_head(out / "head" / "head.safetensors", torch.nn.Conv2d(in_dim, 7, 1), kind="linear", num_classes=7,
              in_dim=in_dim, channels=model.cfg.uper_channels, encoder=enc, preset=model.cfg.name)
    return out / "head"


def bare_forward(plan, tiles: list[str], gpu: bool) -> dict:
    """The baseline: model + head over every window of ``tiles``, inputs prepared in memory first."""
    import torch

    from pipeline.datasource import rows_to_input
    from pipeline.inference import TilePredictor, read_tiles_local, window_batch, window_plan

    spec = plan.spec
    pred = TilePredictor(spec)  # the same model, head, device and torch threads as an actor
    starts = window_plan(spec.size, spec.window, spec.overlap)
    origins = [(y, x) for y in starts for x in starts]
    inputs = []
    for batch in read_tiles_local(plan.fingerprint["cube"], tiles, modalities=list(spec.modalities)):
        row = {k: v[0] for k, v in batch.items()}
        for i in range(0, len(origins), spec.batch_size):
            x, _ = rows_to_input(window_batch(row, origins[i:i + spec.batch_size], spec.window, spec.hr_ratio,
                                               spec.modalities), spec.modalities)
            inputs.append(x.to(pred.device))
    with torch.no_grad():
        pred._window_values(inputs[0])  # warm-up (allocator, kernels), not timed
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in inputs:
            pred._window_values(x)
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    pixels = len(tiles) * spec.core[1] ** 2
    return {"windows": len(origins) * len(tiles), "pixels": pixels, "seconds": round(seconds, 3),
            "pixels_per_s": pixels / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cube", default=str(ROOT / "out/demo/cube.zarr"))
    p.add_argument("--checkpoint", default=None, help="fine-tune run dir or head.safetensors (default: random)")
    p.add_argument("--tiles", type=int, default=6, help="the first N done tiles of the cube")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--out", default=None, help="keep the products here (default: a temporary directory)")
    a = p.parse_args(argv)
    if not Path(a.cube).exists():
        print(f"error: cube {a.cube} does not exist (run `make demo` first, or pass --cube)", file=sys.stderr)
        return 2

    import ray

    from pipeline.datasource import done_tiles
    from pipeline.inference import InferenceConfig, actor_resources, plan_inference, run_inference
    from pipeline.ingest import init_ray

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="skysense-bench-infer-"))
    ckpt = a.checkpoint or str(random_head(a.cube, out))
    tiles = sorted(done_tiles(a.cube))[: a.tiles]
    init_ray(None, log_to_driver=False)  # stdout: JSON lines only
    base = InferenceConfig(cube=a.cube, checkpoint=ckpt, task="landcover", out=str(out / "bench.tif"),
                           window=a.window, overlap=a.overlap, batch_size=a.batch_size, gpu=a.gpu, tiles=tiles,
                           overwrite=True)
    _, per, threads = actor_resources(base)  # the actors' torch threads: the baseline gets the same
    plan = plan_inference(base, say=lambda s: None)
    plan.spec = dataclasses.replace(plan.spec, threads=threads)
    common = {"bench": "infer", "tiles": len(tiles), "tile_px": plan.spec.core[1], "window": a.window,
              "overlap": a.overlap, "batch_size": a.batch_size, "threads": threads, "actor_cpus": per,
              "device": "cuda" if a.gpu else "cpu", "cpus": ray.cluster_resources().get("CPU")}
    fwd, pipe = [], []
    for r in range(a.repeats):
        f = bare_forward(plan, tiles, a.gpu)
        fwd.append(f["pixels_per_s"])
        print(json.dumps({**common, "kind": "forward", "repeat": r, **f}), flush=True)
        cfg = dataclasses.replace(base, name=f"run-{r}", work_dir=str(out))
        res = run_inference(cfg, progress=lambda s: print(s, file=sys.stderr))
        if not res.complete:
            print(f"error: the pipeline left tiles undone: {res.failed}", file=sys.stderr)
            return 1
        pipe.append(res.pixels_per_s)
        print(json.dumps({**common, "kind": "pipeline", "repeat": r, "pixels": len(tiles) * plan.spec.core[1] ** 2,
                          "seconds": {k: round(v, 3) for k, v in res.seconds.items()},
                          "pixels_per_s": res.pixels_per_s}), flush=True)
    f, q = statistics.median(fwd), statistics.median(pipe)
    print(json.dumps({**common, "kind": "result", "forward_pixels_per_s": round(f, 1),
                      "pipeline_pixels_per_s": round(q, 1), "ratio": round(q / f, 3), "target": 0.8,
                      "meets_target": q / f >= 0.8, "repeats": a.repeats}), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
