"""A user's own catalog, which no provider profile knows: the ``generic`` profile finds its bands from the items'
own metadata (real recorded items with their provider links stripped; a catalog of plain GeoTIFFs built from the
demo region with renamed collections and assets, no provider metadata, Sentinel-1 already in dB without a
unit), and an ingest that could only produce an empty cube does not pass for a success."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio

from pipeline.cube import CubeConfig
from pipeline.grid import TileGrid
from pipeline.providers import GENERIC_PROVIDER_NAME, NoUsableBandError, resolve_item
from tests.demo_cube import SEASON, aoi_2x2_tiles, ingest_2x2_tiles

REPO = Path(__file__).resolve().parents[1]
CFG = CubeConfig(grid=TileGrid(32, 8), t_s2=3, t_s1=2, t_hr=1, hr_ratio=8)
REGION: list[Path] = []  # the demo region's directory, set by the tests that run jobs/ingest.py
MAPPED = {"sentinel-2-l2a", "sentinel-s2-l2a-cogs", "sentinel-1-rtc", "sentinel-1-grd", "naip"}


def _strip(d: dict) -> dict:
    """An item as a user's catalog has it: no links to a provider, no ``providers`` metadata."""
    d = copy.deepcopy(d)
    d["links"] = []
    d.get("properties", {}).pop("providers", None)
    return d


def test_real_items_without_provider_resolve_as_their_profile_does(real_data):
    """Every recorded Planetary Computer / Earth Search Sentinel-1, Sentinel-2 and NAIP item, stripped of what
    names its provider, resolves with the generic profile to the same modality, assets, bands and masks."""
    from tests.test_providers_real import real_items

    n = 0
    for _, d in real_items(real_data):
        if d.get("collection") not in MAPPED:
            continue
        known = resolve_item(d)
        generic = resolve_item(_strip(d))
        assert generic.provider == GENERIC_PROVIDER_NAME
        assert generic.modality == known.modality, d["id"]
        assert {b: (r.asset_key, r.band_index) for b, r in generic.bands.items()} == \
            {b: (r.asset_key, r.band_index) for b, r in known.bands.items()}, d["id"]
        assert set(generic.masks) == set(known.masks), d["id"]
        n += 1
    assert n > 100


def test_an_item_with_no_usable_band_is_named():
    item = {"type": "Feature", "id": "mystery", "collection": "stuff", "properties": {}, "links": [],
            "assets": {"thumbnail": {"href": "t.png", "roles": ["thumbnail"]}, "foo": {"href": "foo.tif"}}}
    with pytest.raises(NoUsableBandError, match=r"'mystery'.*\['foo', 'thumbnail'\].*VV\+VH.*B02\+B03"):
        resolve_item(item)
    coarse = {**item, "properties": {"gsd": 30}, "assets": {c: {"href": f"{c}.tif"} for c in ("red", "green", "blue")}}
    with pytest.raises(NoUsableBandError, match="gsd <= 5"):  # 30 m RGB is not high-resolution imagery
        resolve_item(coarse)
    assert resolve_item({**coarse, "properties": {"gsd": 0.6}}).modality == "hr"


def _user_catalog(region: Path, out: Path, s1_nodata: bool = False, only_s1: bool = False) -> Path:
    """The demo region's S2, S1 and HR items of the test season as a user's own catalog (module docstring): S2
    assets renamed ``band_1``.. with only common names and wavelengths, S1 rewritten in dB as ``VV`` / ``VH``
    without any unit (or all nodata), HR as is; collections ``my-s2``, ``my-s1``, ``my-aerial``."""
    src = pystac.Catalog.from_file(str(region))
    cat = pystac.Catalog("user", "a user's own catalog")
    renamed = {"sentinel-2-l2a": "my-s2", "sentinel-1-rtc": "my-s1", "hr-rgb": "my-aerial"}
    cols = {}
    for item in src.get_items(recursive=True):
        new = renamed.get(item.collection_id)
        if new is None or not (SEASON[0] <= item.datetime.date() <= SEASON[1]):
            continue
        if only_s1 and new != "my-s1":
            continue
        d = _strip(item.to_dict(transform_hrefs=False))
        d["collection"] = new
        if new == "my-s2":
            assets = {}
            for i, (key, a) in enumerate(sorted(d["assets"].items())):
                if "eo:bands" in a:
                    a["eo:bands"] = [{k: v for k, v in b.items() if k in ("common_name", "center_wavelength")}
                                     for b in a["eo:bands"]]
                assets[f"band_{i + 1}" if "eo:bands" in a else key] = a
            d["assets"] = assets
        elif new == "my-s1":
            folder = out / "s1-db" / d["id"]
            folder.mkdir(parents=True, exist_ok=True)
            for key in ("vv", "vh"):
                a = d["assets"].pop(key)
                with rasterio.open(a["href"]) as r:
                    v = r.read(1).astype(np.float64)
                    profile = {**r.profile, "nodata": None}
                    bad = (v == r.nodata) | ~(v > 0)
                db = np.where(bad | s1_nodata, np.nan, 10 * np.log10(np.where(bad, 1.0, v))).astype(np.float32)
                with rasterio.open(folder / f"{key}.tif", "w", **{**profile, "dtype": "float32"}) as w:
                    w.write(db, 1)
                d["assets"][key.upper()] = {"href": str(folder / f"{key}.tif"), "type": a["type"], "roles": ["data"]}
        it = pystac.Item.from_dict(d)
        if new not in cols:
            cols[new] = pystac.Collection(new, new, pystac.Extent(pystac.SpatialExtent([list(item.bbox)]),
                                                                   pystac.TemporalExtent([[None, None]])))
            cat.add_child(cols[new])
        cols[new].add_item(it)
    cat.normalize_hrefs(str(out))  # the dB rasters (out/s1-db) lie in the catalog's tree; the rest is allowed
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    return out / "catalog.json"


