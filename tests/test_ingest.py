"""Ingest on the demo region with a real local Ray: every tile present, values equal to direct rasterio reads of
the source COGs, masks from SCL, xarray views with CRS, resume after a kill, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pystac
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from rasterio.enums import Resampling

from pipeline import bands as B
from pipeline import demo, zarr_cube
from pipeline.cube import CubeConfig, blocks_of
from pipeline.grid import Tile, TileGrid, footprints_lonlat, load_aoi, parse_tile_id, tiles_for_aoi
from pipeline.ingest import assign_items, block_side, run_ingest
from pipeline.stac import EmptySearchError, SearchQuery, StaticCatalogSource
from tests.raster_ref import reproject_to_tile

REPO = Path(__file__).resolve().parents[1]
CFG = CubeConfig(grid=TileGrid(64, 8), t_s2=8, t_s1=4, t_hr=1, hr_ratio=8)
SEASON = (date(2024, 3, 1), date(2024, 10, 31))


def sub_bbox(cfg: demo.DemoConfig, fx0=0.0, fy0=0.0, fx1=1.0, fy1=1.0) -> tuple[float, ...]:
    x0, y0, x1, y1 = demo.region_bbox(cfg)
    return x0 + fx0 * (x1 - x0), y0 + fy0 * (y1 - y0), x0 + fx1 * (x1 - x0), y0 + fy1 * (y1 - y0)


@pytest.fixture(scope="session")
def demo_cube(demo_region, ray_local, tmp_path_factory):
    path, dcfg = demo_region
    out = tmp_path_factory.mktemp("cubes") / "demo.zarr"
    aoi = load_aoi(sub_bbox(dcfg, 0.02, 0.02, 0.98, 0.98))
    report = run_ingest(str(path), aoi, *SEASON, out, CFG, progress=None)
    assert report.ok, report.summary()
    return out, aoi, report


def _items_by_id(catalog: Path) -> dict[str, pystac.Item]:
    return {i.id: i for i in StaticCatalogSource(catalog).search(SearchQuery())}


def _window_read(href: str, tile, ratio: int = 1) -> np.ndarray:
    with rasterio.open(href) as src:
        win = rasterio.windows.from_bounds(*tile.bounds(), transform=src.transform)
        return src.read(
            1,
            window=win,
            boundless=True,
            fill_value=src.nodata or 0,
            out_shape=tile.shape(ratio) if src.res[0] == 10 / ratio else None,
        )


def test_every_tile_present_with_documented_layout(demo_cube):
    out, aoi, report = demo_cube
    planned = tiles_for_aoi(aoi, CFG.grid)
    root = zarr_cube.open_cube(out)
    assert zarr_cube.tile_ids(root) == [t.id for t in planned]
    assert (root["index/status"][:] == zarr_cube.DONE).all()
    assert sorted(report.done) == sorted(t.id for t in planned) and not report.failed
    n, nh = CFG.grid.size_px, CFG.grid.size_px * CFG.hr_ratio
    for t in planned:
        g = zarr.open_group(str(out), path=f"tiles/{t.id}", mode="r")
        expect = {
            "s2": ((CFG.t_s2, 10, n, n), "uint16"),
            "s2_mask": ((CFG.t_s2, n, n), "uint8"),
            "s2_scl": ((CFG.t_s2, n, n), "uint8"),
            "s2_valid": ((CFG.t_s2,), "bool"),
            "s1": ((CFG.t_s1, 2, n, n), "float32"),
            "s1_mask": ((CFG.t_s1, n, n), "uint8"),
            "hr": ((CFG.t_hr, 3, nh, nh), "uint8"),
            "hr_mask": ((CFG.t_hr, nh, nh), "uint8"),
        }
        for name, (shape, dtype) in expect.items():
            assert g[name].shape == shape and str(g[name].dtype) == dtype, (t.id, name)
            assert g[name].chunks == shape, "one chunk per tile sample per array"
        assert g.attrs["done"] is True and g.attrs["tile_id"] == t.id
        lon, lat = t.center_lonlat()
        assert g.attrs["center_lon"] == pytest.approx(lon) and g.attrs["center_lat"] == pytest.approx(lat)
    idx = root["index"]
    assert np.allclose(idx["center_lat"][:], [t.center_lonlat()[1] for t in planned])
    stats = root.attrs["stats"]
    assert len(stats["s2"]["mean"]) == 10 and 300 < stats["s2"]["mean"][6] < 5000  # B08
    assert -25 < stats["s1"]["mean"][0] < 0 and stats["s1"]["mean"][1] < stats["s1"]["mean"][0]  # VH < VV
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"done": len(planned), "failed": 0, "with_warnings": len(report.warnings)}
    rows = pd.read_parquet(out / manifest["tiles_table"])
    assert sorted(rows.tile) == sorted(t.id for t in planned) and (rows.status == "done").all()


def test_values_equal_direct_reads_of_the_source_cogs(demo_cube, demo_region):
    out, _, _ = demo_cube
    catalog, dcfg = demo_region
    items = _items_by_id(catalog)
    root = zarr_cube.open_cube(out)
    tiles = zarr_cube.tiles_of(root)
    checked = 0
    for t in tiles[:: max(1, len(tiles) // 4)]:
        ds = zarr_cube.open_tile(out, t.id)
        for k in range(CFG.t_s2):
            if not ds.attrs["items"]["s2"][k]:
                continue
            it = items[ds.attrs["items"]["s2"][k][0]]
            for band in ("B04", "B08"):  # native 10 m: exactly the source pixels
                np.testing.assert_array_equal(ds.s2.sel(band_s2=band).values[k], _window_read(it.assets[band].href, t))
            for band in ("B05", "B11"):  # native 20 m: the stated rule (bilinear) onto the tile grid
                ref = reproject_to_tile(it.assets[band].href, t, src_nodata=0)
                np.testing.assert_array_equal(ds.s2.sel(band_s2=band).values[k], ref)
            scl = reproject_to_tile(
                it.assets["SCL"].href, t, dtype=np.uint8, resampling=Resampling.nearest, src_nodata=0
            )
            np.testing.assert_array_equal(ds.s2_scl.values[k], scl)
            checked += 1
        for k in range(CFG.t_s1):
            it = items[ds.attrs["items"]["s1"][k][0]]
            lin = _window_read(it.assets["vv"].href, t).astype(np.float64)  # outside the region: nodata
            ref_db = np.where(lin > 0, 10 * np.log10(np.where(lin > 0, lin, 1)), np.nan)
            np.testing.assert_allclose(ds.s1.sel(band_s1="VV").values[k], ref_db, rtol=0, atol=1e-4)
        it = items[ds.attrs["items"]["hr"][0][0]]
        with rasterio.open(it.assets["image"].href) as src:
            win = rasterio.windows.from_bounds(*t.bounds(), transform=src.transform)
            hr = src.read(window=win, boundless=True, fill_value=0)
        np.testing.assert_array_equal(ds.hr.values[0], hr)
    assert checked >= 8


def test_blocks_of_tiles_write_what_each_tile_read_alone_writes(tmp_path, demo_region, demo_cube):
    """The ingest reads blocks of adjacent tiles (one read per band and date for the block, each tile its
    slice and its own date choice): a cube read tile by tile (``block_tiles=1``) holds the same values, dates,
    items, warnings and statistics. The tiles checked straddle block boundaries."""
    path, dcfg = demo_region
    ref, aoi, _ = demo_cube
    tiles = zarr_cube.tiles_of(zarr_cube.open_cube(ref))
    side = json.loads((ref / "manifest.json").read_text())["this_run"]["block_side"]
    assert side >= 2 and max(len(b) for b in blocks_of(tiles, side)) > 1  # the reference was read in blocks
    picked = {t.id for t in tiles[:: max(1, len(tiles) // 6)]}
    out = tmp_path / "tile-by-tile.zarr"
    report = run_ingest(str(path), aoi, *SEASON, out, CFG, progress=None, block_tiles=1,
                        tile_filter=lambda t: t.id in picked)
    assert report.ok and sorted(report.done) == sorted(picked), report.summary()
    assert json.loads((out / "manifest.json").read_text())["this_run"]["block_side"] == 1
    for tid in picked:
        a, b = zarr_cube.open_tile(out, tid), zarr_cube.open_tile(ref, tid)
        for name in ("s2", "s2_mask", "s2_scl", "s1", "s1_mask", "hr", "hr_mask", "time_s2", "time_s1", "time_hr"):
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{tid} {name}")
        for key in ("items", "warnings", "stats", "present"):
            assert a.attrs[key] == b.attrs[key], (tid, key)


def test_blocks_group_adjacent_tiles_of_one_zone_and_fit_the_memory_budget():
    grid = TileGrid(64, 8)
    tiles = [Tile(32, False, c, r, grid) for c in range(5) for r in range(3)] + [Tile(33, False, 0, 0, grid)]
    blocks = blocks_of(tiles, 2)
    assert sorted(t.id for b in blocks for t in b) == sorted(t.id for t in tiles)
    for b in blocks:
        assert len(b) <= 4 and len({(t.zone, t.col // 2, t.row // 2) for t in b}) == 1
    assert sorted(len(b) for b in blocks) == [1, 1, 2, 2, 2, 4, 4]  # from the first column and row of a zone
    assert [len(b) for b in blocks_of(tiles, 1)] == [1] * len(tiles)
    assert block_side(CFG, 2) == 2
    big = CubeConfig(grid=TileGrid(1024, 32), hr_ratio=32)  # a 2 x 2 block would read ~40 GB of HR alone
    assert block_side(big, 2) == 1
    with pytest.raises(ValueError):
        blocks_of(tiles, 0)


def test_cloudy_pixels_are_masked_and_dates_flagged(demo_cube):
    out, _, _ = demo_cube
    for tid in zarr_cube.tile_ids(zarr_cube.open_cube(out)):
        ds = zarr_cube.open_tile(out, tid)
        scl, mask, s2 = ds.s2_scl.values, ds.s2_mask.values.astype(bool), ds.s2.values
        assert not (mask & np.isin(scl, B.SCL_INVALID)).any(), "cloud, shadow, cirrus and nodata are masked"
        assert not (mask & (s2 == 0).any(axis=1)).any(), "nodata pixels are masked"
        filled = [k for k in range(CFG.t_s2) if ds.attrs["items"]["s2"][k]]
        assert (mask[filled].reshape(len(filled), -1).mean(axis=1) >= CFG.min_valid_fraction).all()
        assert ds.s2_valid.values[filled].all() and not ds.s2_valid.values[len(filled) :].any()
        dates = ds.time_s2.values[filled]
        assert (np.diff(dates) > np.timedelta64(0)).all(), "dates in order"
        assert dates.min() >= np.datetime64(SEASON[0]) and dates.max() <= np.datetime64(SEASON[1])


def test_dates_spread_over_the_season(demo_cube):
    out, _, _ = demo_cube
    ds = zarr_cube.open_tile(out, zarr_cube.tile_ids(zarr_cube.open_cube(out))[0])
    months = {int(str(d)[5:7]) for d in ds.time_s2.values if not np.isnat(d)}
    assert len(months) >= 6, months  # 8 dates over Mar-Oct, not clumped in the clearest month


def test_tile_opens_in_xarray_with_crs(demo_cube):
    out, _, _ = demo_cube
    tid = zarr_cube.tile_ids(zarr_cube.open_cube(out))[0]
    ds = xr.open_zarr(str(out), group=f"tiles/{tid}", zarr_format=3, consolidated=False)
    assert ds.s2.dims == ("time_s2", "band_s2", "y", "x")
    assert list(ds.band_s2.values) == list(B.S2_BANDS)
    assert ds.s2.rio.crs.to_epsg() == 32632
    t = parse_tile_id(tid, CFG.grid)
    assert tuple(ds.s2.rio.transform())[:6] == tuple(t.transform())[:6]
    assert ds.hr.rio.transform().a == pytest.approx(10 / CFG.hr_ratio)
    assert np.issubdtype(ds.time_s2.dtype, np.datetime64)
    # A tile exports to GeoTIFF with rioxarray, georeferenced.
    assert ds.s2.isel(time_s2=0).rio.bounds() == pytest.approx(t.bounds())


def test_s2_only_catalog_flags_other_modalities_absent(tmp_path, demo_region, ray_local):
    from tests.real_catalogs import subset_catalog

    path, dcfg = demo_region
    s2_only = subset_catalog(path, ["sentinel-2-l2a"], tmp_path / "s2only")
    aoi = load_aoi(sub_bbox(dcfg, 0.4, 0.4, 0.5, 0.5))
    out = tmp_path / "s2only.zarr"
    report = run_ingest(str(s2_only), aoi, *SEASON, out, CFG, progress=None, allow_hrefs=[str(path.parent)])
    assert report.ok and report.done
    for tid in report.done:
        ds = zarr_cube.open_tile(out, tid)
        assert ds.attrs["present"] == {"s2": True, "s1": False, "hr": False}
        assert not ds.s1_valid.values.any() and not ds.hr_valid.values.any() and ds.s2_valid.values.any()
        assert np.isnan(ds.s1.values).all() and not ds.hr_mask.values.any()


def test_all_cloudy_season_still_writes_the_tile(tmp_path, demo_region, ray_local):
    """A season whose only S2 date is overcast over the tile: the tile is written, its S2 flagged invalid."""
    path, dcfg = demo_region
    aoi = load_aoi(sub_bbox(dcfg, 0.45, 0.45, 0.5, 0.5))
    (tile,) = tiles_for_aoi(aoi, CFG.grid)
    items = StaticCatalogSource(path).search(
        SearchQuery(collections=("sentinel-2-l2a",), query={"eo:cloud_cover": {"gt": 60}})
    )

    def clear_fraction(it) -> float:
        scl = reproject_to_tile(
            it.assets["SCL"].href, tile, dtype=np.uint8, resampling=Resampling.nearest, src_nodata=0
        )
        return float((~np.isin(scl, B.SCL_INVALID)).mean())

    overcast = [it for it in items if clear_fraction(it) < CFG.min_valid_fraction]
    assert overcast, "the demo has dates overcast over this tile"
    day = overcast[0].datetime.date()
    out = tmp_path / "cloudy.zarr"
    report = run_ingest(str(path), aoi, day, day, out, CFG, progress=None)
    # the tile is written, and the run is not a success: its only date is overcast, the cube holds no valid date
    assert report.done == [tile.id] and report.empty and not report.ok and "NO VALID DATE" in report.summary()
    ds = zarr_cube.open_tile(out, tile.id)
    assert ds.attrs["present"]["s2"] is True and not ds.s2_valid.values.any()
    assert any("no date with at least" in w for w in ds.attrs["warnings"])
    assert ds.s1_valid.values.sum() <= 1  # S1 sees through clouds: written as usual if it flew that day


def test_bad_items_are_skipped_with_a_message_and_the_rest_written(tmp_path, demo_region, ray_local):
    """A truncated COG, an asset that does not exist and an item missing a band: each skipped with a warning
    naming the item; the tiles are still written from the other items."""
    path, dcfg = demo_region
    work = tmp_path / "bad"
    shutil.copytree(path.parent, work, ignore=shutil.ignore_patterns("*.tif"))
    src_items = {i.id: i for i in StaticCatalogSource(path).search(SearchQuery())}
    cat = pystac.Catalog.from_file(str(work / "catalog.json"))
    s2 = sorted(
        (i for i in cat.get_items(recursive=True) if i.collection_id == "sentinel-2-l2a"),
        key=lambda i: i.properties["eo:cloud_cover"],
    )
    truncated, missing_file, missing_band = s2[0], s2[1], s2[2]
    for it in cat.get_items(recursive=True):  # point every asset back at the original COGs
        for key, a in it.assets.items():
            a.href = src_items[it.id].assets[key].href
    bad_cog = work / "truncated_B04.tif"
    data = Path(truncated.assets["B04"].href).read_bytes()
    bad_cog.write_bytes(data[: len(data) // 2])
    truncated.assets["B04"].href = str(bad_cog)
    missing_file.assets["B08"].href = str(work / "no_such_file.tif")
    del missing_band.assets["B8A"]
    cat.save()
    aoi = load_aoi(sub_bbox(dcfg, 0.3, 0.3, 0.7, 0.7))
    out = tmp_path / "bad.zarr"
    report = run_ingest(str(work / "catalog.json"), aoi, date(2024, 1, 1), date(2024, 12, 31), out, CFG, progress=None,
                        allow_hrefs=[str(path.parent)])  # the copied items read the region's COGs
    assert report.ok and report.done, report.summary()
    warnings = " | ".join(w for ws in report.warnings.values() for w in ws)
    assert truncated.id in warnings and missing_file.id in warnings and "no_such_file.tif" in warnings
    assert f"item '{missing_band.id}'" in warnings and "'B8A'" in warnings
    rows = pd.read_parquet(out / "manifest.parquet").set_index("tile")
    assert (rows.status == "done").all() and rows.reason.isna().all()
    assert {t for t, w in rows.warnings.items() if w is not None and len(w)} == set(report.warnings)
    for tid in report.done:
        ds = zarr_cube.open_tile(out, tid)
        used = {i for ids in ds.attrs["items"]["s2"] for i in ids}
        assert not used & {truncated.id, missing_file.id, missing_band.id}
        assert ds.s2_valid.values.sum() == CFG.t_s2


def test_empty_search_and_bad_aoi_fail_before_any_tile(tmp_path, demo_region):
    path, dcfg = demo_region
    with pytest.raises(EmptySearchError, match="no items"):
        run_ingest(
            str(path),
            load_aoi(sub_bbox(dcfg)),
            date(2019, 1, 1),
            date(2019, 2, 1),
            tmp_path / "e.zarr",
            CFG,
            progress=None,
        )
    assert not (tmp_path / "e.zarr").exists()
    r = subprocess.run(
        [
            sys.executable,
            "jobs/ingest.py",
            "--catalog",
            str(path),
            "--bbox",
            "9",
            "45",
            "8",
            "46",
            "--start",
            "2024-01-01",
            "--end",
            "2024-02-01",
            "--out",
            str(tmp_path / "x.zarr"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2 and "MINLON MINLAT MAXLON MAXLAT" in r.stderr and "Traceback" not in r.stderr


def test_aoi_across_two_utm_zones():
    aoi = load_aoi((11.99, 45.0, 12.01, 45.01))
    tiles = tiles_for_aoi(aoi, CFG.grid)
    zones = {t.zone for t in tiles}
    assert zones == {32, 33}
    for t in tiles:  # each tile lies on its own zone's lattice and touches the AOI
        assert t.epsg == 32600 + t.zone
        assert t.footprint_lonlat(halo=False).intersects(aoi)
        assert t.core_bounds()[0] % CFG.grid.tile_m == 0


def test_tiles_matched_to_items_all_at_once_as_one_by_one():
    """The vectorised footprints and matching (what planning 10^5 tiles runs on) equal the per-tile ones, on an
    AOI across a zone boundary with items over part of it."""
    import shapely.geometry

    aoi = load_aoi((11.97, 45.0, 12.03, 45.03))
    tiles = tiles_for_aoi(aoi, CFG.grid)
    fps = footprints_lonlat(tiles)
    assert all(a.equals_exact(t.footprint_lonlat(), 0) for a, t in zip(fps, tiles, strict=True))

    class Footprint:  # what assign_items reads of an item
        def __init__(self, *bbox):
            self.geometry = shapely.geometry.mapping(shapely.geometry.box(*bbox))

    items = [Footprint(11.9, 44.9, 12.0, 45.1), Footprint(12.0, 45.0, 12.1, 45.012), Footprint(13, 45, 14, 46)]
    got = assign_items(tiles, items)
    tree = shapely.STRtree([shapely.geometry.shape(i.geometry) for i in items])
    assert got == {t.id: sorted(int(i) for i in tree.query(t.footprint_lonlat(), predicate="intersects"))
                   for t in tiles}
    assert {len(v) for v in got.values()} >= {0, 1} and not any(2 in v for v in got.values())
    assert assign_items([], items) == {} and assign_items(tiles[:1], []) == {tiles[0].id: []}


def test_cube_of_a_two_zone_aoi(tmp_path, ray_local):
    """A real cube across the 12 E zone boundary (a tiny catalog straddling it): tiles in both zones."""
    from pyproj import Transformer

    x12, y = Transformer.from_crs(4326, 32632, always_xy=True).transform(12.0, 45.0)
    origin = (round(x12 / 10) * 10 - 500.0, round(y / 10) * 10)  # a 1 km square centred on 12 E
    cfg = demo.DemoConfig(size_km=1.0, seed=5, hr_ratio=2, origin_xy=origin)
    region = demo.generate(cfg, tmp_path / "region", progress=False, workers=1)
    x0, y0, x1, y1 = demo.region_bbox(cfg)
    assert x0 < 12.0 < x1
    out = tmp_path / "two_zones.zarr"
    report = run_ingest(
        str(region),
        load_aoi((x0, y0, x1, y1)),
        date(2024, 6, 1),
        date(2024, 7, 31),
        out,
        CubeConfig(grid=TileGrid(64, 8), t_s2=2, t_s1=2, hr_ratio=2),
        progress=None,
    )
    assert report.ok
    epsgs = {zarr_cube.open_tile(out, t).attrs["epsg"] for t in report.done}
    assert epsgs == {32632, 32633}
    # A tile in zone 33 is the zone-32 data reprojected: it is valid where the region is.
    t33 = next(t for t in report.done if t.startswith("33"))
    ds = zarr_cube.open_tile(out, t33)
    assert ds.s2_mask.values.any() and ds.s2.rio.crs.to_epsg() == 32633


def _ray_pids() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    marks = ("raylet", "gcs_server", "ray::", "default_worker.py", "dashboard", "log_monitor.py", "monitor.py")
    return {int(line.split(None, 1)[0]) for line in out.splitlines() if any(m in line for m in marks)}


def _run_ingest_job(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "jobs/ingest.py", *args],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_killed_run_resumes_to_the_same_cube(tmp_path, demo_region, demo_cube):
    """Kill the ingest job (a real SIGKILL of its process group) once some tiles are done; the re-run writes
    only the rest, and the cube equals the uninterrupted one."""
    path, dcfg = demo_region
    ref_cube, aoi, _ = demo_cube
    out = tmp_path / "killed.zarr"
    bbox = [str(v) for v in sub_bbox(dcfg, 0.02, 0.02, 0.98, 0.98)]
    args = [
        "--catalog",
        str(path),
        "--bbox",
        *bbox,
        "--start",
        SEASON[0].isoformat(),
        "--end",
        SEASON[1].isoformat(),
        "--out",
        str(out),
        "--tile-px",
        "64",
        "--halo-px",
        "8",
        "--t-s2",
        "8",
        "--t-s1",
        "4",
        "--t-hr",
        "1",
        "--hr-ratio",
        "8",
        "--ray-address",
        "local",
    ]
    before = _ray_pids()
    proc = _run_ingest_job(args)
    ids = [t.id for t in tiles_for_aoi(aoi, CFG.grid)]
    deadline = time.time() + 240
    while time.time() < deadline and sum(zarr_cube.is_done(out, t) for t in ids) < 3:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The job's own Ray processes (raylet, GCS, workers) notice the dead driver and exit; an in-flight tile
    # may still finish meanwhile. Wait for them (and only them) before counting.
    ours = _ray_pids() - before
    deadline = time.time() + 60
    while ours & _ray_pids() and time.time() < deadline:
        time.sleep(0.5)
    for pid in ours & _ray_pids():
        os.kill(pid, signal.SIGKILL)
    done_before = {t for t in ids if zarr_cube.is_done(out, t)}
    assert 3 <= len(done_before) < len(ids), "killed halfway"
    rerun = _run_ingest_job(args)
    log = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, log
    assert f"{len(done_before)} tiles already done, {len(ids) - len(done_before)} to do" in log, log
    rows = pd.read_parquet(out / "manifest.parquet").set_index("tile")
    assert set(rows.index[rows.this_run == "written"]) == set(ids) - done_before
    assert set(rows.index[rows.this_run == "skipped_done"]) == done_before
    for t in ids:
        a, b = zarr_cube.open_tile(out, t), zarr_cube.open_tile(ref_cube, t)
        for name in ("s2", "s2_mask", "s2_scl", "s1", "s1_mask", "hr", "hr_mask"):
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{t} {name}")
        np.testing.assert_array_equal(a.time_s2.values, b.time_s2.values)
    assert zarr_cube.open_cube(out).attrs["stats"] == zarr_cube.open_cube(ref_cube).attrs["stats"]


def test_worker_node_lost_mid_ingest_loses_no_tile(tmp_path, demo_region, demo_cube):
    """The ingest job on a real multi-node Ray cluster (``tests.ray_cluster``: a head with no CPU, two worker
    nodes of 1 CPU). Once a tile is done and while a tile task runs, that task's whole worker node is removed
    (raylet, object store and workers killed): Ray retries the lost tasks on the other node, the job exits 0
    with every tile, and the cube equals the undisturbed one."""
    from tests.ray_cluster import worker_cluster, workers_running

    path, dcfg = demo_region
    ref_cube, aoi, _ = demo_cube
    out = tmp_path / "lost-node.zarr"
    ids = [t.id for t in tiles_for_aoi(aoi, CFG.grid)]
    with worker_cluster(workers=2, cpus=1) as (cluster, nodes):
        args = ["--catalog", str(path), "--bbox", *map(str, sub_bbox(dcfg, 0.02, 0.02, 0.98, 0.98)),
                "--start", SEASON[0].isoformat(), "--end", SEASON[1].isoformat(), "--out", str(out),
                "--tile-px", "64", "--halo-px", "8", "--t-s2", "8", "--t-s1", "4", "--t-hr", "1", "--hr-ratio", "8",
                "--ray-address", cluster.address]
        proc = _run_ingest_job(args)
        removed = None
        deadline = time.time() + 240
        while removed is None and time.time() < deadline and proc.poll() is None:
            if any(zarr_cube.is_done(out, t) for t in ids):
                running = workers_running("ingest_block", nodes)
                if running:
                    removed = running[0]
                    cluster.remove_node(removed[1], allow_graceful=False)
            time.sleep(0.05)
        log = proc.communicate(timeout=600)[0]
        assert removed is not None, "the run ended before a node could be removed:\n" + log[-3000:]
        assert proc.returncode == 0, log[-6000:]
    assert all(zarr_cube.is_done(out, t) for t in ids)
    rows = pd.read_parquet(out / "manifest.parquet")
    assert set(rows.tile[rows.status == "done"]) == set(ids) and len(rows) == len(ids)
    for t in ids:
        a, b = zarr_cube.open_tile(out, t), zarr_cube.open_tile(ref_cube, t)
        for name in ("s2", "s2_mask", "s2_scl", "s1", "s1_mask", "hr", "hr_mask"):
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{t} {name}")
    assert zarr_cube.open_cube(out).attrs["stats"] == zarr_cube.open_cube(ref_cube).attrs["stats"]


def test_rerun_of_a_complete_cube_writes_nothing(demo_cube, demo_region):
    out, aoi, _ = demo_cube
    path, _ = demo_region
    report = run_ingest(str(path), aoi, *SEASON, out, CFG, progress=None)
    assert report.done == [] and len(report.skipped) == report.tiles


def test_other_settings_on_an_existing_cube_are_refused(demo_cube, demo_region):
    out, aoi, _ = demo_cube
    path, _ = demo_region
    with pytest.raises(zarr_cube.CubeError, match="was made with config"):
        run_ingest(str(path), aoi, *SEASON, out, CubeConfig(grid=TileGrid(32, 4)), progress=None)
    with pytest.raises(zarr_cube.CubeError, match="holds the season 2024-03-01..2024-10-31"):
        run_ingest(str(path), aoi, date(2024, 1, 1), SEASON[1], out, CFG, progress=None)
    _, dcfg = demo_region
    wider = load_aoi(sub_bbox(dcfg, -0.5, -0.5, 0.5, 0.5))  # overlaps the region, reaches beyond the plan
    with pytest.raises(zarr_cube.CubeError, match="planned for other tiles"):
        run_ingest(str(path), wider, *SEASON, out, CFG, progress=None)
