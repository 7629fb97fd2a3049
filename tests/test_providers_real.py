"""Provider profiles against real STAC responses recorded from Planetary Computer and Earth Search
(../shared/data/real: pystac-client and stac-geoparquet cassettes, stac-geoparquet item lists, odc-stac items):
every Sentinel-2, Sentinel-1 and NAIP item maps to the canonical band names; anything else fails clearly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pystac
import pytest
import yaml

from pipeline import bands as B
from pipeline.providers import (
    MissingBandError,
    NoUsableBandError,
    UnknownCollectionError,
    UnknownProviderError,
    resolve_item,
)

MAPPED = {"sentinel-2-l2a", "sentinel-s2-l2a-cogs", "sentinel-1-rtc", "sentinel-1-grd", "naip"}


def _features(doc) -> list[dict]:
    if isinstance(doc, list):
        return [d for d in doc if isinstance(d, dict) and d.get("type") == "Feature"]
    if isinstance(doc, dict):
        if doc.get("type") == "Feature":
            return [doc]
        return [f for f in doc.get("features", []) if f.get("type") == "Feature"]
    return []


def real_items(root: Path) -> list[tuple[str, dict]]:
    """(source file, item dict) for every STAC item in the real recorded data."""
    out = []
    for f in sorted(root.rglob("*.json")):
        try:
            doc = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        out += [(f.name, it) for it in _features(doc)]
    for f in sorted(root.rglob("*.yaml")):
        for inter in yaml.safe_load(f.read_text()).get("interactions", []):
            body = inter["response"]["body"].get("string", "")
            try:
                doc = json.loads(body)
            except (json.JSONDecodeError, TypeError):
                continue
            out += [(f.name, it) for it in _features(doc)]
    return out


@pytest.fixture(scope="module")
def items(real_data):
    found = real_items(real_data)
    assert len(found) > 100
    return found


def test_every_s2_s1_naip_item_maps_to_named_bands(items):
    seen: dict[tuple[str, str], int] = {}
    for src, d in items:
        if d.get("collection") not in MAPPED:
            continue
        r = resolve_item(d)
        seen[(r.provider, d["collection"])] = seen.get((r.provider, d["collection"]), 0) + 1
        assert tuple(r.bands) == B.BANDS[r.modality], (src, d["id"])
        for ref in r.bands.values():
            assert ref.href.startswith(("https://", "s3://")), (src, d["id"], ref)
        if r.modality == B.S2:
            assert "scl" in r.masks["SCL"].href.rsplit("/", 1)[-1].lower()
            # Each band's raster is the file of that band (PC: ..._B04_10m.tif, Earth Search: .../B04.tif).
            for band, ref in r.bands.items():
                assert band in ref.href.rsplit("/", 1)[-1], (d["id"], band, ref.href)
        if r.modality == B.S1:
            assert r.profile.s1_values in ("linear_power", "amplitude_dn")
            assert r.profile.geometry == ("map" if d["collection"] == "sentinel-1-rtc" else "radar")
        if r.modality == B.HR:
            # NAIP "image" is R, G, B, NIR: the canonical R, G, B are bands 1, 2, 3 by eo:bands common_name.
            assert [r.bands[b].band_index for b in B.HR_BANDS] == [1, 2, 3]
            assert len({ref.href for ref in r.bands.values()}) == 1
    # Every provider/collection pair present in the recordings was exercised.
    assert seen.keys() >= {
        ("planetary-computer", "sentinel-2-l2a"),
        ("planetary-computer", "sentinel-1-rtc"),
        ("planetary-computer", "sentinel-1-grd"),
        ("planetary-computer", "naip"),
        ("earth-search", "sentinel-2-l2a"),
        ("earth-search", "sentinel-s2-l2a-cogs"),
    }, seen


def test_earth_search_v1_common_names_map_to_s2_band_names(items):
    es = [
        d
        for _, d in items
        if "earth-search.aws.element84.com/v1" in json.dumps(d.get("links", []))
        and d.get("collection") == "sentinel-2-l2a"
    ]
    assert es
    r = resolve_item(es[0])
    assert r.provider == "earth-search"
    assert r.bands["B8A"].asset_key == "nir08" and r.bands["B05"].asset_key == "rededge1"
    assert r.bands["B8A"].href.endswith("B8A.tif") and r.bands["B11"].href.endswith("B11.tif")


def test_items_parse_with_pystac_and_resolve_the_same(items):
    for _, d in items:
        if d.get("collection") in MAPPED:
            it = pystac.Item.from_dict(copy.deepcopy(d))
            assert resolve_item(it).bands == resolve_item(d).bands


def test_other_collections_fail_with_the_item_named(items):
    others = [
        d for _, d in items if d.get("collection") not in MAPPED and "planetarycomputer" in json.dumps(d["links"])
    ]
    assert {d["collection"] for d in others} >= {"landsat-c2-l2", "io-lulc-annual-v02"}
    for d in others:
        with pytest.raises(UnknownCollectionError, match=d["id"]):
            resolve_item(d)


def test_unknown_provider_is_named(items):
    """An item of no known provider is read with the generic profile; this Landsat item (DEA's ``nbart_*``
    assets, no band metadata) yields no modality's bands, and the error names it and what was looked for."""
    ga = [d for _, d in items if d["id"] == "2aa69fcf-aa55-4747-9d95-3652f9fe79b0"]  # Geoscience Australia item
    assert ga
    with pytest.raises(NoUsableBandError, match="2aa69fcf.*'generic'.*nbart_red.*looked for Sentinel-1"):
        resolve_item(ga[0])
    with pytest.raises(UnknownProviderError, match="unknown provider 'nasa'.*generic"):
        resolve_item(ga[0], provider="nasa")


def test_missing_band_names_item_and_band(items):
    s2 = next(d for _, d in items if d.get("collection") == "sentinel-2-l2a" and "B8A" in d["assets"])
    broken = copy.deepcopy(s2)
    del broken["assets"]["B8A"]
    with pytest.raises(MissingBandError, match=rf"{s2['id']}.*'B8A'"):
        resolve_item(broken)
    naip = next(d for _, d in items if d.get("collection") == "naip")
    broken = copy.deepcopy(naip)
    broken["assets"]["image"]["eo:bands"] = [{"name": "NIR", "common_name": "nir"}]
    with pytest.raises(MissingBandError, match=rf"{naip['id']}.*'red'.*'R'"):
        resolve_item(broken)
    with pytest.raises(MissingBandError, match="no band 'B01'"):
        resolve_item(s2, bands=("B01",))


def test_s2_reflectance_offset_of_real_items(items):
    """Baseline >= 04.00 products add 1000 to DN: Planetary Computer says so with s2:processing_baseline,
    Earth Search v1 with raster:bands offset/scale; both must give -1000, older products 0."""
    from pipeline.cube import s2_dn_offset

    pc = [d for _, d in items if d.get("collection") == "sentinel-2-l2a" and "B04" in d["assets"]]
    es = [d for _, d in items if d.get("collection") == "sentinel-2-l2a" and "red" in d["assets"]]
    assert pc and es
    for d in pc:
        it = pystac.Item.from_dict(copy.deepcopy(d))
        expect = -1000 if float(d["properties"]["s2:processing_baseline"]) >= 4 else 0
        assert s2_dn_offset(it, "B04") == expect, (d["id"], d["properties"]["s2:processing_baseline"])
    assert {s2_dn_offset(pystac.Item.from_dict(copy.deepcopy(d)), "B04") for d in pc} >= {-1000}
    for d in es:
        assert s2_dn_offset(pystac.Item.from_dict(copy.deepcopy(d)), "red") == -1000
