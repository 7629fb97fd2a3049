"""The main job, end to end on the embedded demo region (``make demo``).

Today: build the demo region (a local static STAC catalog with S2, S1 and HR COGs and ground truth) and
search it the way the pipeline will: one season of each modality over the region. Later stages (ingest,
pretraining, inference, mosaic) are added here as they land.

    python jobs/demo.py --out out/demo [--size-km 5] [--seed 0] [--hr-ratio 8] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any cwd

from pipeline import demo, stac  # noqa: E402


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
    print(f"\ndemo done in {time.time() - t0:.1f} s: {len(items)} items in {catalog}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
