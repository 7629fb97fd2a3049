"""Real tests of the local STAC API (infra/stac-api + tests/pgstac_fixture.py).

The read-only session server ``pgstac_server`` is used for search tests; the
Transactions extension is tested on the second session server
``pgstac_server_transactions``. No mocks: real PostgreSQL/PostGIS, pgstac, uvicorn.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from pathlib import Path

import pystac
import pytest
import requests
from pystac_client import Client

pytestmark = pytest.mark.pgstac

BBOX = [9.0, 45.0, 9.1, 45.1]
GEOM = {
    "type": "Polygon",
    "coordinates": [[[9.0, 45.0], [9.1, 45.0], [9.1, 45.1], [9.0, 45.1], [9.0, 45.0]]],
}


def make_catalog(root: Path, collection_id: str, clouds=(5, 50, 90)) -> Path:
    """Static catalog: 1 collection, one item per cloud cover value, absolute asset hrefs."""
    cat = pystac.Catalog("test-root", "test catalog")
    coll = pystac.Collection(
        collection_id,
        "test collection",
        pystac.Extent(
            pystac.SpatialExtent([BBOX]),
            pystac.TemporalExtent([[dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc), None]]),
        ),
    )
    cat.add_child(coll)
    for i, cc in enumerate(clouds):
        item = pystac.Item(
            f"{collection_id}-item-{i}",
            GEOM,
            BBOX,
            dt.datetime(2024, 6, 1 + i, tzinfo=dt.timezone.utc),
            {"eo:cloud_cover": cc, "platform": "sentinel-2a"},
        )
        item.add_asset("B04", pystac.Asset(str(root / "data" / f"B04_{i}.tif"), media_type=pystac.MediaType.COG))
        coll.add_item(item)
    cat.normalize_hrefs(str(root / "catalog"))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog" / "catalog.json"


@pytest.fixture(scope="module")
def loaded(pgstac_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("stac-cat")
    catalog = make_catalog(root, "test-pgstac-s2")
    pgstac_server.load_catalog(catalog)
    return pgstac_server, "test-pgstac-s2", root


def _search_ids(url: str, collection: str, **kw) -> list[str]:
    items = Client.open(url).search(collections=[collection], **kw).items()
    return sorted(it.id for it in items)


def test_ping(pgstac_server):
    with urllib.request.urlopen(f"{pgstac_server.url}/_mgmt/ping", timeout=10) as r:
        assert r.status == 200
        assert json.load(r) == {"message": "PONG"}


def test_all_items_present_with_absolute_hrefs(loaded):
    srv, coll, root = loaded
    ids = _search_ids(srv.url, coll)
    assert ids == [f"{coll}-item-{i}" for i in range(3)]
    r = requests.get(f"{srv.url}/collections/{coll}/items", timeout=10)
    r.raise_for_status()
    feats = r.json()["features"]
    assert len(feats) == 3
    for f in feats:
        assert f["collection"] == coll
        href = f["assets"]["B04"]["href"]
        assert href.startswith(str(root / "data")), href


def test_cloud_filter_is_numeric(loaded):
    srv, coll, _ = loaded
    assert _search_ids(srv.url, coll, query={"eo:cloud_cover": {"lt": 20}}) == [f"{coll}-item-0"]
    assert _search_ids(srv.url, coll, query={"eo:cloud_cover": {"gte": 50}}) == [f"{coll}-item-1", f"{coll}-item-2"]
    assert _search_ids(srv.url, coll, filter={"op": "<", "args": [{"property": "eo:cloud_cover"}, 60]}) == [
        f"{coll}-item-0",
        f"{coll}-item-1",
    ]
    r = requests.get(f"{srv.url}/collections/{coll}/queryables", timeout=10)
    r.raise_for_status()
    assert r.json()["properties"]["eo:cloud_cover"]["type"] == "number"


def test_sort_is_numeric(pgstac_server, tmp_path):
    # Without the to_float queryable pgstac sorts eo:cloud_cover as text: 80, 5, 10.
    coll = "test-pgstac-sort"
    pgstac_server.load_catalog(make_catalog(tmp_path, coll, clouds=(5, 10, 80)))
    r = requests.post(
        f"{pgstac_server.url}/search",
        json={"collections": [coll], "sortby": [{"field": "properties.eo:cloud_cover", "direction": "desc"}]},
        timeout=10,
    )
    r.raise_for_status()
    assert [f["properties"]["eo:cloud_cover"] for f in r.json()["features"]] == [80, 10, 5]


def test_load_twice_is_idempotent(loaded):
    srv, coll, root = loaded
    srv.load_catalog(root / "catalog" / "catalog.json")
    r = requests.post(f"{srv.url}/search", json={"collections": [coll], "limit": 100}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert len(body["features"]) == 3
    assert body["numberMatched"] == 3  # pgstac context setting is on
    assert Client.open(srv.url).search(collections=[coll]).matched() == 3
    colls = [c["id"] for c in requests.get(f"{srv.url}/collections", timeout=10).json()["collections"]]
    assert colls.count(coll) == 1


def test_read_only_server_has_no_transactions(pgstac_server):
    conf = requests.get(f"{pgstac_server.url}/conformance", timeout=10).json()["conformsTo"]
    assert not any("transaction" in c for c in conf)


def test_transactions_publish_item(pgstac_server_transactions, tmp_path):
    srv = pgstac_server_transactions
    coll = "test-pgstac-published"
    srv.load_catalog(make_catalog(tmp_path, coll, clouds=(30,)))
    item = pystac.Item(
        f"{coll}-new",
        GEOM,
        BBOX,
        dt.datetime(2024, 7, 1, tzinfo=dt.timezone.utc),
        {"eo:cloud_cover": 12.5},
        collection=coll,
    )
    item.add_asset("B04", pystac.Asset("/data/products/new_B04.tif", media_type=pystac.MediaType.COG))
    d = item.to_dict(include_self_link=False)
    r = requests.post(f"{srv.url}/collections/{coll}/items", json=d, timeout=10)
    assert r.status_code in (200, 201), r.text
    assert _search_ids(srv.url, coll, query={"eo:cloud_cover": {"lt": 20}}) == [f"{coll}-new"]
    got = requests.get(f"{srv.url}/collections/{coll}/items/{coll}-new", timeout=10).json()
    assert got["assets"]["B04"]["href"] == "/data/products/new_B04.tif"
    # a second POST of the same id is a conflict; PUT updates it
    assert requests.post(f"{srv.url}/collections/{coll}/items", json=d, timeout=10).status_code == 409
    d["properties"]["eo:cloud_cover"] = 40
    r = requests.put(f"{srv.url}/collections/{coll}/items/{coll}-new", json=d, timeout=10)
    assert r.status_code == 200, r.text
    assert _search_ids(srv.url, coll, query={"eo:cloud_cover": {"lt": 20}}) == []
