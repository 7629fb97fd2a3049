"""Benchmark: what one 10 m output pixel of ``jobs/infer.py`` costs, at several windows, and what the Ray pipeline
adds over the bare model forward.

For every window of ``--windows`` (S2 px; default 32 64 128 and the preset's default window) two measurements of
the same tiles, window plan (``PredictorSpec.windows``: the tile core plus its margin, ``--overlap`` px shared by
neighbouring windows), batch size, weights and torch thread count, in one process:

- ``forward``: the baseline. Every window of the tiles is cut from tile samples read into memory and collated
  into model inputs outside the clock (windows of the same shape and kept part batched across the tiles of a
  call, as the actor does); the clock runs over the model + the head only (``TilePredictor._window_values``:
  the encoders on the whole window, the per-location stages on its part in the tile core; CPU or GPU, the same
  autocast as the pipeline).
- ``pipeline``: ``pipeline.inference.run_inference`` as the job runs it, from a fresh tile directory: cube read
  tasks -> the inference actor (windows, Hann blending, nodata) -> the per-tile GeoTIFF sink -> the manifest;
  the clock is the pipeline's own (``InferenceResult.seconds["pipeline"]``: first row to last). The mosaic is
  timed too but is not part of the figures (``bench/mosaic.py`` measures it). The driver's CPU time over the
  pipeline (``driver_cpu_s``: process time of this process, which runs Ray Data's scheduling loop) shows
  whether it sleeps while the actors compute.

``ms_per_px`` = milliseconds per 10 m tile-core pixel (both sides are credited with the same core pixels;
for the pipeline end to end, the actor's start-up and model loading included), ``steady_ms_per_px`` = the
pipeline after its first tile (the rate a long run converges to; from the tiles' end times by the actor's clock,
``InferenceResult.seconds["steady_per_tile"]``), ``startup_s`` = the first tile's time less a steady tile's (Ray
Data start, the actor's process, imports and model load: a fixed cost per run, which a run of N tiles shares),
``computed_per_core`` = S2 px the model computes per core pixel (margin and overlaps). ``ratio`` = pipeline px/s
/ forward px/s (target >= 0.9). The result line checks the targets of the pipeline figure: ``ms_per_px`` at the
default window <= 0.1 on 2 CPU cores, and flat across the windows: every window within +-15 % of their median.
With ``--repeats R`` both sides run R times per window and the medians are used. Each side starts on an idle
machine (:func:`settle`: Ray's own processes stay busy for seconds after start-up and after each dataset).

By default every tile of the cube is predicted (the demo cube's 25): the fixed start-up (~5 s on 2 cores) is a
large share of a few tiles' time, not of a real run's.

    python bench/infer.py [--cube out/demo/cube.zarr] [--checkpoint HEAD_OR_RUN_DIR] [--preset tiny] [--tiles 0]
                          [--windows 32 64 128 default] [--overlap 4] [--batch-size 4] [--repeats 1] [--gpu]
                          [--forward-only] [--out DIR]

Without ``--checkpoint`` a random-init encoder of ``--preset`` (its HR ratio set to the cube's) and a linear head
are made: the cost does not depend on the weights. Without ``--cube`` the demo cube of ``make demo`` is used.
``--gpu``: one GPU actor, bf16 autocast; the lines add ``km2_per_h`` (10 m pixels, 1e4 per km^2) and ``mfu``
(model FLOPs per core pixel from ``torch.utils.flop_counter`` on one window batch, times the pixel rate, over
the GPU's dense bf16 peak from bench/model.py's table). ``--forward-only`` skips the pipeline (e.g. ``huge``,
whose Ray actor would reload 2 B parameters per window setting).
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

TARGET_MS_PER_PX = 0.1  # on 2 CPU cores, tiny, the demo cube
TARGET_FLAT = 0.15
TARGET_RATIO = 0.9


def busy_share(seconds: float = 1.0) -> float | None:
    """The machine's CPU busy share (0..1) over ``seconds``, from /proc/stat (None where there is none)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except OSError:
        return None
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def settle(below: float = 0.15, limit_s: float = 30.0) -> float | None:
    """Wait until the machine is idle (busy share < ``below``), at most ``limit_s``: Ray's own processes work
    for several seconds after ``ray.init`` and after each dataset (on 2 cores a forward timed then ran 45 %
    slower than on an idle machine), and both sides of the comparison must start from the same quiet machine.
    Returns the last busy share measured."""
    t_end = time.monotonic() + limit_s
    share = busy_share()
    while share is not None and share >= below and time.monotonic() < t_end:
        share = busy_share()
    return share


