"""Benchmark: is the Ray Data -> Ray Train data path the bottleneck of pretraining?

Two runs of the same pretraining job (``pipeline.training.run_pretraining``, the same preset, stage, windows,
batch, workers and Ray resources) in the same process and the same Ray cluster, one after the other:

- ``memory``: the baseline. The first ``--steps`` per-worker batches of the job's ``train`` dataset are
  materialised on the driver first (``materialize_batches``: cube windows, and for stage 1 the multi-crop views
  made as the data workers make them), then the training loop cycles over them (``memory_batches=``): no Ray
  Data while it trains, only the loop's own cost.
- ``ray_data``: the job as it runs: windows read from the Zarr cube by the datasource's read tasks, views made
  by ``map_batches`` tasks on the CPU data workers, streamed to the Ray Train worker by ``get_dataset_shard``.

Throughput = samples / seconds over the steps after ``--skip`` warm-up steps, from the runs' ``metrics.csv``
(``step_s``: wall time between two optimiser steps as the loop sees it, including any wait for data).
``ratio`` = ray_data / memory samples/s; the target is >= 0.9. Prints one JSON line per run and a ``result``
line. With ``--repeats R`` the two runs alternate R times (memory, ray_data, memory, ...) and the result uses
the medians, which evens out a shared machine's drift.

    python bench/pretrain.py [--cube out/demo/cube.zarr] [--preset tiny] [--stage 1] [--steps 16] [--skip 3]
                             [--batch-size 4] [--workers 1] [--window 16] [--repeats 1] [--gpu] [--out DIR]

Without ``--cube`` the demo cube of ``make demo`` is used (run ``make demo`` first).
"""

from __future__ import annotations

import argparse
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


def throughput(metrics_csv: Path, skip: int) -> dict:
    """samples/s over the steps after ``skip`` from a run's ``metrics.csv``."""
    from pipeline.training import read_metrics

    rows = [r for r in read_metrics(metrics_csv) if r["step"] > skip]
    if not rows:
        raise ValueError(f"{metrics_csv}: no step after the {skip} warm-up steps")
    seconds = sum(r["step_s"] for r in rows)
    samples = sum(r["samples_per_s"] * r["step_s"] for r in rows)  # per-step samples = rate x time
    return {"timed_steps": len(rows), "samples": round(samples), "seconds": round(seconds, 3),
            "samples_per_s": samples / seconds, "median_step_s": statistics.median(r["step_s"] for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cube", default=str(ROOT / "out/demo/cube.zarr"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", type=int, default=1, choices=[1, 2])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the throughput")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--ray-address", default=None)
    a = p.parse_args(argv)
    if not Path(a.cube).exists():
        print(f"error: cube {a.cube} does not exist (run `make demo` first, or pass --cube)", file=sys.stderr)
        return 2
    if a.steps <= a.skip:
        print("error: --steps must exceed --skip", file=sys.stderr)
        return 2

    import ray

    from pipeline.ingest import init_ray
    from pipeline.training import PretrainJobConfig, materialize_batches, run_pretraining

    init_ray(a.ray_address, log_to_driver=False)  # stdout: JSON lines only
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="skysense-bench-pretrain-"))
    base = PretrainJobConfig(cube=a.cube, preset=a.preset, stage=a.stage, steps=a.steps, batch_size=a.batch_size,
                             workers=a.workers, gpu=a.gpu, out=str(out), window=a.window,
                             checkpoint_every=10 * a.steps)  # one checkpoint, at the end, in both runs
    quiet = lambda s: print(s, file=sys.stderr)  # noqa: E731
    t0 = time.perf_counter()
    # every worker cycles over its own share of the batches, as many as it takes steps
    batches = materialize_batches(base, a.steps * a.workers, a.ray_address)
    prep_s = time.perf_counter() - t0
    nbytes = sum(v.nbytes for b in batches for v in b.values())
    common = {"bench": "pretrain", "preset": a.preset, "stage": a.stage, "workers": a.workers,
              "batch_size": a.batch_size, "window": a.window, "steps": a.steps, "skip": a.skip,
              "device": "cuda" if a.gpu else "cpu", "cluster_cpus": ray.cluster_resources().get("CPU")}
    print(json.dumps({**common, "kind": "materialize", "batches": len(batches), "mib": round(nbytes / 2**20, 1),
                      "seconds": round(prep_s, 1)}), flush=True)
    rates: dict[str, list[float]] = {"memory": [], "ray_data": []}
    for rep in range(a.repeats):
        for feed in ("memory", "ray_data"):
            import dataclasses

            cfg = dataclasses.replace(base, name=f"{feed}-{rep}")
            t = time.perf_counter()
            run_pretraining(cfg, a.ray_address, progress=quiet,
                            memory_batches=batches if feed == "memory" else None)
            wall = time.perf_counter() - t
            tp = throughput(cfg.run_dir / "metrics.csv", a.skip)
            rates[feed].append(tp["samples_per_s"])
            print(json.dumps({**common, "kind": "run", "feed": feed, "repeat": rep, **tp,
                              "samples_per_s": round(tp["samples_per_s"], 4), "wall_s": round(wall, 1)}), flush=True)
    mem, rd = statistics.median(rates["memory"]), statistics.median(rates["ray_data"])
    ratio = rd / mem
    print(json.dumps({**common, "kind": "result", "memory_samples_per_s": round(mem, 4),
                      "ray_data_samples_per_s": round(rd, 4), "ratio": round(ratio, 3), "target": 0.9,
                      "meets_target": ratio >= 0.9, "repeats": a.repeats}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
