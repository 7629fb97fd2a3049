"""Ingest of real data (../shared/data/real), GRD radar geometry, the STAC API path and `ray job submit`."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import shapely.geometry

from pipeline import bands as B
from pipeline import demo, zarr_cube
from pipeline.cube import CubeConfig
from pipeline.grid import TileGrid, load_aoi, parse_tile_id, utm_epsg, utm_zone
from pipeline.ingest import run_ingest
from pipeline.stac import SearchQuery, StaticCatalogSource
from tests.raster_ref import exact_bilinear, reproject_to_tile
from tests.ray_head import ray_bin
from tests.ray_head import ray_head as start_ray_head
from tests.real_catalogs import bigearthnet_catalog, grd_catalog, naip_series_catalog, subset_catalog

REPO = Path(__file__).resolve().parents[1]


def _items(catalog: Path) -> dict[str, pystac.Item]:
    return {i.id: i for i in StaticCatalogSource(catalog).search(SearchQuery())}


def _patch_interior(item: pystac.Item, tile, margin_px: int) -> np.ndarray:
    """Tile pixels whose centres lie inside the item's raster, ``margin_px`` 10 m pixels from its edge."""
    t = item.assets[next(iter(item.assets))].extra_fields["proj:transform"]
    h, w = item.assets[next(iter(item.assets))].extra_fields["proj:shape"]
    x0, y1 = t[2], t[5]
    x1, y0 = x0 + t[0] * w, y1 + t[4] * h
    m = margin_px * 10
    tr = tile.transform()
    n = tile.shape()[0]
    xs = tr.c + tr.a * (np.arange(n) + 0.5)
    ys = tr.f + tr.e * (np.arange(n) + 0.5)
    return ((ys[:, None] > y0 + m) & (ys[:, None] < y1 - m)) & ((xs[None] > x0 + m) & (xs[None] < x1 - m))


def test_bigearthnet_cube_equals_the_sources(real_data, tmp_path, ray_local):
    cat = bigearthnet_catalog(real_data, tmp_path / "ben")
    items = _items(cat)
    aoi = shapely.union_all([shapely.geometry.shape(i.geometry) for i in items.values()])
    out = tmp_path / "ben.zarr"
    cfg = CubeConfig(grid=TileGrid(128, 8), t_s2=3, t_s1=3, t_hr=1, hr_ratio=2)
    report = run_ingest(str(cat), aoi, date(2017, 6, 1), date(2018, 2, 28), out, cfg, progress=None,
                        allow_hrefs=[str(real_data)])  # the catalog wraps the real files in place
    assert report.ok, report.summary()
    # Tiles take the zone of their longitude: the Finnish patches (delivered in zone 35, east of 30 E) land
    # in zone-36 tiles, reprojected.
    zones = {utm_epsg(utm_zone(shapely.geometry.shape(i.geometry).centroid.x), False) for i in items.values()}
    assert {parse_tile_id(t, cfg.grid).epsg for t in report.done} == zones == {32629, 32633, 32636}
    compared = {B.S2: 0, B.S1: 0}
    reprojected_px = 0
    for tid in report.done:
        ds = zarr_cube.open_tile(out, tid)
        tile = parse_tile_id(tid, cfg.grid)
        assert ds.attrs["present"] == {"s2": True, "s1": True, "hr": False}
        for k, ids in enumerate(ds.attrs["items"]["s2"]):
            if len(ids) != 1:
                continue
            it = items[ids[0]]
            same_crs = it.properties["proj:code"] == f"EPSG:{tile.epsg}"
            inside = _patch_interior(it, tile, margin_px=0) if same_crs else None
            interior = _patch_interior(it, tile, margin_px=2) if same_crs else None
            for band in B.S2_BANDS:
                got = ds.s2.sel(band_s2=band).values[k]
                ref = reproject_to_tile(it.assets[band].href, tile)
                if not same_crs:
                    # Reprojected across zones: bilinear as stated, up to GDAL's approximate transformer (error
                    # threshold 1/8 pixel in each axis, so at most 1/4 of the local 4x4 source range) from the
                    # exact bilinear value (exact_bilinear has no approximation).
                    exact, grad, interior = exact_bilinear(it.assets[band].href, tile)
                    ratio = np.abs(got.astype(float) - exact)[interior] / (grad[interior] + 1)
                    assert ratio.max() <= 0.25, (tid, it.id, band, ratio.max())
                    reprojected_px += int(interior.sum())
                elif B.S2_BAND_INFO[band].native_resolution_m == 10:
                    np.testing.assert_array_equal(got[inside], ref[inside], err_msg=f"{tid} {it.id} {band}")
                else:  # 20 m: bilinear onto the 10 m grid, as stated (the patch edge has no neighbours: skip it)
                    np.testing.assert_array_equal(got[interior], ref[interior], err_msg=f"{tid} {it.id} {band}")
            if same_crs:  # no SCL in BigEarthNet: the mask is the data footprint
                mask = ds.s2_mask.values[k].astype(bool)
                assert mask[inside].all() and not mask[~inside].any()
                compared[B.S2] += 1
        for k, ids in enumerate(ds.attrs["items"]["s1"]):
            if len(ids) != 1:
                continue
            it = items[ids[0]]
            if it.properties["proj:code"] != f"EPSG:{tile.epsg}":
                continue
            inside = _patch_interior(it, tile, margin_px=0)
            for band, key in (("VV", "vv"), ("VH", "vh")):
                with rasterio.open(it.assets[key].href) as src:  # BigEarthNet S1 is dB on the S2 grid
                    win = rasterio.windows.from_bounds(*tile.bounds(), transform=src.transform)
                    ref = src.read(1, window=win, boundless=True, fill_value=np.nan)
                got = ds.s1.sel(band_s1=band).values[k]
                np.testing.assert_allclose(got[inside], ref[inside], rtol=0, atol=1e-5)
            assert ds.s1_mask.values[k].astype(bool)[inside].all()
            compared[B.S1] += 1
    assert compared[B.S2] >= 4 and compared[B.S1] >= 4, compared
    # The zone-36 tiles were compared too, over most of the Finnish patches (2 x 120 x 120 px x 10 bands).
    assert reprojected_px > 0.5 * 2 * 120 * 120 * 10, reprojected_px


