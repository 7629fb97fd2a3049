"""Benchmark: generating the embedded demo region (target: well under a minute at the default size).

Prints one JSON object per measurement. The baseline (one process) is measured side by side in the same run,
so the ratio is meaningful on any machine.

    python bench/demo_region.py [--size-km 5] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo import DemoConfig, generate  # noqa: E402


def run(cfg: DemoConfig, workers: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    try:
        t0 = time.perf_counter()
        generate(cfg, out, progress=False, workers=workers)
        seconds = time.perf_counter() - t0
        files = [p for p in out.rglob("*") if p.is_file()]
        return {
            "seconds": round(seconds, 2),
            "files": len(files),
            "megabytes": round(sum(p.stat().st_size for p in files) / 2**20, 1),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size-km", type=float, default=DemoConfig.size_km)
    p.add_argument("--hr-ratio", type=int, default=DemoConfig.hr_ratio)
    args = p.parse_args()
    cfg = DemoConfig(size_km=args.size_km, hr_ratio=args.hr_ratio)
    cores = os.cpu_count() or 1
    base = run(cfg, workers=1)
    par = run(cfg, workers=min(4, cores))
    for name, r, w in (("demo_generate_1_process", base, 1), ("demo_generate_parallel", par, min(4, cores))):
        print(
            json.dumps(
                {"bench": name, "size_km": cfg.size_km, "hr_ratio": cfg.hr_ratio, "workers": w, "cores": cores, **r}
            )
        )
    print(
        json.dumps(
            {
                "bench": "demo_generate_speedup",
                "ratio_parallel_vs_1_process": round(base["seconds"] / par["seconds"], 2),
                "target_seconds": 60,
                "parallel_under_target": par["seconds"] < 60,
                "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 0),
                "peak_rss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
