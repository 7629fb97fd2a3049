"""Benchmark: what planning costs as the tile count grows to a country (``--plan-only``).

For each N of ``--sizes`` a square AOI holding about N tiles (``--tile-px`` S2 px cores, 10 m) is placed at
``--center`` (default central France, so that a large AOI spans two UTM zones as real ones do), and the steps an
ingest plans with before any tile is read are timed, each N in a fresh process (its own peak memory):

- ``tiles``: ``pipeline.grid.tiles_for_aoi`` (the AOI cut into the tile grid, zone by zone);
- ``assign``: ``pipeline.ingest.assign_items``, every tile matched to the items over it, against a synthetic
  search result: one footprint per 110 km MGRS-like square over the AOI and ``--dates`` acquisitions each (the
  footprints are what the matching reads; no STAC server is involved);
- ``index``: ``pipeline.zarr_cube.create_or_open``, the cube's root and tile index written (a real Zarr store in
  a temporary directory);
- ``done_scan_rerun``: the check of every tile's done marker that ``jobs/ingest.py`` makes when it resumes an
  existing cube (threads; a cube it has just created is not scanned);
- ``read_index``: the tile index read back as inference plans from it (``pipeline.datasource.done_tiles`` and
  ``zarr_cube.tiles_of``).

One JSON line per N: the tile count, seconds per step and in all (``total_s``: a first run; ``rerun_s`` adds the
re-run's marker scan), microseconds per tile, the marginal microseconds per tile from the previous N (what one
more tile costs, without the fixed costs that dominate small N), and the process's peak resident memory
(``ru_maxrss``); then a result line with the targets: planning 100,000 tiles in <= 60 s and <= 1 GB, and the time
per tile flat within +-25 % from 100 to the largest N (the average), and the marginal figure from 1,000 on (below,
the step adds too few tiles to measure one tile's cost).

    python bench/scale.py --plan-only [--sizes 10 100 1000 10000 100000] [--tile-px 128] [--dates 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_PLAN_S = 60.0  # 100,000 tiles
TARGET_PLAN_MB = 1024.0
TARGET_FLAT = 0.25
MGRS_M = 110_000.0  # side of a Sentinel-2 MGRS tile footprint


class _Footprint:
    """What ``assign_items`` reads of a STAC item: its geometry."""

    def __init__(self, geometry: dict):
        self.geometry = geometry


def square_aoi(n_tiles: int, tile_m: float, center: tuple[float, float]):
    """A lon/lat square of about ``n_tiles`` tiles of ``tile_m`` metres around ``center`` (lon, lat)."""
    import shapely.geometry

    side_m = math.sqrt(n_tiles) * tile_m
    lon, lat = center
    dlat = side_m / 111_320.0
    dlon = side_m / (111_320.0 * math.cos(math.radians(lat)))
    return shapely.geometry.box(lon - dlon / 2, lat - dlat / 2, lon + dlon / 2, lat + dlat / 2)


def synthetic_items(aoi, dates: int) -> list[_Footprint]:
    """Footprints of a search over ``aoi``: 110 km squares (in degrees at the AOI's latitude) covering it,
    overlapping by 10 km as MGRS tiles do, ``dates`` items each."""
    import shapely.geometry

    x0, y0, x1, y1 = aoi.bounds
    lat = (y0 + y1) / 2
    step_lat, side_lat = 100_000 / 111_320.0, MGRS_M / 111_320.0
    k = 111_320.0 * math.cos(math.radians(lat))
    step_lon, side_lon = 100_000 / k, MGRS_M / k
    out = []
    for i in range(math.ceil((x1 - x0) / step_lon) + 1):
        for j in range(math.ceil((y1 - y0) / step_lat) + 1):
            box = shapely.geometry.box(x0 + i * step_lon, y0 + j * step_lat, x0 + i * step_lon + side_lon,
                                       y0 + j * step_lat + side_lat)
            out += [_Footprint(shapely.geometry.mapping(box))] * dates
    return out


def plan_once(n: int, tile_px: int, dates: int, center: tuple[float, float]) -> dict:
    """Every planning step for an AOI of about ``n`` tiles, timed (module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import zarr_cube
    from pipeline.cube import CubeConfig
    from pipeline.datasource import done_tiles
    from pipeline.grid import TileGrid, tiles_for_aoi
    from pipeline.ingest import assign_items

    cfg = CubeConfig(grid=TileGrid(tile_px, 16), t_s2=10, t_s1=5, t_hr=1, hr_ratio=8)
    aoi = square_aoi(n, cfg.grid.tile_m, center)
    sec = {}
    t = time.perf_counter()
    tiles = tiles_for_aoi(aoi, cfg.grid)
    sec["tiles"] = time.perf_counter() - t
    items = synthetic_items(aoi, dates)
    t = time.perf_counter()
    assignment = assign_items(tiles, items)
    sec["assign"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="skysense-bench-scale-") as tmp:
        cube = Path(tmp) / "cube.zarr"
        t = time.perf_counter()
        zarr_cube.create_or_open(cube, cfg, tiles, {"start": "2024-01-01", "end": "2024-12-31"})
        sec["index"] = time.perf_counter() - t
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            done = sum(pool.map(lambda tile: zarr_cube.is_done(cube, tile.id), tiles))
        sec["done_scan_rerun"] = time.perf_counter() - t
        t = time.perf_counter()
        listed = done_tiles(cube)
        back = zarr_cube.tiles_of(zarr_cube.open_cube(cube))
        sec["read_index"] = time.perf_counter() - t
    assert done == 0 and not listed and len(back) == len(tiles)
    total = sum(v for k, v in sec.items() if k != "done_scan_rerun")
    return {"bench": "scale", "kind": "plan", "n_target": n, "tiles": len(tiles), "items": len(items),
            "items_per_tile": round(sum(map(len, assignment.values())) / max(len(tiles), 1), 1),
            "seconds": {k: round(v, 3) for k, v in sec.items()}, "total_s": round(total, 3),
            "rerun_s": round(total + sec["done_scan_rerun"], 3),
            "us_per_tile": round(total / max(len(tiles), 1) * 1e6, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan-only", action="store_true", help="time planning only (the only mode so far)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000, 100000])
    p.add_argument("--tile-px", type=int, default=128)
    p.add_argument("--dates", type=int, default=10, help="acquisitions per footprint in the synthetic search")
    p.add_argument("--center", type=float, nargs=2, default=[3.0, 46.5], metavar=("LON", "LAT"))
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # one size, in this process
    a = p.parse_args(argv)
    if a.one is not None:
        print(json.dumps(plan_once(a.one, a.tile_px, a.dates, tuple(a.center))), flush=True)
        return 0
    if not a.plan_only:
        print("error: only --plan-only is implemented: the timed plan -> infer -> mosaic over synthetic cubes is "
              "not built yet", file=sys.stderr)
        return 2
    lines: list[dict] = []
    for n in a.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--tile-px", str(a.tile_px), "--dates", str(a.dates),
               "--center", *map(str, a.center)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        line = json.loads(r.stdout.strip().splitlines()[-1])
        if lines and line["tiles"] > lines[-1]["tiles"]:
            line["marginal_us_per_tile"] = round((line["total_s"] - lines[-1]["total_s"])
                                                 / (line["tiles"] - lines[-1]["tiles"]) * 1e6, 1)
        print(json.dumps(line), flush=True)
        lines.append(line)
    largest = max(lines, key=lambda r: r["tiles"])
    def spread(costs):
        med = sorted(costs)[len(costs) // 2] if costs else None
        return round(max(abs(c / med - 1) for c in costs), 3) if costs else None

    avg = spread([r["us_per_tile"] for r in lines if r["tiles"] >= 100])
    # the marginal cost is measurable above the timer's noise once the step adds ~1000 tiles
    marg = spread([r["marginal_us_per_tile"] for r in lines if r["tiles"] >= 1000 and "marginal_us_per_tile" in r])
    res = {"bench": "scale", "kind": "result", "mode": "plan", "largest_tiles": largest["tiles"],
           "largest_s": largest["total_s"], "largest_peak_rss_mb": largest["peak_rss_mb"],
           "target_s": TARGET_PLAN_S, "target_mb": TARGET_PLAN_MB, "us_per_tile_spread_from_100": avg,
           "marginal_spread_from_1000": marg, "flat_target": TARGET_FLAT,
           "flat": avg is not None and avg <= TARGET_FLAT,
           "flat_marginal": marg is not None and marg <= TARGET_FLAT}
    if largest["tiles"] >= 100_000:
        res["meets_time"] = largest["total_s"] <= TARGET_PLAN_S
        res["meets_memory"] = largest["peak_rss_mb"] <= TARGET_PLAN_MB
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
