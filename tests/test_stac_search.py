"""One search interface, two back ends: a real pgstac STAC API (stac-fastapi-pgstac, started by the test
session) and the static catalog searched in-process must return the same item ids, in the same order, for the
same queries. Bad input fails with a clear message; transient API errors are retried, client errors are not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pystac
import pytest

from pipeline import demo
from pipeline.stac import (
    CatalogFormatError,
    CatalogNotFoundError,
    CollectionNotFoundError,
    EmptySearchError,
    RetryPolicy,
    StacApiError,
    StacApiSource,
    StaticCatalogSource,
    open_source,
    search,
)
from tests.faulty_proxy import Fault, FaultyProxy
from tests.pgstac_fixture import start_pgstac

pytestmark = pytest.mark.pgstac
REPO = Path(__file__).resolve().parents[1]
FAST_RETRY = RetryPolicy(retries=3, backoff_s=0.05, timeout_s=10)


@pytest.fixture(scope="module")
def demo_api(demo_region):
    """A pgstac STAC API of its own holding exactly the demo catalog (the session server is shared)."""
    path, _ = demo_region
    workdir = Path(tempfile.mkdtemp(prefix="pgstac-demo-", dir="/tmp"))
    workdir.chmod(0o755)
    server = start_pgstac(workdir)
    try:
        server.load_catalog(path)
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def sources(demo_api, demo_region):
    path, _ = demo_region
    return StacApiSource(demo_api, retry=FAST_RETRY), StaticCatalogSource(path)


def _queries(cfg: demo.DemoConfig) -> dict[str, dict]:
    x0, y0, x1, y1 = demo.region_bbox(cfg)
    w, h = x1 - x0, y1 - y0
    west = (x0, y0, x0 + 0.2 * w, y1)  # swath-edge items whose footprint misses it drop out
    tri = {"type": "Polygon", "coordinates": [[[x0 + 0.8 * w, y0], [x1, y0], [x1, y0 + 0.2 * h], [x0 + 0.8 * w, y0]]]}
    return {
        "all": {},
        "one collection": {"collections": ["sentinel-1-rtc"]},
        "two collections": {"collections": ["sentinel-2-l2a", "hr-rgb"]},
        "bbox whole": {"bbox": (x0, y0, x1, y1)},
        "bbox west strip": {"collections": ["sentinel-2-l2a"], "bbox": west},
        "bbox elsewhere": {"bbox": (10.0, 46.0, 10.1, 46.1)},
        "intersects triangle": {"collections": ["sentinel-2-l2a"], "intersects": tri},
        "datetime range": {"datetime": "2024-03-01/2024-03-31"},
        "datetime month": {"collections": ["sentinel-2-l2a"], "datetime": "2024-06"},
        "datetime open start": {"datetime": "../2024-01-20"},
        "datetime open end": {"datetime": "2024-12-15/.."},
        "datetime instant": {"datetime": "2024-05-18T11:00:00Z"},
        "datetime day": {"datetime": "2024-10-22"},
        "cloud lt 20": {"collections": ["sentinel-2-l2a"], "query": {"eo:cloud_cover": {"lt": 20}}},
        "cloud gte 50 summer": {
            "collections": ["sentinel-2-l2a"],
            "datetime": "2024-06-01/2024-08-31",
            "query": {"eo:cloud_cover": {"gte": 50}},
        },
        "cloud between": {"query": {"eo:cloud_cover": {"gt": 5, "lte": 30}}},
        "platform eq": {"query": {"platform": {"eq": "Sentinel-2B"}}},
        "cql2 filter": {
            "collections": ["sentinel-2-l2a"],
            "filter": {
                "op": "and",
                "args": [
                    {"op": "<", "args": [{"property": "eo:cloud_cover"}, 10]},
                    {"op": "=", "args": [{"property": "platform"}, "Sentinel-2A"]},
                ],
            },
        },
        "paging small pages": {"collections": ["sentinel-2-l2a"], "limit": 7},
        "paging max_items": {"limit": 4, "max_items": 10},
        "max_items filtered": {"collections": ["sentinel-1-rtc"], "datetime": "2024-07/..", "max_items": 5},
    }


def test_search_parity_pgstac_vs_static(sources, demo_region):
    api, static = sources
    _, cfg = demo_region
    for name, q in _queries(cfg).items():
        got_api = [i.id for i in search(api, allow_empty=True, **q)]
        got_static = [i.id for i in search(static, allow_empty=True, **q)]
        assert got_api == got_static, f"{name}: api {len(got_api)} vs static {len(got_static)} items"
    # The queries are not vacuous: they select different, non-trivial subsets.
    counts = {n: len(search(static, allow_empty=True, **q)) for n, q in _queries(cfg).items()}
    assert counts["all"] == 136 and counts["bbox elsewhere"] == 0
    assert 0 < counts["bbox west strip"] < counts["one collection"] + 73
    assert 0 < counts["cloud lt 20"] < 73 and counts["paging max_items"] == 10
    assert counts["datetime instant"] == 1 and counts["datetime day"] == 1
    assert counts["intersects triangle"] < 73 or counts["bbox west strip"] < 73, "a swath-edge item drops out"


def test_api_paging_follows_next_links(demo_api):
    with FaultyProxy(demo_api, lambda m, p, n: None) as proxy:
        items = search(StacApiSource(proxy.url, retry=FAST_RETRY), collections=["sentinel-2-l2a"], limit=10)
        assert len(items) == 73
        assert proxy.statuses("/search").count(200) == 8, "73 items in pages of 10"


def test_api_items_load_like_static_items(sources):
    """Both back ends give items with absolute asset hrefs to the same files."""
    api, static = sources
    a = search(api, collections=["hr-rgb"])
    s = search(static, collections=["hr-rgb"])
    assert [i.assets["image"].href for i in a] == [i.assets["image"].href for i in s]
    assert all(Path(i.assets["image"].href).exists() for i in a)


def test_transient_errors_are_retried(demo_api):
    # 500 twice, then the real answer: succeeds.
    plan = lambda m, p, n: Fault(status=500) if p == "/search" and n <= 2 else None  # noqa: E731
    with FaultyProxy(demo_api, plan) as proxy:
        items = search(StacApiSource(proxy.url, retry=FAST_RETRY), collections=["hr-rgb"])
        assert len(items) == 2
        assert proxy.statuses("/search") == [500, 500, 200]
    # 503 on the landing page, then fine.
    plan = lambda m, p, n: Fault(status=503) if p == "/" and n == 1 else None  # noqa: E731
    with FaultyProxy(demo_api, plan) as proxy:
        assert search(StacApiSource(proxy.url, retry=FAST_RETRY), collections=["hr-rgb"])
        assert proxy.statuses("/")[:2] == [503, 200]
    # A stalled response (read timeout) is retried too.
    plan = lambda m, p, n: Fault(delay_s=1.5) if p == "/search" and n == 1 else None  # noqa: E731
    with FaultyProxy(demo_api, plan) as proxy:
        src = StacApiSource(proxy.url, retry=RetryPolicy(retries=3, backoff_s=0.05, timeout_s=0.5))
        assert len(search(src, collections=["hr-rgb"])) == 2


def test_persistent_server_errors_give_up_with_a_clear_message(demo_api):
    plan = lambda m, p, n: Fault(status=502) if p == "/search" else None  # noqa: E731
    with FaultyProxy(demo_api, plan) as proxy:
        src = StacApiSource(proxy.url, retry=FAST_RETRY)
        with pytest.raises(StacApiError, match=r"after 3 retries") as e:
            search(src, collections=["hr-rgb"])
        assert proxy.url in str(e.value) and "collections=['hr-rgb']" in str(e.value)
        assert proxy.statuses("/search") == [502] * 4  # 1 try + 3 retries


def test_client_error_is_reported_at_once(demo_api):
    plan = lambda m, p, n: Fault(status=400) if p == "/search" else None  # noqa: E731
    with FaultyProxy(demo_api, plan) as proxy:
        src = StacApiSource(proxy.url, retry=RetryPolicy(retries=5, backoff_s=1.0))
        t0 = time.monotonic()
        with pytest.raises(StacApiError, match=r"HTTP 400 \(client error, not retried\)") as e:
            search(src, collections=["hr-rgb"])
        assert e.value.status_code == 400
        assert proxy.statuses("/search") == [400] and time.monotonic() - t0 < 1.0


def test_a_real_4xx_from_pgstac_and_the_static_equivalent(sources):
    api, static = sources
    bad = {"eo:cloud_cover": {"xx": 3}}
    with pytest.raises(StacApiError, match=r"HTTP 400 \(client error, not retried\).*'eq'"):
        search(api, query=bad, collections=["hr-rgb"])
    with pytest.raises(ValueError, match="unsupported query operator 'xx'"):
        search(static, query=bad, collections=["hr-rgb"])


def test_unreachable_api(tmp_path):
    with pytest.raises(StacApiError, match="127.0.0.1:9"):
        StacApiSource("http://127.0.0.1:9", retry=RetryPolicy(retries=1, backoff_s=0.01, timeout_s=1))


def test_unknown_collection_both_back_ends(sources):
    for src in sources:
        with pytest.raises(CollectionNotFoundError, match=r"'sentinel-3'.*available: hr-rgb, sentinel-1-rtc"):
            search(src, collections=["sentinel-3"])


def test_empty_result_both_back_ends(sources):
    for src in sources:
        with pytest.raises(EmptySearchError, match=r"no items in .* match .*datetime=2019"):
            search(src, datetime="2019")
        assert search(src, datetime="2019", allow_empty=True) == []


def test_catalog_path_that_does_not_exist(tmp_path):
    for p in (tmp_path / "nope" / "catalog.json", tmp_path / "nope"):
        with pytest.raises(CatalogNotFoundError, match=str(p.name)):
            open_source(p)


def _small_catalog(root: Path) -> Path:
    cat = pystac.Catalog("c", "test")
    col = pystac.Collection(
        "col", "d", pystac.Extent(pystac.SpatialExtent([[0, 0, 1, 1]]), pystac.TemporalExtent([[None, None]]))
    )
    cat.add_child(col)
    for i in range(3):
        col.add_item(
            pystac.Item(
                f"i{i}",
                {"type": "Point", "coordinates": [0.5, 0.5]},
                [0.5, 0.5, 0.5, 0.5],
                pystac.utils.str_to_datetime(f"2024-01-0{i + 1}T00:00:00Z"),
                {},
            )
        )
    cat.normalize_hrefs(str(root))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def test_malformed_item_json_names_the_file(tmp_path):
    path = _small_catalog(tmp_path / "cat")
    assert len(search(path)) == 3
    bad = tmp_path / "cat" / "col" / "i1" / "i1.json"
    bad.write_text(bad.read_text()[:-20])
    with pytest.raises(CatalogFormatError, match=r"i1\.json.*not valid JSON"):
        search(path)
    bad.write_text(json.dumps({"type": "Feature", "id": "i1"}))
    with pytest.raises(CatalogFormatError, match=r"i1\.json.*not a valid STAC object"):
        search(path)
    bad.unlink()
    with pytest.raises(CatalogNotFoundError, match=r"i1\.json"):
        search(path)


def test_malformed_catalog_json(tmp_path):
    (tmp_path / "catalog.json").write_text("{not json")
    with pytest.raises(CatalogFormatError, match="catalog.json.*not valid JSON"):
        open_source(tmp_path)


def test_bad_bbox_is_rejected(sources):
    _, static = sources
    with pytest.raises(ValueError, match="min lon, min lat"):
        search(static, bbox=(10, 46, 9, 45))


def test_search_cli(demo_region, demo_api, tmp_path):
    path, _ = demo_region
    for target in (str(path), demo_api):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.stac",
                target,
                "--collections",
                "sentinel-2-l2a",
                "--datetime",
                "2024-04-01/2024-09-30",
                "--max-cloud",
                "10",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stderr
        assert "sentinel-2-l2a" in r.stdout and r.stdout.strip().endswith("items")
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.stac", str(tmp_path / "missing")], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
