"""Benchmark: what a run costs per tile as the tile count grows: plan -> infer -> mosaic at 10 .. 10,000 tiles,
planning alone up to a country (``--plan-only``), and the refresh state of one version (``--state``).

Without a mode flag, for each N of ``--sizes`` (default 10 100 1000 10000), in a fresh process: the planning
steps below for the AOI of N tiles (``plan``); a synthetic cube of those tiles (``--tile-px`` 16 px cores, 4 px
halo, 3 S2 / 2 S1 / 1 HR dates, HR ratio 4), random values written by the ingest's own writer
(``zarr_cube.write_tile`` in two processes, untimed: ``make_cube_s``); then ``pipeline.inference.run_inference``
with a random-init tiny encoder and linear head (the cost does not depend on the weights) as ``jobs/infer.py``
runs it on a local Ray, its own ``plan``, ``pipeline`` and ``mosaic`` seconds (``infer`` = its plan + pipeline;
``mosaic`` = the product, one COG or COG parts past ``part_px``). One JSON line per N with the seconds, the
milliseconds per tile of each stage and the driver's peak resident memory; ``infer_steady_ms_per_tile``: the
inference actors' seconds per tile after their first (``InferenceResult.seconds["steady_per_tile"]``, from the
tiles' end times: the stage without its ~5 s start-up, which the average of a small N carries). The result line
gives the spread of each stage's cost per tile from 100 tiles on (target: within +-25 % of the median; the
judgement ``flat`` is on these averages), the steady inference figure's spread beside it, and the driver's memory
per 1,000 tiles (slope of the peaks). Ray's start-up is timed apart (``ray_start``): a fixed cost, not a per-tile one.
``SKYSENSE_BENCH_TMP`` places the cubes (10,000 tiles: ~1 GB).

    python bench/scale.py [--sizes 10 100 1000 10000] [--tile-px 16]

Planning (``--plan-only``):

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

``--state``: the refresh state of one flood version with every tile refreshed (:func:`state_once`), per N: its
size, write and read seconds as ``version.json`` held it before (every tile's record, rewritten whole) and as
``tiles.parquet`` beside a small ``version.json`` now; ``--dates`` sets the item ids seen per tile (10: ~12 ids,
a flood window; 50: ~60, a crop season of Sentinel-2 and Sentinel-1).

    python bench/scale.py --state --sizes 1000 100000 [--dates 10]
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
    """What ``assign_items`` reads of a STAC item: its geometry (and, for the refresh state, its id)."""

    def __init__(self, geometry: dict, id: str = ""):
        self.geometry = geometry
        self.id = id


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
            geom = shapely.geometry.mapping(box)
            # Planetary Computer's Sentinel-2 id form (55 characters), one per acquisition date
            out += [_Footprint(geom, f"S2B_MSIL2A_2024{1 + d // 28:02d}{1 + d % 28:02d}T103629_R008_T31U{i:02d}{j:02d}"
                                     f"_2024{1 + d // 28:02d}{1 + d % 28:02d}T171512") for d in range(dates)]
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


def synthetic_sample(tile, cfg, rng):
    """A tile sample of random but plausible values (every pixel valid, every date used), the shape ``cfg`` asks:
    what the model reads costs the same whatever the values."""
    from datetime import date, timedelta

    import numpy as np

    from pipeline import bands as B
    from pipeline.cube import ModalityStack, TileSample

    n, nh = tile.shape()[0], tile.shape(cfg.hr_ratio)[0]

    def stack(name, t, bands, size, data, extra=None):
        dates = [date(2024, 4, 1) + timedelta(days=12 * k) for k in range(t)]
        return ModalityStack(name, data, np.ones((t, size, size), np.uint8), dates, np.ones(t, bool),
                             [[f"{name}_{d.isoformat()}"] for d in dates], True, extra or {})

    s2 = stack(B.S2, cfg.t_s2, len(B.S2_BANDS), n,
               rng.integers(300, 4000, (cfg.t_s2, len(B.S2_BANDS), n, n), dtype=np.uint16),
               {"scl": np.full((cfg.t_s2, n, n), 4, np.uint8)})
    s1 = stack(B.S1, cfg.t_s1, len(B.S1_BANDS), n,
               rng.uniform(-22, -6, (cfg.t_s1, len(B.S1_BANDS), n, n)).astype(np.float32))
    hr = stack(B.HR, cfg.t_hr, len(B.HR_BANDS), nh, rng.integers(0, 255, (cfg.t_hr, len(B.HR_BANDS), nh, nh),
                                                                     dtype=np.uint8))
    return TileSample(tile, s2, s1, hr, [])


def _write_samples(args) -> dict:
    """Worker of :func:`synthetic_cube`: write the samples of ``ids`` with ``pipeline.zarr_cube.write_tile``."""
    cube, cfg, ids, seed = args
    import numpy as np

    from pipeline import zarr_cube
    from pipeline.grid import parse_tile_id

    rng = np.random.default_rng(seed)
    stats = []
    for t in ids:
        sample = synthetic_sample(parse_tile_id(t, cfg.grid), cfg, rng)
        zarr_cube.write_tile(cube, sample, cfg)
        stats.append(sample.stats)
    return {"stats": stats}


def synthetic_cube(cube: Path, n: int, tile_px: int, center: tuple[float, float], workers: int = 2):
    """A cube of about ``n`` tiles of synthetic samples written by the ingest's own writer
    (``zarr_cube.create_or_open``, ``write_tile`` in ``workers`` processes, ``finalize``); its tile ids."""
    from concurrent.futures import ProcessPoolExecutor

    from pipeline import zarr_cube
    from pipeline.grid import tiles_for_aoi

    cfg = pipeline_cube_config(tile_px)
    tiles = tiles_for_aoi(square_aoi(n, cfg.grid.tile_m, center), cfg.grid)
    zarr_cube.create_or_open(cube, cfg, tiles, {"start": "2024-04-01", "end": "2024-09-30"})
    ids = [t.id for t in tiles]
    chunks = [ids[i::workers * 4] for i in range(workers * 4)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_write_samples, [(cube, cfg, c, k) for k, c in enumerate(chunks)]))
    stats = zarr_cube.reduce_stats(s for p in parts for s in p["stats"])
    zarr_cube.finalize(cube, dict.fromkeys(ids, zarr_cube.DONE), stats, {"synthetic": "bench/scale.py"})
    return ids


def pipeline_cube_config(tile_px: int):
    """The cube of the plan -> infer -> mosaic runs: small tiles, few dates, so that 10,000 fit on a laptop's
    disk and predict in minutes (the costs measured are per tile)."""
    from pipeline.cube import CubeConfig
    from pipeline.grid import TileGrid

    return CubeConfig(grid=TileGrid(tile_px, 4), t_s2=3, t_s1=2, t_hr=1, hr_ratio=4)


def pipeline_once(n: int, tile_px: int, dates: int, center: tuple[float, float]) -> dict:
    """Plan, infer and mosaic about ``n`` tiles (module docstring), timed stage by stage in this process."""
    import ray

    sys.path.insert(0, str(ROOT / "bench"))
    from infer import random_head

    from pipeline.inference import InferenceConfig, run_inference
    from pipeline.ingest import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out: dict = {"bench": "scale", "kind": "pipeline", "n_target": n}
    plan = plan_once(n, tile_px, dates, center)
    out["tiles"] = plan["tiles"]
    sec = {"plan": plan["total_s"]}
    with tempfile.TemporaryDirectory(prefix="skysense-bench-scale-", dir=os.environ.get("SKYSENSE_BENCH_TMP")) as tmp:
        cube = Path(tmp) / "cube.zarr"
        t = time.perf_counter()
        ids = synthetic_cube(cube, n, tile_px, center)
        out["make_cube_s"] = round(time.perf_counter() - t, 2)  # not a pipeline stage: the cube's synthetic input
        assert len(ids) == plan["tiles"]
        head = random_head(str(cube), Path(tmp) / "model")
        t = time.perf_counter()
        init_ray(None, log_to_driver=False)
        sec["ray_start"] = time.perf_counter() - t
        res = run_inference(InferenceConfig(cube=str(cube), checkpoint=str(head), task="landcover",
                                            out=str(Path(tmp) / "product" / "landcover.tif")), progress=None)
        assert res.complete and len(res.done) == len(ids), res.failed
        for k in ("plan", "pipeline", "mosaic"):
            sec[f"infer_{k}"] = res.seconds.get(k, 0.0)
        steady = res.seconds.get("steady_per_tile")  # the actors' rate after their first tile (their own clocks)
        out["product_parts"] = len(list((Path(tmp) / "product").glob("*.tif")))
        ray.shutdown()
    out["seconds"] = {k: round(v, 3) for k, v in sec.items()}
    per = {"plan": sec["plan"], "infer": sec["infer_plan"] + sec["infer_pipeline"], "mosaic": sec["infer_mosaic"]}
    out["ms_per_tile"] = {k: round(v / len(ids) * 1e3, 3) for k, v in per.items()}
    out["ms_per_tile"]["total"] = round(sum(per.values()) / len(ids) * 1e3, 3)
    if steady is not None:  # beside the average: the same stage without its fixed start-up
        out["infer_steady_ms_per_tile"] = round(steady * 1e3, 3)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def state_once(n: int, tile_px: int, dates: int, center: tuple[float, float]) -> dict:
    """The refresh state of one flood version over an AOI of about ``n`` tiles, every tile refreshed (the largest
    version), written and read back two ways: as ``version.json`` held every tile's record before (the
    baseline, rebuilt here with ``json`` exactly as ``pipeline.refresh`` wrote it) and as it is now
    (``pipeline.refresh.write_tile_state``: ``tiles.parquet`` beside a small ``version.json``, read back by
    ``read_version``)."""
    from pipeline import refresh
    from pipeline.cube import CubeConfig
    from pipeline.grid import TileGrid, tiles_for_aoi
    from pipeline.ingest import assign_items

    cfg = CubeConfig(grid=TileGrid(tile_px, 16), t_s2=10, t_s1=5, t_hr=1, hr_ratio=8)
    aoi = square_aoi(n, cfg.grid.tile_m, center)
    tiles = tiles_for_aoi(aoi, cfg.grid)
    items = synthetic_items(aoi, dates)
    seen = {t: sorted(items[i].id for i in idx) for t, idx in assign_items(tiles, items).items()}
    rel = "2024-10-22/tiny-head-0123456789"
    # what a flood version records per tile (pipeline.refresh: otsu_tile's figures)
    tiles_doc = {t: {"seen": ids, "status": "done", "made_by": rel, "threshold_db": -17.25,
                     "threshold_source": "tile", "event_date": "2024-10-21",
                     "baseline_dates": ["2024-10-03", "2024-10-09", "2024-10-15"], "seconds": 1.37}
                 for t, ids in seen.items()}
    affected = sorted(tiles_doc)
    version = {"format": refresh.FORMAT, "product": "flood", "version": rel, "as_of": "2024-10-22",
               "model_version": "tiny-head-0123456789", "inputs_digest": "0" * 64, "previous": None,
               "item": f"{rel}/flood.json", "cube": {"grid": {"tile_px": tile_px, "halo_px": 16}},
               "aoi": aoi.__geo_interface__, "window": ["2024-10-01", "2024-10-22"], "collections": ["s2", "s1"]}
    out: dict = {"bench": "scale", "kind": "state", "n_target": n, "tiles": len(tiles),
                 "ids_per_tile": round(sum(map(len, seen.values())) / max(len(seen), 1), 1),
                 "distinct_ids": len({i for ids in seen.values() for i in ids})}
    with tempfile.TemporaryDirectory(prefix="skysense-bench-state-") as tmp:
        before, after = Path(tmp) / "before", Path(tmp) / "after"
        before.mkdir(), after.mkdir()
        from pipeline.tile_table import read_records, write_records

        read_records(write_records(Path(tmp) / "warm.parquet", {"t": {"seen": ["a"]}}))  # pyarrow imported, as json is
        t = time.perf_counter()
        refresh._atomic_json(before / refresh.VERSION_JSON, {**version, "affected": affected, "reused": [],
                                                             "failed": {}, "tiles": tiles_doc})
        out["before_write_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        back = json.loads((before / refresh.VERSION_JSON).read_text())["tiles"]
        out["before_read_s"] = round(time.perf_counter() - t, 3)
        out["before_mib"] = round((before / refresh.VERSION_JSON).stat().st_size / 2**20, 2)
        assert back == tiles_doc
        t = time.perf_counter()
        refresh.write_tile_state(after, tiles_doc, affected, [])
        refresh._atomic_json(after / refresh.VERSION_JSON, {**version, "tiles_table": refresh.TILES_TABLE,
                                                            "counts": {"tiles": len(tiles_doc)}})
        out["after_write_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        back = refresh.read_version(after)["tiles"]
        out["after_read_s"] = round(time.perf_counter() - t, 3)
        assert back == tiles_doc
        out["after_table_mib"] = round((after / refresh.TILES_TABLE).stat().st_size / 2**20, 2)
        out["after_version_json_kib"] = round((after / refresh.VERSION_JSON).stat().st_size / 2**10, 1)
        out["after_mib"] = round(sum(p.stat().st_size for p in after.iterdir()) / 2**20, 2)
    out["size_ratio_after_over_before"] = round(out["after_mib"] / out["before_mib"], 4)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _spread(costs: list[float]) -> float | None:
    """The largest relative distance of ``costs`` from their median."""
    if not costs:
        return None
    med = sorted(costs)[len(costs) // 2]
    return round(max(abs(c / med - 1) for c in costs), 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan-only", action="store_true", help="time planning only")
    p.add_argument("--state", action="store_true",
                   help="measure the refresh state of one version (size, write and read seconds), before and after "
                        "the per-tile table, instead of planning")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="tile counts (default 10 .. 100000 planning, 10 .. 10000 the pipeline, 100000 the state)")
    p.add_argument("--tile-px", type=int, default=None, help="tile core, S2 px (default 128; the pipeline: 16)")
    p.add_argument("--dates", type=int, default=10, help="acquisitions per footprint in the synthetic search")
    p.add_argument("--center", type=float, nargs=2, default=[3.0, 46.5], metavar=("LON", "LAT"))
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # one size, in this process
    a = p.parse_args(argv)
    mode = "state" if a.state else "plan" if a.plan_only else "pipeline"
    a.tile_px = a.tile_px or (16 if mode == "pipeline" else 128)
    a.sizes = a.sizes or {"plan": [10, 100, 1000, 10000, 100000], "pipeline": [10, 100, 1000, 10000],
                          "state": [100000]}[mode]
    once = {"state": state_once, "plan": plan_once, "pipeline": pipeline_once}[mode]
    if a.one is not None:
        print(json.dumps(once(a.one, a.tile_px, a.dates, tuple(a.center))), flush=True)
        return 0
    extra = {"state": ["--state"], "plan": ["--plan-only"], "pipeline": []}[mode]
    lines: list[dict] = []
    for n in a.sizes:
        line = _in_subprocess(n, a, extra)
        if line is None:
            return 1
        if mode == "plan" and lines and line["tiles"] > lines[-1]["tiles"]:
            line["marginal_us_per_tile"] = round((line["total_s"] - lines[-1]["total_s"])
                                                 / (line["tiles"] - lines[-1]["tiles"]) * 1e6, 1)
        if mode == "pipeline" and lines and line["tiles"] > lines[-1]["tiles"]:
            # what one more tile costs, without the fixed costs (actor start-up, model loading) of every run
            prev, dn = lines[-1], line["tiles"] - lines[-1]["tiles"]
            line["marginal_ms_per_tile"] = {k: round((line["ms_per_tile"][k] * line["tiles"] - prev["ms_per_tile"][k]
                                                      * prev["tiles"]) / dn, 3) for k in line["ms_per_tile"]}
        print(json.dumps(line), flush=True)
        lines.append(line)
    if mode == "state":
        return 0
    largest, smallest = max(lines, key=lambda r: r["tiles"]), min(lines, key=lambda r: r["tiles"])
    # driver memory that grows with the tile count: the peaks' slope, per 1,000 tiles
    mb_per_1000 = (round((largest["peak_rss_mb"] - smallest["peak_rss_mb"]) / (largest["tiles"] - smallest["tiles"])
                         * 1000, 1) if largest["tiles"] > smallest["tiles"] else None)
    if mode == "pipeline":
        from100 = [r for r in lines if r["tiles"] >= 100]
        stages = ("plan", "infer", "mosaic", "total")
        spreads = {k: _spread([r["ms_per_tile"][k] for r in from100]) for k in stages}
        # from 1,000 on the step adds enough tiles for the marginal cost to stand above the fixed costs' noise
        marg = {k: _spread([r["marginal_ms_per_tile"][k] for r in lines if r["tiles"] >= 1000
                            and "marginal_ms_per_tile" in r]) for k in stages}
        res = {"bench": "scale", "kind": "result", "mode": "pipeline", "largest_tiles": largest["tiles"],
               "ms_per_tile_spread_from_100": spreads, "marginal_spread_from_1000": marg,
               "infer_steady_spread_from_100": _spread([r["infer_steady_ms_per_tile"] for r in from100
                                                        if "infer_steady_ms_per_tile" in r]),
               "flat_target": TARGET_FLAT,
               "flat": all(v is not None and v <= TARGET_FLAT for v in spreads.values()),
               "flat_marginal": all(v is not None and v <= TARGET_FLAT for v in marg.values()),
               "driver_peak_mb_per_1000_tiles": mb_per_1000, "largest_peak_rss_mb": largest["peak_rss_mb"]}
        print(json.dumps(res), flush=True)
        return 0
    avg = _spread([r["us_per_tile"] for r in lines if r["tiles"] >= 100])
    # the marginal cost is measurable above the timer's noise once the step adds ~1000 tiles
    marg = _spread([r["marginal_us_per_tile"] for r in lines if r["tiles"] >= 1000 and "marginal_us_per_tile" in r])
    res = {"bench": "scale", "kind": "result", "mode": "plan", "largest_tiles": largest["tiles"],
           "largest_s": largest["total_s"], "largest_peak_rss_mb": largest["peak_rss_mb"],
           "target_s": TARGET_PLAN_S, "target_mb": TARGET_PLAN_MB, "us_per_tile_spread_from_100": avg,
           "marginal_spread_from_1000": marg, "flat_target": TARGET_FLAT,
           "flat": avg is not None and avg <= TARGET_FLAT,
           "flat_marginal": marg is not None and marg <= TARGET_FLAT, "driver_peak_mb_per_1000_tiles": mb_per_1000}
    if largest["tiles"] >= 100_000:
        res["meets_time"] = largest["total_s"] <= TARGET_PLAN_S
        res["meets_memory"] = largest["peak_rss_mb"] <= TARGET_PLAN_MB
    print(json.dumps(res), flush=True)
    return 0


def _in_subprocess(n: int, a: argparse.Namespace, extra: list[str]) -> dict | None:
    """One size measured in a fresh process (its own peak memory); its JSON line, or None after printing why."""
    cmd = [sys.executable, __file__, "--one", str(n), "--tile-px", str(a.tile_px), "--dates", str(a.dates),
           "--center", *map(str, a.center), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
