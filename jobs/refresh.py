"""Refresh the crop or flood product: redo only the tiles that acquisitions new since the last run touch.

    python jobs/refresh.py --product crop|flood --catalog PATH_OR_URL --aoi GEOJSON_OR_BBOX --state STATE_DIR
                           [--publish STAC_API_URL] [--as-of DATE] [--checkpoint CKPT] [--support SUPPORT]
                           [--season-start DATE] [--baseline-days N] [--wait SECONDS] ...
    ray job submit --working-dir . -- python jobs/refresh.py ...

Reads the last version of STATE_DIR/<product> (which items it saw over each tile), searches the catalog for the
product's window ending at --as-of, re-ingests and re-predicts the tiles that new items touch, reuses the last
version's tiles for the rest, and commits STATE_DIR/<product>/<as-of>/<model-version>/ (COG, quicklook, STAC
item, version.json) before moving STATE_DIR/<product>/latest to it; the static STAC collection beside it lists
every version, and --publish POSTs the item to a STAC API with the Transactions extension. Layout and guarantees:
pipeline/refresh.py.

crop needs --checkpoint (a fine-tune run directory or its head.safetensors). flood without --checkpoint is the
per-tile Otsu threshold on Sentinel-1 VV; with a head, or an encoder and --support (few-shot), the model makes
the product and the Otsu baseline is kept beside it (otsu.tif).

Prints a JSON summary line. Exit codes: 0 a new version, nothing new ("up-to-date"), or another run holds the
lock ("busy", after --wait seconds); 1 tiles failed (their last prediction is kept when there is one; with
--allow-partial: 0), publishing failed (the next run retries), or the run failed (the previous version stays
latest); 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any cwd
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline import zarr_cube  # noqa: E402
from pipeline.grid import aoi_argv  # noqa: E402
from pipeline.refresh import PRODUCTS, RefreshConfig, cube_config_from_flags, run_refresh  # noqa: E402
from pipeline.stac import StacSearchError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--product", required=True, choices=PRODUCTS)
    p.add_argument("--catalog", required=True, help="STAC API URL, or a static catalog.json (or its directory)")
    p.add_argument("--aoi", required=True, help="GeoJSON file (lon/lat), or MINLON,MINLAT,MAXLON,MAXLAT")
    p.add_argument("--state", required=True, help="state directory: versions, latest, lock, collection.json")
    p.add_argument("--publish", default=None, help="STAC API URL with the Transactions extension to POST items to")
    p.add_argument("--as-of", type=date.fromisoformat, default=None,
                   help="last day of data used, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--checkpoint", default=None,
                   help="crop: fine-tune run dir or head.safetensors; flood: a head, or an encoder with --support")
    p.add_argument("--support", default=None, help="few-shot support tiles (see jobs/infer.py --help)")
    p.add_argument("--season-start", type=date.fromisoformat, default=None,
                   help="crop: first day of the season (default 1 January of the as-of year)")
    p.add_argument("--baseline-days", type=int, default=36,
                   help="flood: days before --as-of whose Sentinel-1 dates make the pre-event baseline")
    p.add_argument("--collections", nargs="+", default=None, help="default: every collection a provider maps")
    p.add_argument("--tile-px", type=int, default=None, help="tile side in 10 m px (default: jobs/ingest.py's)")
    p.add_argument("--halo-px", type=int, default=None)
    p.add_argument("--t-s2", type=int, default=None, help="Sentinel-2 dates per tile (default 8)")
    p.add_argument("--t-s1", type=int, default=None,
                   help="Sentinel-1 dates per tile (default 8; flood: enough for every date of the baseline window)")
    p.add_argument("--t-hr", type=int, default=None)
    p.add_argument("--hr-ratio", type=int, default=None)
    p.add_argument("--window", type=int, default=None, help="model inference window (see jobs/infer.py)")
    p.add_argument("--overlap", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gpu", action="store_true", help="one GPU per inference actor, bf16 autocast")
    p.add_argument("--num-actors", type=int, default=None)
    p.add_argument("--crs", default=None, help="product CRS (EPSG code or CRS string; default the AOI's UTM zone)")
    p.add_argument("--allow-href", action="append", default=[], metavar="DIR_OR_URL",
                   help="also read catalog hrefs under this directory or URL prefix (see jobs/ingest.py)")
    p.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for another run of the product to finish (default 0: exit at once)")
    p.add_argument("--allow-partial", action="store_true", help="exit 0 even when tiles failed")
    p.add_argument("--min-mapping-unit", type=float, default=0.0, metavar="M2",
                   help="the product's polygons (GeoParquet): patches under this many m² are merged into neighbours")
    p.add_argument("--keep-work", action="store_true", help="keep the run's cube and predictions after the commit")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster: an address, 'auto' or 'local'. Default: RAY_ADDRESS if set, else a local Ray")
    return p.parse_args(aoi_argv(sys.argv[1:] if argv is None else argv))


def main(argv=None) -> int:
    a = parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  (stdout holds the JSON summary only)
    try:
        cube = cube_config_from_flags(a.tile_px, a.halo_px, a.t_s2, a.t_s1, a.t_hr, a.hr_ratio)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = RefreshConfig(
        product=a.product, catalog=a.catalog, aoi=a.aoi, state=a.state, publish=a.publish, as_of=a.as_of,
        checkpoint=a.checkpoint, support=a.support, season_start=a.season_start, baseline_days=a.baseline_days,
        cube=cube, collections=a.collections, window=a.window, overlap=a.overlap, batch_size=a.batch_size,
        gpu=a.gpu, num_actors=a.num_actors, crs=a.crs, wait_s=a.wait, keep_work=a.keep_work,
        allow_hrefs=tuple(a.allow_href),
        ray_address=a.ray_address, min_mapping_unit_m2=a.min_mapping_unit,
    )
    if a.min_mapping_unit < 0:
        print(f"error: --min-mapping-unit must be >= 0 m², got {a.min_mapping_unit}", file=sys.stderr)
        return 2
    import ray

    ours = not ray.is_initialized()  # stop only a Ray this call started (never a caller's session)
    try:
        result = run_refresh(cfg, progress=log)
    except (ValueError, FileNotFoundError, StacSearchError, zarr_cube.CubeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the run failed: nothing was committed, the previous version stays latest
        print(f"error: refresh failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()
    print(json.dumps(result.summary(), default=str))
    if result.status == "failed":
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    if any(str(v).startswith("error") for v in result.published.values()):
        return 1
    if result.failed and not a.allow_partial:
        print(f"error: {len(result.failed)} tile(s) failed: " + "; ".join(
            f"{t}: {r}" for t, r in sorted(result.failed.items())[:3]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
