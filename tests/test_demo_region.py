"""The embedded demo region: STAC items as documented, assets that agree with their metadata, ground truth,
clouds really in the bands where SCL says so, the flood in S1, crops that differ only in timing."""

from __future__ import annotations

import hashlib
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
from rio_cogeo.cogeo import cog_validate

from pipeline import bands as B
from pipeline import demo
from pipeline.cog import hex_rgba
from pipeline.providers import DEMO_PROVIDER_NAME, resolve_item
from pipeline.stac import SearchQuery, StaticCatalogSource

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalog(demo_region):
    path, cfg = demo_region
    return pystac.Catalog.from_file(str(path)), cfg


@pytest.fixture(scope="module")
def items(catalog):
    cat, _ = catalog
    by: dict[str, list[pystac.Item]] = {}
    for it in cat.get_items(recursive=True):
        by.setdefault(it.collection_id, []).append(it)
    for v in by.values():
        v.sort(key=lambda i: i.datetime)
    return by


def _read(item: pystac.Item, key: str) -> np.ndarray:
    with rasterio.open(item.assets[key].href) as src:
        return src.read(1)


def _clearest(items):
    return min(items, key=lambda i: (i.properties["eo:cloud_cover"], i.properties["s2:nodata_pixel_percentage"]))


def test_collections_and_cadence(items, catalog):
    _, cfg = catalog
    assert set(items) == {"sentinel-2-l2a", "sentinel-1-rtc", "hr-rgb"}
    for cid, step, lo in (("sentinel-2-l2a", 5, 70), ("sentinel-1-rtc", 6, 58)):
        its = items[cid]
        assert len(its) >= lo
        gaps = np.diff([i.datetime.toordinal() for i in its])
        assert np.median(gaps) == step and gaps.max() <= step
        assert its[0].datetime.year == its[-1].datetime.year == cfg.year
        assert (its[-1].datetime - its[0].datetime).days > 350
    assert 1 <= len(items["hr-rgb"]) <= 2
    ccs = [i.properties["eo:cloud_cover"] for i in items["sentinel-2-l2a"]]
    assert min(ccs) == 0 and max(ccs) > 80 and len(set(ccs)) > 30, "eo:cloud_cover must vary"


def test_items_carry_extensions_and_absolute_hrefs_that_resolve(items):
    for cid, its in items.items():
        for it in its:
            exts = " ".join(it.stac_extensions)
            assert "projection" in exts and "raster" in exts, it.id
            assert it.properties["proj:code"] == "EPSG:32632"
            assert {p["name"] for p in it.properties["providers"]} == {DEMO_PROVIDER_NAME}
            for key, asset in it.assets.items():
                assert Path(asset.href).is_absolute() and Path(asset.href).exists(), (it.id, key)
                assert "proj:shape" in asset.extra_fields and "raster:bands" in asset.extra_fields
            if cid == "sentinel-2-l2a":
                assert "eo" in exts and isinstance(it.properties["eo:cloud_cover"], float)
                assert set(B.S2_BANDS) | {"SCL"} <= set(it.assets)
            if cid == "sentinel-1-rtc":
                assert "sar" in exts and "sat" in exts
                assert it.properties["sar:instrument_mode"] == "IW"
                assert it.properties["sar:polarizations"] == ["VV", "VH"]
                assert it.properties["sar:frequency_band"] == "C"
                assert it.properties["sat:orbit_state"] in ("ascending", "descending")
                assert set(it.assets) == {"vv", "vh"}  # Planetary Computer keys
            if cid == "hr-rgb":
                assert [b["common_name"] for b in it.assets["image"].extra_fields["eo:bands"]] == [
                    "red",
                    "green",
                    "blue",
                ]


def test_assets_match_their_metadata(items, catalog):
    """dtype, nodata, native resolution, shape and transform in the COG = what the item declares."""
    _, cfg = catalog
    it = items["sentinel-2-l2a"][0]
    for key, asset in it.assets.items():
        with rasterio.open(asset.href) as src:
            rb = asset.extra_fields["raster:bands"][0]
            assert src.dtypes[0] == rb["data_type"] and src.nodata == rb["nodata"]
            assert list(src.shape) == asset.extra_fields["proj:shape"]
            assert list(src.transform)[:6] == asset.extra_fields["proj:transform"]
            assert src.crs.to_epsg() == 32632
            res = B.S2_BAND_INFO[key].native_resolution_m if key in B.S2_BAND_INFO else 20
            assert src.res == (res, res), key
        valid, errors, _ = cog_validate(asset.href, quiet=True)
        assert valid, (key, errors)
    s1 = items["sentinel-1-rtc"][0]
    with rasterio.open(s1.assets["vv"].href) as src:
        assert src.dtypes[0] == "float32" and src.res == (10, 10)
        vv = src.read(1)
    db = 10 * np.log10(vv)
    assert -30 < np.median(db) < 0, "linear gamma0 in a plausible range"
    hr = items["hr-rgb"][0]
    with rasterio.open(hr.assets["image"].href) as src:
        assert src.count == 3 and src.dtypes[0] == "uint8"
        assert src.res == (cfg.hr_res_m, cfg.hr_res_m)
        assert src.shape == (cfg.s2_px * cfg.hr_ratio,) * 2
        assert src.block_shapes[0] == (512, 512) and src.overviews(1), "tiled, with overviews"