def random_head(cube: str, out: Path, preset: str = "tiny") -> Path:
    """A random-init encoder of ``preset`` with the cube's HR ratio, and a linear head on it."""
    import torch

    from pipeline import zarr_cube
    from pipeline.finetune import save_head
    from skysense_core import build_model
    from skysense_core.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(preset, hr_ratio=zarr_cube.cube_config(zarr_cube.open_cube(cube)).hr_ratio)
    enc = save_checkpoint(out / f"encoder-{preset}.safetensors", model, meta={"what": "random init, bench/infer.py"})
    in_dim = model.cfg.fusion_dim * (2 if model.glbank is not None else 1)
    (out / f"head-{preset}").mkdir(parents=True, exist_ok=True)
    save_head(out / f"head-{preset}" / "head.safetensors", torch.nn.Conv2d(in_dim, 7, 1), kind="linear",
              num_classes=7, in_dim=in_dim, channels=model.cfg.uper_channels, encoder=enc, preset=model.cfg.name)
    return out / f"head-{preset}"


def window_inputs(spec, cube: str, tiles: list[str], device, tiles_per_call: int):
    """The model inputs of every window of ``tiles``, batched as ``TilePredictor.predict_rows`` batches them for
    an actor that gets ``tiles_per_call`` tiles per call: yields (input, kept part) one call's tiles at a time,
    so that only those are held in memory (all 25 demo tiles at once, ~2.5 GB, made the forward over them 2x
    slower on this machine)."""
    import numpy as np

    from pipeline.datasource import rows_to_input
    from pipeline.inference import read_tiles_local, window_batch

    reader = read_tiles_local(cube, tiles, modalities=list(spec.modalities))
    for c0 in range(0, len(tiles), tiles_per_call):
        rows = [{k: v[0] for k, v in next(reader).items()} for _ in range(c0, min(c0 + tiles_per_call, len(tiles)))]
        by_shape: dict[tuple, list] = {}
        for r in range(len(rows)):
            for y, x, h, w in spec.windows():
                kept = spec.kept(y, x, h, w)
                key = (h, w, None if kept is None else (kept[0].start, kept[0].stop, kept[1].start, kept[1].stop))
                by_shape.setdefault(key, []).append((r, y, x, kept))
        for (h, w, _), items in by_shape.items():
            for i in range(0, len(items), spec.batch_size):
                cols = [window_batch(rows[r], [(y, x)], (h, w), spec.hr_ratio, spec.modalities)
                        for r, y, x, _ in items[i:i + spec.batch_size]]
                x_in, _ = rows_to_input({k: np.concatenate([c[k] for c in cols]) for k in cols[0]}, spec.modalities)
                yield x_in.to(device), items[i][3]


def model_flops(pred, x, kept=None) -> int:
    """FLOPs of one ``_window_values`` call (matmul / conv / SDPA, as bench/model.py counts them)."""
    import torch

    from bench.model import flop_counter

    counter = flop_counter()
    with torch.inference_mode(), counter:
        pred._window_values(x, kept)
    return counter.get_total_flops()