def test_ten_naip_dates_coregister_onto_one_grid(real_data, tmp_path, ray_local):
    cat = naip_series_catalog(real_data, tmp_path / "naip")
    items = _items(cat)
    fp = shapely.intersection_all([shapely.geometry.shape(i.geometry) for i in items.values()])
    c = fp.centroid
    aoi = shapely.geometry.box(c.x - 0.004, c.y - 0.003, c.x + 0.004, c.y + 0.003)
    cfg = CubeConfig(grid=TileGrid(64, 8), t_s2=1, t_s1=1, t_hr=10, hr_ratio=2)  # HR at 5 m, like the source
    out = tmp_path / "naip.zarr"
    report = run_ingest(str(cat), aoi, date(2009, 1, 1), date(2020, 12, 31), out, cfg, progress=None,
                        allow_hrefs=[str(real_data)])
    assert report.ok and report.done
    for tid in report.done:
        ds = zarr_cube.open_tile(out, tid)
        tile = parse_tile_id(tid, cfg.grid)
        assert ds.attrs["present"] == {"s2": False, "s1": False, "hr": True}
        assert ds.hr_valid.values.all() and ds.sizes["time_hr"] == 10
        years = [str(t)[:4] for t in ds.time_hr.values]
        assert years == ["2009", "2010", "2012", "2014", "2015", "2016", "2017", "2018", "2019", "2020"]
        for k, ids in enumerate(ds.attrs["items"]["hr"]):
            it = items[ids[0]]
            ref = np.stack(
                [  # NAD83 UTM 14N -> WGS84 UTM 14N, bilinear
                    reproject_to_tile(it.assets["image"].href, tile, band=b, ratio=cfg.hr_ratio, dtype=np.uint8)
                    for b in (1, 2, 3)
                ]
            )
            got = ds.hr.values[k]
            # Every date on the tile's one grid, through its own georeference (origins differ by 1-3 m).
            diff = np.abs(got.astype(int) - ref.astype(int))
            assert (diff <= 1).mean() > 0.999, f"{tid} {it.id}: {diff.max()}"


def test_grd_in_radar_geometry_lands_on_the_rtc_pixels(demo_region, tmp_path, ray_local):
    path, dcfg = demo_region
    rtc = [i for i in _items(path).values() if i.collection_id == "sentinel-1-rtc"]
    item = next(i for i in rtc if i.datetime.month == 7)
    day = item.datetime.date()
    grd = grd_catalog(path, item.id, tmp_path / "grd")
    rtc_only = subset_catalog(path, ["sentinel-1-rtc"], tmp_path / "rtc")
    x0, y0, x1, y1 = demo.region_bbox(dcfg)
    aoi = load_aoi((x0 + 0.3 * (x1 - x0), y0 + 0.3 * (y1 - y0), x0 + 0.7 * (x1 - x0), y0 + 0.7 * (y1 - y0)))
    cfg = CubeConfig(grid=TileGrid(64, 8), t_s2=1, t_s1=1, t_hr=1, hr_ratio=2)
    a = run_ingest(str(grd), aoi, day, day, tmp_path / "grd.zarr", cfg, progress=None)
    b = run_ingest(str(rtc_only), aoi, day, day, tmp_path / "rtc.zarr", cfg, progress=None,
                   allow_hrefs=[str(path.parent)])
    assert a.ok and b.ok and sorted(a.done) == sorted(b.done)
    for tid in a.done:
        ga, gb = zarr_cube.open_tile(tmp_path / "grd.zarr", tid), zarr_cube.open_tile(tmp_path / "rtc.zarr", tid)
        assert ga.attrs["items"]["s1"][0] == [item.id.removesuffix("_rtc")]
        va, vb = ga.s1.values[0], gb.s1.values[0]
        both = np.isfinite(va) & np.isfinite(vb)
        assert both.mean() > 0.5
        d = np.abs(va - vb)[both]
        assert np.median(d) < 0.01 and np.percentile(d, 99) < 0.1, (tid, np.median(d), np.percentile(d, 99))