def test_every_item_maps_through_the_demo_profile(items):
    for its in items.values():
        for it in its:
            r = resolve_item(it)  # provider detected from the items' 'providers' metadata
            assert r.provider == DEMO_PROVIDER_NAME
            assert tuple(r.bands) == B.BANDS[r.modality]
            if r.modality == B.HR:
                assert [r.bands[b].band_index for b in B.HR_BANDS] == [1, 2, 3]


def test_truth_classes_present_with_names_and_colours(demo_region):
    path, cfg = demo_region
    tdir = path.parent / "truth"
    files = [p.name for p in tdir.glob("*landcover*.tif")]
    assert "landcover_10m.tif" in files
    with rasterio.open(tdir / "landcover_10m.tif") as src:
        t = src.read(1)
        assert src.nodata == 255 and src.dtypes[0] == "uint8"
        assert src.transform == cfg.transform(10) and src.crs.to_epsg() == cfg.epsg
        names = json.loads(src.tags()["class_names"])
        cmap = src.colormap(1)
    present = set(np.unique(t).tolist())
    assert present == {c.value for c in demo.DEMO_CLASSES}, "all 7 classes present"
    assert {"water", "forest", "grassland", "built_up", "bare", "crop_early", "crop_late"} == set(names.values())
    for c in demo.DEMO_CLASSES:
        assert (t == c.value).mean() > 0.003, f"class {c.name} too rare"
        assert cmap[c.value][:3] == hex_rgba(c.color)[:3]
    # The 10 m truth is the HR class map sampled at S2 pixel centres.
    with rasterio.open(tdir / "landcover_hr.tif") as src:
        hr = src.read(1)
    r = cfg.hr_ratio
    np.testing.assert_array_equal(hr[r // 2 :: r, r // 2 :: r], t)


def test_cloudy_dates_have_clouds_in_scl_and_in_the_bands(items):
    s2 = items["sentinel-2-l2a"]
    ref = _clearest(s2)
    ref_blue = _read(ref, "B02").astype(float)
    assert ref.properties["eo:cloud_cover"] == 0
    assert not np.isin(_read(ref, "SCL"), B.SCL_CLOUDY[1:]).any(), "a 0% date has no cloud in SCL"
    cloudy = [i for i in s2 if 20 < i.properties["eo:cloud_cover"] < 95]
    assert len(cloudy) >= 10
    for it in cloudy:
        scl = _read(it, "SCL")
        valid = scl != B.SCL_NO_DATA
        cloud = np.isin(scl, (B.SCL_CLOUD_MEDIUM, B.SCL_CLOUD_HIGH, B.SCL_THIN_CIRRUS))
        assert abs(100 * cloud[valid].mean() - it.properties["eo:cloud_cover"]) < 0.5, it.id
        opaque = np.kron(scl == B.SCL_CLOUD_HIGH, np.ones((2, 2), bool))  # SCL 20 m -> the 10 m band grid
        if opaque.sum() < 50:
            continue
        blue = _read(it, "B02").astype(float)
        assert np.median(blue[opaque]) > 4000 > 3 * np.median(ref_blue[opaque]), "clouds are bright in the bands"
        shadow = np.kron(scl == B.SCL_CLOUD_SHADOW, np.ones((2, 2), bool))
        if shadow.sum() > 200:
            nir, ref_nir = _read(it, "B08").astype(float), _read(ref, "B08").astype(float)
            ratio = np.median(nir[shadow] / np.maximum(ref_nir[shadow], 1))
            assert ratio < 0.8, "cloud shadows are dark in the bands"


def test_swath_edge_dates_are_partly_nodata_with_a_matching_footprint(items, catalog):
    _, cfg = catalog
    partial = [i for i in items["sentinel-2-l2a"] if i.properties["s2:nodata_pixel_percentage"] > 0]
    assert partial, "some dates lie at a swath edge"
    full = shapely.geometry.box(*demo.region_bbox(cfg))
    for it in partial:
        b04, scl = _read(it, "B04"), _read(it, "SCL")
        nod = b04 == 0
        assert abs(100 * nod.mean() - it.properties["s2:nodata_pixel_percentage"]) < 0.5
        assert (scl[nod[::2, ::2]] == 0).mean() > 0.95, "SCL says nodata where the bands are nodata"
        geom = shapely.geometry.shape(it.geometry)
        assert geom.area < 0.97 * full.area
        assert abs(geom.area / full.area - (1 - nod.mean())) < 0.03


def test_flood_event_visible_in_s1(items, catalog, demo_region):
    path, cfg = demo_region
    fd = cfg.flood_date()
    with rasterio.open(path.parent / "truth" / f"flood_{fd:%Y%m%d}.tif") as src:
        flood = src.read(1)
        assert json.loads(src.tags()["class_names"])["1"] == "flood_water"
    wet = flood == demo.FLOOD_WATER
    assert wet.mean() > 0.01
    s1 = {i.datetime.date(): i for i in items["sentinel-1-rtc"]}
    on = 10 * np.log10(_read(s1[fd], "vv"))
    before = [d for d in s1 if d < fd][-1]
    pre = 10 * np.log10(_read(s1[before], "vv"))
    assert np.median(pre[wet]) - np.median(on[wet]) > 6, "flooded land turns dark in VV"
    dry = flood == demo.FLOOD_DRY
    assert abs(np.median(pre[dry]) - np.median(on[dry])) < 2.5, "the rest of the scene does not"


def _ndvi_curves(items, truth):
    doys, curves = [], {c: [] for c in (demo.CROP_EARLY, demo.CROP_LATE, demo.FOREST, demo.WATER)}
    for it in items["sentinel-2-l2a"]:
        if it.properties["eo:cloud_cover"] > 1 or it.properties["s2:nodata_pixel_percentage"] > 0:
            continue
        red, nir = _read(it, "B04").astype(float), _read(it, "B08").astype(float)
        ndvi = (nir - red) / (nir + red)
        doys.append(it.datetime.timetuple().tm_yday)
        for c in curves:
            curves[c].append(np.median(ndvi[truth == c]))
    return np.array(doys), {c: np.array(v) for c, v in curves.items()}


def test_crop_types_differ_only_in_timing(items, demo_region):
    path, _ = demo_region
    with rasterio.open(path.parent / "truth" / "landcover_10m.tif") as src:
        truth = src.read(1)
    doys, curves = _ndvi_curves(items, truth)
    assert len(doys) >= 15
    early, late = curves[demo.CROP_EARLY], curves[demo.CROP_LATE]
    # Same shape: equal peak and trough; different timing: the late crop peaks ~75 days later.
    assert abs(early.max() - late.max()) < 0.08 and early.max() > 0.6
    assert abs(np.percentile(early, 10) - np.percentile(late, 10)) < 0.08
    shift = doys[np.argmax(late)] - doys[np.argmax(early)]
    assert 40 < shift < 110, shift
    # Spring: early crop green, late crop bare; early autumn: the other way round.
    spring = (doys > 110) & (doys < 140)
    autumn = (doys > 215) & (doys < 250)
    if spring.any():
        assert (early[spring] - late[spring]).mean() > 0.2
    if autumn.any():
        assert (late[autumn] - early[autumn]).mean() > 0.2
    assert (curves[demo.WATER] < 0).all() and (curves[demo.FOREST] > 0.4).all()


def test_hr_texture_per_class(items, demo_region):
    path, cfg = demo_region
    with rasterio.open(path.parent / "truth" / "landcover_hr.tif") as src:
        cls = src.read(1)
    summer = [i for i in items["hr-rgb"] if i.datetime.month in (6, 7, 8)][0]
    with rasterio.open(summer.assets["image"].href) as src:
        rgb = src.read().astype(float)
    lum = rgb.mean(axis=0)
    mean = {c.name: lum[cls == c.value].mean() for c in demo.DEMO_CLASSES}
    std = {c.name: lum[cls == c.value].std() for c in demo.DEMO_CLASSES}
    assert mean["water"] < mean["forest"] < mean["bare"]
    assert std["built_up"] > 2 * std["water"], "roofs and streets make the town textured"
    assert std["forest"] > std["water"], "tree crowns and gaps"
    assert (rgb[1] > rgb[0])[cls == demo.FOREST].mean() > 0.9, "summer forest is green"


def test_generation_is_deterministic_for_a_seed(tmp_path):
    cfg = demo.DemoConfig(size_km=0.4, seed=3, hr_ratio=4)

    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.tif"))
        }

    a = digest(demo.generate(cfg, tmp_path / "a", progress=False).parent)
    b = digest(demo.generate(cfg, tmp_path / "b", progress=False, workers=1).parent)
    assert a == b and len(a) > 700
    other = demo.generate(demo.DemoConfig(size_km=0.4, seed=4, hr_ratio=4), tmp_path / "c", progress=False).parent
    assert digest(other)["truth/landcover_10m.tif"] != a["truth/landcover_10m.tif"]


def test_open_ended_interval_search_of_the_demo(demo_region):
    path, cfg = demo_region
    src = StaticCatalogSource(path)
    late = src.search(SearchQuery(collections=("sentinel-2-l2a",), datetime=f"{cfg.year}-12-20/.."))
    assert [i.datetime.date() for i in late] == [date(2024, 12, 28), date(2024, 12, 23)]


def test_cli_builds_a_region_and_rejects_bad_sizes(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--out", str(tmp_path / "r"), "--size-km", "0.3", "--hr-ratio", "2"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "r" / "catalog.json").exists() and "catalog written" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--out", str(tmp_path / "x"), "--size-km", "-1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "--size-km" in bad.stderr
    assert not (tmp_path / "x").exists()
