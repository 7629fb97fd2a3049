"""The main job, end to end on the embedded demo region (``make demo``).

Stages so far: build the demo region (a local static STAC catalog with S2, S1 and HR COGs and ground truth),
search it as the pipeline does, ingest it into a Zarr cube with Ray (out/demo/cube.zarr), and pretrain the
``tiny`` model on it with Ray Train (out/demo/runs/demo-tiny-stage1). Later stages (inference, mosaic) are
added here as they land.

    python jobs/demo.py --out out/demo [--size-km 5] [--seed 0] [--hr-ratio 8] [--force] [--pretrain-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any cwd
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


from pipeline import demo, stac  # noqa: E402
from pipeline.cube import CubeConfig  # noqa: E402
from pipeline.grid import load_aoi  # noqa: E402
from pipeline.ingest import cube_summary, run_ingest  # noqa: E402
from pipeline.training import PretrainJobConfig, run_pretraining  # noqa: E402


def build_region(out: Path, cfg: demo.DemoConfig, force: bool) -> Path:
    """The demo catalog under ``out/region``, regenerated only if missing or made with another config."""
    region = out / "region"
    catalog = region / "catalog.json"
    truth = region / "truth" / "truth.json"
    if catalog.exists() and truth.exists() and not force:
        made_with = json.loads(truth.read_text())["config"]
        if all(made_with.get(k) == v for k, v in asdict(cfg).items() if not isinstance(v, tuple)):
            print(f"demo region exists: {catalog} (use --force to rebuild)")
            return catalog
    return demo.generate(cfg, region)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/demo", type=Path)
    p.add_argument("--size-km", type=float, default=demo.DemoConfig.size_km)
    p.add_argument("--seed", type=int, default=demo.DemoConfig.seed)
    p.add_argument("--hr-ratio", type=int, default=demo.DemoConfig.hr_ratio)
    p.add_argument("--force", action="store_true", help="rebuild the demo region even if it exists")
    p.add_argument("--pretrain-steps", type=int, default=20,
                   help="stage-1 steps of the tiny preset on the demo cube (0 skips pretraining)")
    args = p.parse_args(argv)
    t0 = time.time()
    cfg = demo.DemoConfig(size_km=args.size_km, seed=args.seed, hr_ratio=args.hr_ratio)
    catalog = build_region(args.out, cfg, args.force)

    source = stac.open_source(catalog)
    bbox = list(demo.region_bbox(cfg))
    print(f"\nsearch {catalog}")
    print(f"  bbox {[round(v, 4) for v in bbox]}, datetime {cfg.year}, collections {source.collection_ids()}")
    items = stac.search(source, bbox=bbox, datetime=str(cfg.year))
    for line in stac.summarize(items):
        print("  " + line.line())
    clear = stac.search(
        source,
        collections=["sentinel-2-l2a"],
        bbox=bbox,
        datetime=f"{cfg.year}-04/{cfg.year}-09",
        query={"eo:cloud_cover": {"lt": 10}},
        allow_empty=True,
    )
    print(f"  sentinel-2 April-September with eo:cloud_cover < 10%: {len(clear)} items")

    # Ingest: the whole region and year into a Zarr v3 cube (re-runs skip finished tiles).
    cube = args.out / "cube.zarr"
    print(f"\ningest -> {cube}")
    cube_cfg = CubeConfig(hr_ratio=cfg.hr_ratio)
    report = run_ingest(str(catalog), load_aoi(bbox), date(cfg.year, 1, 1), date(cfg.year, 12, 31), cube, cube_cfg)
    print(cube_summary(cube))
    if not report.ok:
        return 1

    # Pretraining: SkySense stage 1 of the tiny preset on the cube with Ray Train (a re-run continues the run
    # and stops at the same step count, so it only re-exports the weights).
    run = None
    if args.pretrain_steps > 0:
        job = PretrainJobConfig(cube=str(cube), preset="tiny", stage=1, steps=args.pretrain_steps, batch_size=4,
                                workers=1, out=str(args.out / "runs"), name="demo-tiny-stage1",
                                checkpoint_every=max(args.pretrain_steps // 2, 1), warmup=2)
        print(f"\npretrain -> {job.run_dir}")
        run_pretraining(job)
        run = job.run_dir
    print(f"\ndemo done in {time.time() - t0:.1f} s: {len(items)} items in {catalog}, cube {cube}"
          + (f", pretrained weights {run / 'model.safetensors'}" if run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