def test_api_path_builds_the_same_cube(pgstac_server, demo_region, tmp_path, ray_local):
    path, dcfg = demo_region
    pgstac_server.load_catalog(path)
    x0, y0, x1, y1 = demo.region_bbox(dcfg)
    aoi = load_aoi((x0 + 0.4 * (x1 - x0), y0 + 0.4 * (y1 - y0), x0 + 0.6 * (x1 - x0), y0 + 0.5 * (y1 - y0)))
    cfg = CubeConfig(grid=TileGrid(64, 8), t_s2=6, t_s1=3, t_hr=1, hr_ratio=8)
    season = (date(2024, 4, 1), date(2024, 9, 30))
    # the API serves items whose assets are the region's local files: allowed explicitly (pipeline.hrefs)
    a = run_ingest(pgstac_server.url, aoi, *season, tmp_path / "api.zarr", cfg, progress=None,
                   allow_hrefs=[str(path.parent)])
    b = run_ingest(str(path), aoi, *season, tmp_path / "static.zarr", cfg, progress=None)
    assert a.ok and b.ok and sorted(a.done) == sorted(b.done) and len(a.done) >= 2
    for tid in a.done:
        da, db = zarr_cube.open_tile(tmp_path / "api.zarr", tid), zarr_cube.open_tile(tmp_path / "static.zarr", tid)
        assert da.attrs["items"] == db.attrs["items"]
        for name in ("s2", "s2_mask", "s2_scl", "s1", "s1_mask", "hr", "hr_mask", "time_s2", "time_s1"):
            np.testing.assert_array_equal(da[name].values, db[name].values, err_msg=f"{tid} {name}")


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head started by this test (tests/ray_head.py)."""
    with start_ray_head(tmp_path) as h:
        yield h


def test_ingest_through_ray_job_submit(ray_head, demo_region, tmp_path):
    url, env = ray_head
    path, dcfg = demo_region
    x0, y0, x1, y1 = demo.region_bbox(dcfg)
    bbox = [x0 + 0.45 * (x1 - x0), y0 + 0.45 * (y1 - y0), x0 + 0.55 * (x1 - x0), y0 + 0.55 * (y1 - y0)]
    out = tmp_path / "job.zarr"
    cmd = [
        ray_bin(),
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "jobs/ingest.py",
        "--catalog",
        str(path),
        "--bbox",
        *map(str, bbox),
        "--start",
        "2024-05-01",
        "--end",
        "2024-08-31",
        "--out",
        str(out),
        "--tile-px",
        "64",
        "--halo-px",
        "8",
        "--t-s2",
        "4",
        "--t-s1",
        "2",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "succeeded" in r.stdout and "[ingest]" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["done"] and manifest["counts"]["failed"] == 0
    root = zarr_cube.open_cube(out)
    assert (root["index/status"][:] == zarr_cube.DONE).all()


@pytest.mark.xfail(
    strict=True,
    reason="odc-loader 0.6.5 warps this cross-zone 10 m case up to 0.26 of the local source range from exact "
    "bilinear, beyond GDAL's 1/8-pixel approximation (0.25), so pipeline.cube warps cross-CRS items with GDAL "
    "directly (<= 0.16). When this passes, odc-loader is fixed: drop the workaround (_OdcReader._warp_day).",
)
def test_odc_loader_cross_zone_warp_still_needs_the_workaround(real_data, tmp_path):
    import odc.stac

    cat = bigearthnet_catalog(real_data, tmp_path / "ben")
    it = _items(cat)["S2B_MSIL2A_20180204T94161_57_38"]
    tile = parse_tile_id("36N_0282_5432", TileGrid(128, 8))
    ds = odc.stac.load([it], bands=["B02"], geobox=tile.geobox(), resampling="bilinear", chunks=None)
    exact, grad, inside = exact_bilinear(it.assets["B02"].href, tile)
    ratio = np.abs(ds.B02.values[0].astype(float) - exact)[inside] / (grad[inside] + 1)
    assert inside.sum() > 500 and ratio.max() <= 0.25, ratio.max()