def bare_forward(spec, cube: str, tiles: list[str], gpu: bool, tiles_per_call: int, flops: bool = False) -> dict:
    """The baseline: model + head over every window of ``tiles``, inputs prepared in memory first."""
    import torch

    from pipeline.inference import TilePredictor

    pred = TilePredictor(spec)  # the same model, head, device and torch threads as an actor
    out = {}
    seconds, calls, total = 0.0, 0, 0
    with torch.inference_mode():
        pred._window_values(*next(window_inputs(spec, cube, tiles[:1], pred.device, 1)))  # warm-up, not timed
        for x, kept in window_inputs(spec, cube, tiles, pred.device, tiles_per_call):
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()  # the clock runs over the model calls only
            pred._window_values(x, kept)
            if gpu:
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            calls += 1
            if flops:
                total += model_flops(pred, x, kept)
    pixels = len(tiles) * spec.core[1] ** 2
    if flops:
        out["flops_per_px"] = round(total / pixels)
    return {"forward_calls": calls, "pixels": pixels, "seconds": round(seconds, 3),
            "pixels_per_s": pixels / seconds, "ms_per_px": round(seconds / pixels * 1e3, 4), **out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cube", default=str(ROOT / "out/demo/cube.zarr"))
    p.add_argument("--checkpoint", default=None, help="fine-tune run dir or head.safetensors (default: random)")
    p.add_argument("--preset", default="tiny", help="random-init preset without --checkpoint")
    p.add_argument("--tiles", type=int, default=0, help="the first N done tiles of the cube (0: all)")
    p.add_argument("--windows", nargs="+", default=["32", "64", "128", "default"],
                   help="windows in S2 px; 'default' = the preset's default window")
    p.add_argument("--overlap", type=int, default=None, help="default: pipeline.inference.DEFAULT_OVERLAP")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--forward-only", action="store_true", help="only the bare forward (no Ray pipeline)")
    p.add_argument("--out", default=None, help="keep the products here (default: a temporary directory)")
    a = p.parse_args(argv)
    if not Path(a.cube).exists():
        print(f"error: cube {a.cube} does not exist (run `make demo` first, or pass --cube)", file=sys.stderr)
        return 2

    import ray
    import torch

    from bench.model import gpu_peak_bf16
    from pipeline.datasource import done_tiles
    from pipeline.inference import (
        InferenceConfig,
        actor_resources,
        computed_pixels_per_tile,
        plan_inference,
        run_inference,
        tiles_per_call,
    )
    from pipeline.ingest import init_ray

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="skysense-bench-infer-"))
    ckpt = a.checkpoint or str(random_head(a.cube, out, a.preset))
    tiles = sorted(done_tiles(a.cube))[: a.tiles or None]
    init_ray(None, log_to_driver=False)  # stdout: JSON lines only
    peak = gpu_peak_bf16(torch.cuda.get_device_name()) if a.gpu else None
    results = []
    for w in a.windows:
        window = None if w == "default" else int(w)
        base = InferenceConfig(cube=a.cube, checkpoint=ckpt, task="landcover", out=str(out / "bench.tif"),
                               window=window, overlap=a.overlap, batch_size=a.batch_size, gpu=a.gpu, tiles=tiles,
                               overwrite=True)
        _, per, threads = actor_resources(base)  # the actors' torch threads: the baseline gets the same
        plan = plan_inference(base, say=lambda s: None)
        spec = dataclasses.replace(plan.spec, threads=threads)
        common = {"bench": "infer", "preset": plan.preset, "window": spec.window, "window_arg": w,
                  "overlap": spec.overlap, "margin": spec.margin, "windows_per_tile": len(spec.windows()),
                  "computed_per_core": round(computed_pixels_per_tile(spec) / spec.core[1] ** 2, 3),
                  "tiles": len(tiles), "tile_px": spec.core[1], "batch_size": a.batch_size, "threads": threads,
                  "actor_cpus": per, "device": torch.cuda.get_device_name() if a.gpu else "cpu",
                  "cpus": ray.cluster_resources().get("CPU")}
        fwd, pipe, steady_list = [], [], []
        for r in range(a.repeats):
            settle()
            f = bare_forward(spec, a.cube, tiles, a.gpu, tiles_per_call(base), flops=a.gpu and r == 0)
            fwd.append(f["pixels_per_s"])
            line = {**common, "kind": "forward", "repeat": r, **f}
            if a.gpu:
                line["km2_per_h"] = round(f["pixels_per_s"] * 3600 / 1e4, 1)
                if peak and "flops_per_px" in f:
                    common["flops_per_px"] = f["flops_per_px"]
                if peak and "flops_per_px" in common:
                    line["mfu"] = round(common["flops_per_px"] * f["pixels_per_s"] / peak, 4)
            print(json.dumps(line), flush=True)
            if a.forward_only:
                continue
            cfg = dataclasses.replace(base, name=f"w{w}-run-{r}", work_dir=str(out))
            settle()
            cpu0 = time.process_time()
            res = run_inference(cfg, progress=lambda s: print(s, file=sys.stderr))
            driver_cpu = time.process_time() - cpu0
            if not res.complete:
                print(f"error: the pipeline left tiles undone: {res.failed}", file=sys.stderr)
                return 1
            sec = res.seconds
            steady = spec.core[1] ** 2 / sec["steady_per_tile"]
            pipe.append(res.pixels_per_s)
            steady_list.append(steady)
            line = {**common, "kind": "pipeline", "repeat": r, "pixels": len(tiles) * spec.core[1] ** 2,
                    "seconds": {k: round(v, 3) for k, v in sec.items()}, "pixels_per_s": res.pixels_per_s,
                    "ms_per_px": round(1e3 / res.pixels_per_s, 4), "steady_ms_per_px": round(1e3 / steady, 4),
                    "startup_s": round(sec["first_tile"] - sec["steady_per_tile"], 2),
                    "driver_cpu_s": round(driver_cpu, 2), "driver_cpu_share": round(driver_cpu / sec["total"], 3)}
            if a.gpu:
                line["km2_per_h"] = round(res.pixels_per_s * 3600 / 1e4, 1)
            print(json.dumps(line), flush=True)
        fm = statistics.median(fwd)
        rec = {**common, "kind": "window", "forward_ms_per_px": round(1e3 / fm, 4)}
        if pipe:
            pm = statistics.median(pipe)
            sm = statistics.median(steady_list)
            rec.update(pipeline_ms_per_px=round(1e3 / pm, 4), ratio=round(pm / fm, 3),
                       steady_ms_per_px=round(1e3 / sm, 4), steady_ratio=round(sm / fm, 3),
                       ratio_target=TARGET_RATIO, meets_ratio=pm / fm >= TARGET_RATIO)
        print(json.dumps(rec), flush=True)
        results.append(rec)
    key = "pipeline_ms_per_px" if not a.forward_only else "forward_ms_per_px"
    costs = [r[key] for r in results]
    med = statistics.median(costs)
    default = next((r for r in results if r["window_arg"] == "default"), results[-1])
    summary = {"bench": "infer", "kind": "result", "preset": default["preset"], "figure": key,
               "ms_per_px": {r["window_arg"]: r[key] for r in results},
               "default_window": default["window"], "default_ms_per_px": default[key],
               "target_ms_per_px": TARGET_MS_PER_PX if not a.gpu else None,
               "spread": round(max(abs(c / med - 1) for c in costs), 3), "flat_target": TARGET_FLAT,
               "flat": all(abs(c / med - 1) <= TARGET_FLAT for c in costs), "repeats": a.repeats}
    if not a.gpu:
        summary["meets_ms_per_px"] = default[key] <= TARGET_MS_PER_PX
    if pipe:
        summary["ratios"] = {r["window_arg"]: r["ratio"] for r in results}
        summary["meets_ratio"] = all(r["meets_ratio"] for r in results)
        summary["steady_ms_per_px"] = {r["window_arg"]: r["steady_ms_per_px"] for r in results}
        summary["steady_ratios"] = {r["window_arg"]: r["steady_ratio"] for r in results}
    if a.gpu:
        summary["km2_per_h"] = round(1e3 / default[key] * 3600 / 1e4, 1)
    print(json.dumps(summary), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
