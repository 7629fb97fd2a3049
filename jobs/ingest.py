"""Ingest: a STAC search over an area and a season -> a Zarr v3 cube of co-registered S2 / S1 / HR tiles.

    python jobs/ingest.py --catalog PATH_OR_URL (--bbox MINLON MINLAT MAXLON MAXLAT | --aoi GEOJSON)
                          --start DATE --end DATE --out CUBE [--tile-px N] [--halo-px N] ...
    ray job submit --working-dir . -- python jobs/ingest.py ...

Tiles run as Ray tasks with fractional CPUs; a re-run skips done tiles; CUBE/manifest.json lists failed tiles
with reasons. Items of no known provider are read with the ``generic`` profile (bands from their own metadata).
Exit codes: 0 all tiles written, 1 some tiles failed (the others are written) or no tile got a valid date, 2 bad
input (including a search whose items yield no band of any requested modality), 3 another ingest writes the
same cube (after ``--wait`` seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any cwd
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline import zarr_cube  # noqa: E402
from pipeline.cube import CubeConfig  # noqa: E402
from pipeline.grid import BBOX_HELP, TileGrid, aoi_argv, load_aoi, parse_aoi, parse_bbox  # noqa: E402
from pipeline.ingest import IngestBusy, cube_summary, run_ingest  # noqa: E402
from pipeline.providers import PROFILES  # noqa: E402
from pipeline.stac import StacSearchError  # noqa: E402
from pipeline.storage import StorageError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", required=True, help="STAC API URL, or a static catalog.json (or its directory)")
    aoi = p.add_mutually_exclusive_group(required=True)
    aoi.add_argument("--bbox", nargs="+", metavar="COORD", help=BBOX_HELP)
    aoi.add_argument("--aoi", help="GeoJSON file (Geometry, Feature or FeatureCollection in lon/lat), or "
                     "MINLON,MINLAT,MAXLON,MAXLAT")
    p.add_argument("--start", required=True, type=date.fromisoformat, help="first day of the season, YYYY-MM-DD")
    p.add_argument("--end", required=True, type=date.fromisoformat, help="last day of the season, YYYY-MM-DD")
    p.add_argument("--out", required=True, help="the cube: a Zarr v3 store directory, or an s3://BUCKET/PREFIX URL "
                   "(credentials and AWS_ENDPOINT_URL from the environment)")
    p.add_argument("--allow-href", action="append", default=[], metavar="DIR_OR_URL",
                   help="also read hrefs under this directory or URL prefix (repeatable); by default only files in "
                   "the catalog's own directory tree, public http(s) and the object stores a provider names")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it is a directory that is not a cube (refused without this flag)")
    p.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for another ingest into the same cube to finish (default: exit 3 at once)")
    d = CubeConfig()
    p.add_argument("--tile-px", type=int, default=d.grid.tile_px, help="tile side in 10 m pixels")
    p.add_argument("--halo-px", type=int, default=d.grid.halo_px, help="halo on each side, in 10 m pixels")
    p.add_argument("--t-s2", type=int, default=d.t_s2, help="Sentinel-2 dates per tile")
    p.add_argument("--t-s1", type=int, default=d.t_s1, help="Sentinel-1 dates per tile")
    p.add_argument("--t-hr", type=int, default=d.t_hr, help="high-resolution dates per tile")
    p.add_argument("--hr-ratio", type=int, default=d.hr_ratio, help="HR pixels per 10 m pixel")
    p.add_argument("--collections", nargs="+", help="default: every collection a provider profile maps")
    p.add_argument("--provider", default="auto", choices=["auto", *PROFILES])
    p.add_argument(
        "--cpus-per-tile",
        type=float,
        default=0.9,
        help="Ray CPUs per tile task. Fractional, so small tasks of other stages still fit; a tile is CPU-bound "
        "(decompression, warping), so one per core is faster than two (bench/ingest.py)",
    )
    p.add_argument(
        "--block-tiles",
        type=int,
        default=4,
        help="one task reads a block of up to N x N adjacent tiles, each band and date once for the block "
        "(neighbouring tiles share source COG blocks); 1 reads tile by tile. Reduced when a block's reads would "
        "pass 1 GiB or when there would be fewer than two blocks per CPU (default: 4)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster: an address, 'auto' (the cluster `ray start` runs on this machine) or 'local' "
        "(a fresh local Ray). Default: RAY_ADDRESS if set (ray job submit sets it), else 'local'",
    )
    args = p.parse_args(aoi_argv(sys.argv[1:] if argv is None else argv))
    if args.end < args.start:
        p.error(f"--end {args.end} is before --start {args.start}")
    for flag, value, low in (("--tile-px", args.tile_px, 4), ("--halo-px", args.halo_px, 0), ("--t-s2", args.t_s2, 0),
                             ("--t-s1", args.t_s1, 0), ("--t-hr", args.t_hr, 0), ("--hr-ratio", args.hr_ratio, 1)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if args.cpus_per_tile <= 0:
        p.error(f"--cpus-per-tile must be positive, got {args.cpus_per_tile}")
    if args.block_tiles < 1:
        p.error(f"--block-tiles must be at least 1, got {args.block_tiles}")
    try:
        args.bbox = parse_bbox(args.bbox)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        aoi = load_aoi(bbox=args.bbox) if args.bbox else parse_aoi(args.aoi)
        cfg = CubeConfig(
            grid=TileGrid(args.tile_px, args.halo_px),
            t_s2=args.t_s2,
            t_s1=args.t_s1,
            t_hr=args.t_hr,
            hr_ratio=args.hr_ratio,
            provider=args.provider,
        )
        report = run_ingest(
            args.catalog,
            aoi,
            args.start,
            args.end,
            args.out,
            cfg,
            collections=args.collections,
            ray_address=args.ray_address,
            cpus_per_tile=args.cpus_per_tile,
            block_tiles=args.block_tiles,
            overwrite=args.overwrite,
            wait_s=args.wait,
            allow_hrefs=args.allow_href,
        )
    except IngestBusy as e:
        print(f"busy: {e}", file=sys.stderr)
        return 3
    except (StacSearchError, ValueError, zarr_cube.CubeError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(cube_summary(args.out))
    if report.empty:
        print(f"error: the cube {args.out} has no valid date in any tile (see the warnings above)", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