def test_a_users_catalog_ingests_like_the_known_one(demo_region, ray_local, tmp_path):
    """The same 2 x 2 tiles from the demo catalog and from the user's version of it: the same valid dates, the
    same S2 and HR values, S1 within rounding (it was stored in dB, and is read as dB because its values are
    negative although no metadata says so)."""
    import xarray as xr

    catalog, dcfg = demo_region
    user = _user_catalog(catalog, tmp_path)
    for item in pystac.Catalog.from_file(str(user)).get_items(recursive=True):
        assert resolve_item(item).provider == GENERIC_PROVIDER_NAME
    _, ref = ingest_2x2_tiles(catalog, dcfg, CFG, tmp_path / "ref.zarr")
    _, got = ingest_2x2_tiles(user, dcfg, CFG, tmp_path / "user.zarr", allow_hrefs=[str(catalog.parent)])
    assert sorted(got.done) == sorted(ref.done) and got.valid_pixels == ref.valid_pixels > 0
    assert any("read as dB" in w for ws in got.warnings.values() for w in ws)
    for t in ref.done:
        a = xr.open_zarr(tmp_path / "ref.zarr" / "tiles" / t, zarr_format=3)
        b = xr.open_zarr(tmp_path / "user.zarr" / "tiles" / t, zarr_format=3)
        for m in ("s2", "s1", "hr"):
            np.testing.assert_array_equal(a[f"{m}_valid"].values, b[f"{m}_valid"].values)
        np.testing.assert_array_equal(a["s2"].values, b["s2"].values)
        np.testing.assert_array_equal(a["hr"].values, b["hr"].values)
        np.testing.assert_allclose(a["s1"].values, b["s1"].values, atol=1e-3, equal_nan=True)


def _ingest(catalog: Path, dcfg, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """jobs/ingest.py on the test's 2 x 2 tiles (the region's rasters allowed: the user catalog reads them)."""
    import ray

    bbox = [f"{v:.6f}" for v in aoi_2x2_tiles(dcfg, CFG).bounds]
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "ingest.py"), "--catalog", str(catalog), f"--bbox={','.join(bbox)}",
         "--start", SEASON[0].isoformat(), "--end", SEASON[1].isoformat(), "--out", str(out),
         "--tile-px", "32", "--halo-px", "8", "--t-s2", "3", "--t-s1", "2", "--t-hr", "1",
         "--ray-address", ray.get_runtime_context().gcs_address, "--allow-href", str(REGION[0]), *extra],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=600)


def test_an_ingest_with_no_valid_date_does_not_exit_0(demo_region, ray_local, tmp_path):
    catalog, dcfg = demo_region
    REGION[:] = [catalog.parent]
    user = _user_catalog(catalog, tmp_path, s1_nodata=True, only_s1=True)
    r = _ingest(user, dcfg, tmp_path / "cube.zarr")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no valid date in any tile" in r.stderr and "NO VALID DATE" in r.stdout


def test_items_without_a_usable_band_stop_the_ingest_before_it_starts(demo_region, ray_local, tmp_path):
    catalog, dcfg = demo_region
    REGION[:] = [catalog.parent]
    user = _user_catalog(catalog, tmp_path, only_s1=True)
    for f in (tmp_path / "my-s1").rglob("*.json"):
        d = json.loads(f.read_text())
        if d.get("type") == "Feature":
            d["assets"] = {f"layer_{i}": a for i, a in enumerate(d["assets"].values())}
            f.write_text(json.dumps(d))
    r = _ingest(user, dcfg, tmp_path / "cube.zarr")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "yields the bands of a requested modality" in r.stderr and "layer_0" in r.stderr
    assert not (tmp_path / "cube.zarr").exists()  # refused before anything was written
