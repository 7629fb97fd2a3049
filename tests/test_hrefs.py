"""The href policy (pipeline.hrefs): a catalog cannot make the pipeline read local files outside its own tree,
fetch internal addresses or use unnamed object stores, unless the user allows it; in the static catalog walk and
in an ingest (a real static catalog, a real local HTTP server, the real jobs/ingest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.hrefs import HrefPolicy, HrefRefused
from pipeline.stac import CatalogFormatError, StacApiError, StaticCatalogSource

REPO = Path(__file__).resolve().parents[1]


def test_default_policy_of_a_static_catalog(tmp_path):
    cat = tmp_path / "cat" / "catalog.json"
    cat.parent.mkdir()
    cat.write_text("{}")
    (tmp_path / "cat" / "a").mkdir()
    p = HrefPolicy.for_catalog(cat)
    p.check(str(tmp_path / "cat" / "a" / "b.tif"))
    p.check(f"file://{tmp_path}/cat/a/b.tif")
    p.check("https://example.com/x.tif")
    p.check("s3://sentinel-cogs/sentinel-s2-l2a-cogs/x.tif")  # named by the earth-search profile
    for bad, why in (("file:///etc/passwd", "outside"), ("/etc/passwd", "outside"),
                     (f"{tmp_path}/cat/../other/x.tif", "outside"), ("http://127.0.0.1:8080/x.tif", "internal"),
                     ("http://localhost/x", "internal"), ("http://169.254.169.254/latest/meta-data", "internal"),
                     ("http://[::1]/x", "internal"), ("http://10.1.2.3/x", "internal"),
                     ("s3://someone-else/x.tif", "scheme 's3'"), ("ftp://example.com/x", "scheme 'ftp'")):
        with pytest.raises(HrefRefused, match=why):
            p.check(bad, "band")
    # a link out of the tree through a symbolic link inside it is outside too
    os.symlink("/etc", tmp_path / "cat" / "a" / "etc")
    with pytest.raises(HrefRefused, match="outside"):
        p.check(str(tmp_path / "cat" / "a" / "etc" / "passwd"))
    wide = HrefPolicy.for_catalog(cat, allow=[str(tmp_path / "other"), "http://127.0.0.1:8080/"])
    wide.check(f"{tmp_path}/cat/../other/x.tif")
    wide.check("http://127.0.0.1:8080/x.tif")
    with pytest.raises(HrefRefused):
        wide.check("http://127.0.0.1:9999/x.tif")


def test_an_api_catalog_allows_its_own_origin_and_no_local_file():
    p = HrefPolicy.for_catalog("http://127.0.0.1:8082/api")
    p.check("http://127.0.0.1:8082/collections/x/items/y/data.tif")
    with pytest.raises(HrefRefused, match="STAC API"):
        p.check("/data/region/b02.tif")


def test_static_catalog_links_stay_in_its_tree(tmp_path):
    """A child link that escapes the catalog's directory with ../ is refused when the catalog is walked."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "catalog.json").write_text(json.dumps(
        {"type": "Catalog", "stac_version": "1.1.0", "id": "outside", "description": "x", "links": []}))
    cat = tmp_path / "cat"
    cat.mkdir()
    (cat / "catalog.json").write_text(json.dumps(
        {"type": "Catalog", "stac_version": "1.1.0", "id": "user", "description": "x",
         "links": [{"rel": "child", "href": "../outside/catalog.json"}]}))
    with pytest.raises(CatalogFormatError, match="outside/catalog.json.*outside the catalog's directory"):
        StaticCatalogSource(cat).collection_ids()
    assert StaticCatalogSource(cat, allow=[str(outside)]).collection_ids() == []


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a directory."""
    root = tmp_path / "www"
    root.mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_a_non_stac_url_says_so(http_dir):
    root, url = http_dir
    (root / "index.html").write_text("<html><body>not a STAC API</body></html>")
    from pipeline.stac import RetryPolicy, StacApiSource

    with pytest.raises(StacApiError, match="not STAC JSON.*landing page of a STAC API"):
        StacApiSource(url + "/", retry=RetryPolicy(retries=0))


def _ingest(catalog, out, *extra):
    return subprocess.run([sys.executable, str(REPO / "jobs" / "ingest.py"), "--catalog", str(catalog),
                           "--bbox", "9.0", "45.12", "9.02", "45.14", "--start", "2024-05-10", "--end", "2024-06-10",
                           "--out", str(out), *extra], env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                          capture_output=True, text=True, timeout=300)


def test_ingest_refuses_band_hrefs_outside_the_policy(demo_region, tmp_path, http_dir):
    """A copy of the demo catalog (its items still read the region's rasters, allowed with --allow-href) whose
    S2 item of 17 May reads /etc/passwd as B04, then an http://127.0.0.1 href: the ingest stops with exit 2 naming
    the href before anything is written."""
    catalog, _ = demo_region
    copy = tmp_path / "region"
    shutil.copytree(catalog.parent, copy, ignore=shutil.ignore_patterns("*.tif", "truth"))
    item = next(f for f in sorted((copy / "sentinel-2-l2a").rglob("*.json")) if "20240517" in f.name)
    d = json.loads(item.read_text())
    d["assets"]["B04"]["href"] = "file:///etc/passwd"
    item.write_text(json.dumps(d))
    allow = ["--allow-href", str(catalog.parent)]  # the copied items still point at the region's rasters
    r = _ingest(copy / "catalog.json", tmp_path / "cube.zarr", *allow)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 band href(s) refused" in r.stderr and "file:///etc/passwd" in r.stderr
    assert "outside the catalog's directory" in r.stderr
    assert not (tmp_path / "cube.zarr").exists()

    _, url = http_dir
    d["assets"]["B04"]["href"] = f"{url}/B04.tif"
    item.write_text(json.dumps(d))
    r = _ingest(copy / "catalog.json", tmp_path / "cube.zarr", *allow)
    assert r.returncode == 2 and "internal address" in r.stderr and f"{url}/B04.tif" in r.stderr, r.stderr[-2000:]


def test_typed_label_paths_are_the_users_but_urls_follow_the_policy(http_dir, tmp_path):
    """``--labels`` typed by the user opens any local file, but a URL to an internal address (a real server on
    127.0.0.1), an unknown scheme or GDAL's /vsicurl/ to one is refused before GDAL fetches it; public http(s)
    and object-store URLs pass the check."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from pipeline.hrefs import check_user_input
    from pipeline.labels import open_label_raster

    root, url = http_dir
    with rasterio.open(root / "labels.tif", "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8",
                       crs="EPSG:32632", transform=from_origin(500000, 5000000, 10, 10)) as dst:
        dst.write(np.zeros((1, 4, 4), np.uint8))  # served for real: only the policy stands in the way
    with open_label_raster(root / "labels.tif") as src:  # the same file by its local path opens
        assert src.shape == (4, 4)
    for ok in (str(tmp_path / "labels.tif"), "file:///data/labels.tif", "https://example.com/labels.tif",
               "s3://bucket/labels.tif", "/vsis3/bucket/labels.tif", "/vsicurl/https://example.com/l.tif"):
        check_user_input(ok, "label raster")
    with pytest.raises(HrefRefused, match="internal address"):
        open_label_raster(f"{url}/labels.tif")
    with pytest.raises(HrefRefused, match="internal address"):
        open_label_raster(f"/vsicurl/{url}/labels.tif")
    with pytest.raises(HrefRefused, match="scheme 'ftp' is not allowed"):
        open_label_raster("ftp://example.com/labels.tif")
