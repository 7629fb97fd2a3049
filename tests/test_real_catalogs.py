"""The static catalogs of tests/real_catalogs.py: BigEarthNet and NAIP over the real data, a subset of the demo
catalog, and a GRD-style radar-geometry copy of a demo RTC item. Every item resolves through the provider
profiles (provider ``local``), its metadata matches the files, and the GRD's GCPs warp it back onto the RTC
grid pixel for pixel."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject
from shapely.geometry import box, shape

from pipeline import bands as B
from pipeline.providers import LOCAL_PROVIDER_NAME, resolve_item
from tests.real_catalogs import (
    BIGEARTHNET_S1,
    BIGEARTHNET_S2,
    bigearthnet_catalog,
    bigearthnet_datetime,
    grd_catalog,
    grd_gcps,
    naip_series_catalog,
    subset_catalog,
)

NAIP_YEARS = [2009, 2010, 2012, 2014, 2015, 2016, 2017, 2018, 2019, 2020]
# The GRD warp check: relative error of the warped-back GRD against the RTC, away from a 3-pixel border.
# Correct GCPs give ~1e-7 (median) / ~1e-6 (99th percentile); a 0.1-pixel error already gives ~0.07 / ~1.
GRD_BORDER = 3
GRD_MEDIAN_MAX = 1e-3
GRD_P99_MAX = 2e-2


def _items(catalog_path: Path) -> list[pystac.Item]:
    return list(pystac.Catalog.from_file(str(catalog_path)).get_items(recursive=True))


def _by_collection(items: list[pystac.Item]) -> dict[str, list[pystac.Item]]:
    out: dict[str, list[pystac.Item]] = {}
    for item in items:
        out.setdefault(item.collection_id, []).append(item)
    return out


def _check_map_assets(item: pystac.Item, root: Path | None = None) -> None:
    """Absolute, existing hrefs (under ``root`` if given: read in place); proj/raster metadata as in the files;
    the item footprint is the raster footprint in lon/lat."""
    codes = set()
    for key, asset in item.assets.items():
        href = Path(asset.href)
        assert href.is_absolute() and href.exists(), (item.id, key, asset.href)
        if root is not None:
            assert href.is_relative_to(root), (item.id, key, asset.href)
        with rasterio.open(href) as src:
            assert asset.extra_fields["proj:shape"] == [src.height, src.width], (item.id, key)
            assert asset.extra_fields["proj:transform"] == list(src.transform)[:6], (item.id, key)
            rbands = asset.extra_fields["raster:bands"]
            assert len(rbands) == src.count, (item.id, key)
            for rb, nodata, dtype in zip(rbands, src.nodatavals, src.dtypes, strict=True):
                assert rb["data_type"] == dtype, (item.id, key)
                assert rb.get("nodata") == nodata, (item.id, key)  # absent exactly when the file sets none
                assert rb["spatial_resolution"] == pytest.approx(abs(src.res[0])), (item.id, key)
            codes.add(f"EPSG:{src.crs.to_epsg()}")
            bounds, crs = src.bounds, src.crs
    assert codes == {item.properties["proj:code"]}, item.id
    # Footprint: back in the raster CRS it is the raster's bounds (up to the straight-edge approximation).
    geom = shape(item.geometry)
    assert item.bbox == pytest.approx(list(geom.bounds)), item.id
    lon, lat = np.asarray(geom.exterior.coords).T
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    back = shapely.Polygon(np.column_stack([x, y]))
    raster = box(*bounds)
    assert back.symmetric_difference(raster).area / raster.area < 1e-6, item.id


# --------------------------------------------------------------------------------------------- BigEarthNet


@pytest.fixture(scope="module")
def ben(real_data, tmp_path_factory) -> dict[str, list[pystac.Item]]:
    path = bigearthnet_catalog(real_data, tmp_path_factory.mktemp("bigearthnet"))
    assert path.name == "catalog.json" and path.exists()
    return _by_collection(_items(path))


def test_bigearthnet_items_resolve(ben, real_data):
    assert sorted(ben) == ["sentinel-1-rtc", "sentinel-2-l2a"]
    assert len(ben["sentinel-2-l2a"]) == 6 and len(ben["sentinel-1-rtc"]) == 6
    for item in ben["sentinel-2-l2a"]:
        r = resolve_item(item)
        assert (r.provider, r.modality) == (LOCAL_PROVIDER_NAME, B.S2)
        assert tuple(r.bands) == B.S2_BANDS
        assert r.masks == {}  # BigEarthNet has no SCL: masks come from nodata alone
        assert set(item.assets) == set(B.S2_BANDS)  # no B01, B09, SCL
        assert item.properties["eo:cloud_cover"] == 0.0
        res = {b: item.assets[b].extra_fields["raster:bands"][0]["spatial_resolution"] for b in B.S2_BANDS}
        assert res == {b: float(B.S2_BAND_INFO[b].native_resolution_m) for b in B.S2_BANDS}
        assert [e["common_name"] for b in B.S2_BANDS for e in item.assets[b].extra_fields["eo:bands"]] == [
            B.S2_BAND_INFO[b].common_name for b in B.S2_BANDS
        ]
        _check_map_assets(item, real_data)
    for item in ben["sentinel-1-rtc"]:
        r = resolve_item(item)
        assert (r.provider, r.modality, r.s1_values) == (LOCAL_PROVIDER_NAME, B.S1, "db")
        assert tuple(r.bands) == B.S1_BANDS and set(item.assets) == {"vv", "vh"}
        assert r.bands["VV"].href.endswith("_VV.tif") and r.bands["VH"].href.endswith("_VH.tif")
        assert item.properties["sar:polarizations"] == ["VV", "VH"]
        assert item.properties["sar:instrument_mode"] == "IW"
        assert item.properties["sar:product_type"] == "GRD"
        _check_map_assets(item, real_data)


def test_bigearthnet_s1_on_s2_patch_grid(ben, real_data):
    s2 = {item.id: item for item in ben["sentinel-2-l2a"]}
    paired = set()
    for s1 in ben["sentinel-1-rtc"]:
        patch = s1.properties["bigearthnet:s2_patch"]
        assert patch in s2, (s1.id, patch)
        paired.add(patch)
        s2_item = s2[patch]
        assert s1.properties["proj:code"] == s2_item.properties["proj:code"]
        for key in ("vv", "vh"):
            for field in ("proj:shape", "proj:transform"):
                assert s1.assets[key].extra_fields[field] == s2_item.assets["B02"].extra_fields[field], (s1.id, key)
        # Same patch, same CORINE labels; both from the labels metadata JSON.
        meta = json.loads((real_data / BIGEARTHNET_S1 / s1.id / f"{s1.id}_labels_metadata.json").read_text())
        assert s1.properties["bigearthnet:labels"] == meta["labels"] == s2_item.properties["bigearthnet:labels"]
    assert paired == set(s2)


def test_bigearthnet_datetimes(ben, real_data):
    s2 = {item.id: item for item in ben["sentinel-2-l2a"]}
    assert s2["S2A_MSIL2A_20170613T101031_87_48"].datetime == datetime(2017, 6, 13, 10, 10, 31, tzinfo=timezone.utc)
    # The names drop the hour's leading zero; one has an impossible time (second 61): the JSON's time is used.
    assert s2["S2B_MSIL2A_20170924T93020_69_24"].datetime == datetime(2017, 9, 24, 9, 30, 20, tzinfo=timezone.utc)
    assert s2["S2B_MSIL2A_20180204T94161_57_38"].datetime == datetime(2018, 2, 4, 9, 41, 56, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="invalid acquisition time"):
        bigearthnet_datetime("S2B_MSIL2A_20180204T94161_57_38")
    for folder, key, items in (
        (BIGEARTHNET_S2, "acquisition_date", ben["sentinel-2-l2a"]),
        (BIGEARTHNET_S1, "acquisition_time", ben["sentinel-1-rtc"]),
    ):
        for item in items:
            meta = json.loads((real_data / folder / item.id / f"{item.id}_labels_metadata.json").read_text())
            assert item.datetime == datetime.fromisoformat(meta[key].replace(" ", "T")).replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------------------------- NAIP


def test_naip_series(real_data, tmp_path):
    items = sorted(_items(naip_series_catalog(real_data, tmp_path / "naip")), key=lambda i: i.datetime)
    assert [i.datetime.year for i in items] == NAIP_YEARS
    assert {i.collection_id for i in items} == {"naip"}
    for item in items:
        assert item.datetime == datetime.strptime(item.id[-8:], "%Y%m%d").replace(hour=12, tzinfo=timezone.utc)
        r = resolve_item(item)
        assert (r.provider, r.modality) == (LOCAL_PROVIDER_NAME, B.HR)
        assert tuple(r.bands) == B.HR_BANDS
        assert [r.bands[b].band_index for b in B.HR_BANDS] == [1, 2, 3]
        assert {ref.asset_key for ref in r.bands.values()} == {"image"}
        eo = item.assets["image"].extra_fields["eo:bands"]
        assert [(e["name"], e["common_name"]) for e in eo] == [
            ("Red", "red"),
            ("Green", "green"),
            ("Blue", "blue"),
            ("NIR", "nir"),
        ]
        assert item.properties["proj:code"] == "EPSG:26914"
        _check_map_assets(item, real_data)
    # Each file keeps its own grid: origins shift between years and heights differ by one pixel.
    transforms = {tuple(i.assets["image"].extra_fields["proj:transform"]) for i in items}
    heights = {i.assets["image"].extra_fields["proj:shape"][0] for i in items}
    assert len(transforms) > 1 and heights == {723, 724}


# --------------------------------------------------------------------------------------------- subset


def test_subset_catalog_s2_only(demo_region, tmp_path):
    src_path, _ = demo_region
    src = pystac.Catalog.from_file(str(src_path))
    original = [i for i in src.get_items(recursive=True) if i.collection_id == "sentinel-2-l2a"]
    sub_path = subset_catalog(src_path, ["sentinel-2-l2a"], tmp_path / "s2-only")
    sub = pystac.Catalog.from_file(str(sub_path))
    items = list(sub.get_items(recursive=True))
    assert {i.collection_id for i in items} == {"sentinel-2-l2a"}
    assert len(items) == len(original) > 0
    by_id = {i.id: i for i in original}
    assert set(by_id) == {i.id for i in items}
    for item in items:
        orig = by_id[item.id]
        assert {k: a.href for k, a in item.assets.items()} == {k: a.get_absolute_href() for k, a in orig.assets.items()}
        assert all(Path(a.href).is_absolute() and Path(a.href).exists() for a in item.assets.values())
        assert item.properties == orig.properties and item.geometry == orig.geometry
        r = resolve_item(item)
        assert r.modality == B.S2 and tuple(r.bands) == B.S2_BANDS and set(r.masks) == {B.S2_SCL}
    [col] = list(sub.get_all_collections())
    [orig_col] = [c for c in src.get_all_collections() if c.id == "sentinel-2-l2a"]
    strip = lambda d: {k: v for k, v in d.items() if k != "links"}
    assert strip(col.to_dict(transform_hrefs=False)) == strip(orig_col.to_dict(transform_hrefs=False))
    with pytest.raises(KeyError, match="no collection"):
        subset_catalog(src_path, ["sentinel-2-l2a", "nope"], tmp_path / "bad")


# --------------------------------------------------------------------------------------------- GRD


@pytest.fixture(scope="module")
def grd(demo_region, tmp_path_factory) -> tuple[pystac.Item, pystac.Item]:
    """(GRD item, RTC item) for the first ascending demo RTC item."""
    src_path, _ = demo_region
    rtc = sorted(
        (
            i
            for i in pystac.Catalog.from_file(str(src_path)).get_items(recursive=True)
            if i.collection_id == "sentinel-1-rtc" and i.properties["sat:orbit_state"] == "ascending"
        ),
        key=lambda i: i.datetime,
    )[0]
    [item] = _items(grd_catalog(src_path, rtc.id, tmp_path_factory.mktemp("grd")))
    return item, rtc


def test_grd_item(grd):
    item, rtc = grd
    assert item.collection_id == "sentinel-1-grd"
    r = resolve_item(item)
    assert (r.provider, r.modality, r.profile.geometry, r.s1_values) == (
        LOCAL_PROVIDER_NAME,
        B.S1,
        "radar",
        "linear_power",
    )
    assert tuple(r.bands) == B.S1_BANDS and set(item.assets) == {"vv", "vh"}
    assert item.datetime == rtc.datetime and item.geometry == rtc.geometry and item.bbox == rtc.bbox
    for k, v in rtc.properties.items():
        if k.startswith(("sar:", "sat:")) or k == "platform":
            assert item.properties[k] == v, k
    assert "proj:code" not in item.properties
    for key in ("vv", "vh"):
        asset = item.assets[key]
        assert Path(asset.href).is_absolute() and Path(asset.href).exists()
        assert "proj:transform" not in asset.extra_fields
        assert asset.extra_fields["raster:bands"][0]["data_type"] == "float32"
        with rasterio.open(asset.href) as src, rasterio.open(rtc.assets[key].get_absolute_href()) as ref:
            assert src.transform == Affine.identity() and src.crs is None  # no map geometry at all
            gcps, gcp_crs = src.gcps
            assert len(gcps) == 121 and gcp_crs == CRS.from_epsg(4326)
            assert asset.extra_fields["proj:shape"] == [src.height, src.width] == [ref.height, ref.width]
            np.testing.assert_array_equal(src.read(1), ref.read(1)[::-1, ::-1])
            # The first GCP: the centre of GRD pixel (0, 0) is the centre of the last RTC pixel.
            g = gcps[0]
            assert (g.row, g.col) == (0.5, 0.5)
            x, y = ref.xy(ref.height - 1, ref.width - 1)  # pixel centre
            lon, lat = Transformer.from_crs(ref.crs, "EPSG:4326", always_xy=True).transform(x, y)
            assert (g.x, g.y) == pytest.approx((lon, lat), abs=1e-9)


def _warp_back_error(radar: np.ndarray, gcps, gcp_crs, ref) -> tuple[float, float]:
    """(median, 99th percentile) relative error of ``radar`` warped by ``gcps`` onto ``ref``'s grid (bilinear),
    away from a GRD_BORDER-pixel border."""
    rtc = ref.read(1)
    out = np.full(rtc.shape, np.nan, np.float32)
    reproject(
        source=radar,
        destination=out,
        gcps=gcps,
        src_crs=gcp_crs,
        src_nodata=ref.nodata,
        dst_transform=ref.transform,
        dst_crs=ref.crs,
        dst_nodata=np.nan,
        resampling=Resampling.bilinear,
    )
    b = GRD_BORDER
    got, want = out[b:-b, b:-b], rtc[b:-b, b:-b]
    assert np.isfinite(got).all() and (want > 0).all()
    rel = np.abs(got - want) / want
    return float(np.median(rel)), float(np.percentile(rel, 99))


@pytest.mark.parametrize("key", ["vv", "vh"])
def test_grd_gcps_warp_back_onto_rtc_grid(grd, key):
    item, rtc = grd
    with rasterio.open(item.assets[key].href) as src, rasterio.open(rtc.assets[key].get_absolute_href()) as ref:
        radar = src.read(1)
        median, p99 = _warp_back_error(radar, *src.gcps, ref)
        assert median < GRD_MEDIAN_MAX and p99 < GRD_P99_MAX, (median, p99)
        # The check has teeth: a half-pixel (corner instead of centre) or a missing flip fails it by far.
        for wrong in ({"offset": 0.0}, {"flip": False}):
            bad = grd_gcps(ref.transform, ref.crs, ref.shape, n=11, **wrong)
            bad_median, bad_p99 = _warp_back_error(radar, bad, CRS.from_epsg(4326), ref)
            assert bad_median > 50 * GRD_MEDIAN_MAX and bad_p99 > 10 * GRD_P99_MAX, (wrong, bad_median, bad_p99)
