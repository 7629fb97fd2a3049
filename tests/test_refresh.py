"""jobs/refresh.py end to end on the demo region: real static catalogs that grow between runs, a real local Ray
cluster, real Zarr cubes, real COGs read back with rasterio, and the real stac-fastapi-pgstac server for
publishing.

The AOI is the 2 x 2 tiles (32 px + halo 4) of the demo region with the most flood water in the truth. The
catalog of the incremental runs is a copy of the demo catalog without the Sentinel-1 acquisitions from the
flood date on; "new acquisitions" are real later demo items added to it with their footprint cut to one column
of tiles, so a run must redo exactly the tiles that column holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pystac
import pytest
import rasterio
import rasterio.windows
import shapely.geometry
import torch
from pyproj import Transformer
from rio_cogeo.cogeo import cog_validate

from pipeline.evaluate import score_product
from pipeline.flood import FLOOD_PERMANENT, FLOOD_WATER, otsu_flood
from pipeline.grid import TileGrid, tiles_for_aoi
from pipeline.refresh import LATEST_JSON, LOCK, ProductLock, parse_aoi, read_latest
from skysense_core import build_model
from skysense_core.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GRID = TileGrid(32, 4)
S1 = "sentinel-1-rtc"
CUBE_FLAGS = ["--tile-px", "32", "--halo-px", "4", "--t-s2", "2", "--t-s1", "8", "--t-hr", "1", "--hr-ratio", "8"]


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def _tile_table(version_dir: Path) -> pd.DataFrame:
    """A version's per-tile state (``tiles.parquet``), indexed by tile id."""
    return pd.read_parquet(version_dir / "tiles.parquet").set_index("tile")


def refresh(args: list[str], gcs: str, timeout: float = 600) -> tuple[int, dict | None, str]:
    """Run jobs/refresh.py as its own process on the session's Ray cluster: (exit code, JSON summary, stderr)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "refresh.py"), *args, "--ray-address", gcs],
                       capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return p.returncode, json.loads(lines[-1]) if lines else None, p.stderr


def flood_aoi(catalog: Path, dcfg) -> tuple[str, list[str], list[str]]:
    """The bbox "minlon,minlat,maxlon,maxlat" of the 2 x 2 tiles with the most flood water in the truth (an AOI
    from 45 % into the first tiles to 45 % into the second), its tile ids, and the ids of the west column."""
    truth = next((catalog.parent / "truth").glob("flood_*.tif"))
    m = GRID.tile_m
    with rasterio.open(truth) as src:
        flood = src.read(1) == FLOOD_WATER
        x0, y0 = src.transform.c, src.transform.f
    best, best_xy = -1, None
    c_first, c_last = int(np.ceil(x0 / m)), int((x0 + flood.shape[1] * 10) // m) - 2
    r_first, r_last = int(np.ceil((y0 - flood.shape[0] * 10) / m)), int(y0 // m) - 2
    for c in range(c_first, c_last + 1):
        for r in range(r_first, r_last + 1):
            i0, j0 = int((y0 - (r + 2) * m) / 10), int((c * m - x0) / 10)
            n = int(flood[i0:i0 + 64, j0:j0 + 64].sum())
            if n > best:
                best, best_xy = n, (c * m, r * m)
    assert best > 200, f"the demo truth has too little flood water ({best} px) for a flood test"
    bx, by = best_xy[0] + 0.45 * m, best_xy[1] + 0.45 * m
    to_ll = Transformer.from_crs(dcfg.epsg, 4326, always_xy=True)
    (lon0, lat0), (lon1, lat1) = to_ll.transform(bx, by), to_ll.transform(bx + m, by + m)
    bbox = f"{lon0:.7f},{lat0:.7f},{lon1:.7f},{lat1:.7f}"
    tiles = tiles_for_aoi(parse_aoi(bbox), GRID)
    assert len(tiles) == 4, [t.id for t in tiles]
    west_x = min(t.transform().c for t in tiles)
    west = sorted(t.id for t in tiles if t.transform().c == west_x)
    return bbox, sorted(t.id for t in tiles), west


def copy_catalog(src: Path, dest: Path, keep) -> Path:
    """A self-contained copy of the catalog at ``src`` with the items for which ``keep(item)`` is true (asset
    hrefs absolute, into the original data)."""
    cat = pystac.Catalog.from_file(str(src))
    cat.make_all_asset_hrefs_absolute()
    new = cat.full_copy()
    for col in new.get_children():
        for it in list(col.get_items()):
            if not keep(it):
                col.remove_item(it.id)
    new.normalize_hrefs(str(dest))
    new.save(pystac.CatalogType.SELF_CONTAINED)
    return dest / "catalog.json"


def add_clipped_item(catalog: Path, item: pystac.Item, footprint) -> str:
    """Add a copy of ``item`` to ``catalog`` with its footprint cut to ``footprint`` (lon/lat polygon): an
    acquisition that covers only part of the AOI. Returns its id."""
    cat = pystac.Catalog.from_file(str(catalog))
    it = item.clone()
    it.id = f"{item.id}-part"
    geom = shapely.geometry.shape(item.geometry).intersection(footprint)
    it.geometry, it.bbox = shapely.geometry.mapping(geom), list(geom.bounds)
    it.make_asset_hrefs_absolute()
    col = cat.get_child(item.collection_id)
    col.add_item(it)
    cat.normalize_hrefs(str(catalog.parent))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    return it.id


def tile_footprint(tile_ids: list[str]):
    """Lon/lat polygon over the given tiles' cores, shrunk by more than the halo: it meets those tiles (with their
    halo) and no neighbour."""
    from pipeline.grid import parse_tile_id, to_lonlat

    tiles = [parse_tile_id(t, GRID) for t in tile_ids]
    shrink = GRID.halo_px * GRID.res_m + 10.0
    boxes = [shapely.geometry.box(*t.core_bounds()) for t in tiles]
    return to_lonlat(shapely.union_all(boxes).buffer(-shrink, join_style="mitre"), tiles[0].epsg)


def flood_pixels(truth: Path, tile_id: str) -> int:
    """Flood-water pixels of the truth inside the tile's core."""
    from pipeline.grid import parse_tile_id

    with rasterio.open(truth) as src:
        w = rasterio.windows.from_bounds(*parse_tile_id(tile_id, GRID).core_bounds(), transform=src.transform)
        return int((src.read(1, window=w.round_offsets().round_lengths(), boundless=True, fill_value=255)
                    == FLOOD_WATER).sum())


def file_digest(path: Path) -> tuple[int, int, float]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime


# ------------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def region(demo_region, ray_local):
    import ray

    catalog, dcfg = demo_region
    bbox, tiles, west = flood_aoi(catalog, dcfg)
    return {"catalog": catalog, "dcfg": dcfg, "bbox": bbox, "tiles": tiles, "west": west,
            "east": [t for t in tiles if t not in west], "flood_date": dcfg.flood_date(),
            "truth": next((catalog.parent / "truth").glob("flood_*.tif")),
            "gcs": ray.get_runtime_context().gcs_address}


# ------------------------------------------------------------------------------------------------------------------
# the Otsu baseline on its own
# ------------------------------------------------------------------------------------------------------------------
def test_otsu_flood_classes_synthetic():
    rng = np.random.default_rng(0)
    land = rng.normal(-11, 1.5, (4, 40, 40)).astype(np.float32)
    land[:, :10] = rng.normal(-22, 1.5, (4, 10, 40))  # a river in every date
    land[3, 10:20] = rng.normal(-21, 1.5, (10, 40))  # flooded on the last date only
    mask = np.ones_like(land, bool)
    mask[3, 30:, :5] = False  # no event observation there
    res = otsu_flood(land, mask, np.ones(4, bool), ["2024-10-01", "2024-10-07", "2024-10-13", "2024-10-19"])
    assert res.threshold_source == "otsu" and -20 < res.threshold_db < -13
    assert res.event_date == "2024-10-19" and res.baseline_dates == ["2024-10-01", "2024-10-07", "2024-10-13"]
    assert (res.classes[1:9, 1:-1] == FLOOD_PERMANENT).mean() > 0.95
    assert (res.classes[11:19, 1:-1] == FLOOD_WATER).mean() > 0.95
    assert (res.classes[22:29, 6:-1] == 0).mean() > 0.95
    assert (res.classes[30:, :5] == 255).all()
    dry = rng.normal(-10, 2, (3, 30, 30)).astype(np.float32)  # no water at all: no flood invented
    res = otsu_flood(dry, np.ones_like(dry, bool), np.ones(3, bool), ["a", "b", "c"])
    assert res.threshold_source == "fallback" and (res.classes == 0).mean() > 0.99


# ------------------------------------------------------------------------------------------------------------------
# incremental runs, no-op, lock, kill, publish
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.pgstac
def test_refresh_versions_only_touched_tiles(region, tmp_path, pgstac_server_transactions):
    fd = region["flood_date"]
    live = copy_catalog(region["catalog"], tmp_path / "live",
                        keep=lambda it: it.collection_id != S1 or it.datetime.date() < fd)
    state = tmp_path / "state"
    base = ["--product", "flood", "--catalog", str(live), "--aoi", region["bbox"], "--state", str(state),
            "--collections", S1, *CUBE_FLAGS,
            "--allow-href", str(region["catalog"].parent)]  # the copied items read the region's rasters

    # run 1: the first version, as of the flood date (the catalog does not have the flood acquisition yet)
    rc, out, err = refresh([*base, "--as-of", fd.isoformat()], region["gcs"])
    assert rc == 0, err
    assert out["status"] == "published" and out["affected"] == 4 and out["reused"] == 0, out
    v1 = state / "flood" / out["version"]
    assert out["version"] == f"{fd.isoformat()}/otsu1"
    v1_files = {p.relative_to(v1): file_digest(p) for p in v1.rglob("*") if p.is_file()}
    v1_bytes = {p: (v1 / p).read_bytes() for p in v1_files if p.suffix in (".tif", ".json")}
    cog = v1 / "flood.tif"
    assert cog_validate(str(cog))[0]
    with rasterio.open(cog) as src:
        assert src.dtypes[0] == "uint8" and src.nodata == 255 and src.colormap(1)[FLOOD_WATER][:3] == (31, 78, 216)
        assert json.loads(src.tags()["class_names"]) == {"0": "dry", "1": "flood_water", "2": "permanent_water"}
        arr = src.read(1)
        assert (arr == FLOOD_PERMANENT).any()
        before_flood = float((arr == FLOOD_WATER).mean())
    latest = json.loads((state / "flood" / LATEST_JSON).read_text())
    assert latest["version"] == out["version"] and (state / "flood" / "latest").resolve() == v1.resolve()
    item = pystac.Item.from_file(str(v1 / "flood.json"))
    assert item.properties["skysense:as_of"] == fd.isoformat() and item.properties["skysense:previous_version"] is None
    # the version's water extent as polygons (GeoParquet, an asset of its item): the water classes only, and
    # rasterised back they are the COG's water pixels
    import geopandas as gpd

    from pipeline.vectors import rasterise

    vec = gpd.read_parquet(v1 / "flood.parquet")
    assert set(vec["class_name"]) == {"permanent_water"} | ({"flood_water"} if before_flood else set())
    assert Path(item.assets["vectors"].get_absolute_href()) == v1 / "flood.parquet"
    back = rasterise(vec, cog)
    assert np.array_equal(back != 255, np.isin(arr, [FLOOD_WATER, FLOOD_PERMANENT]))
    assert "confidence" not in item.assets  # Otsu has no confidence
    assert Path(item.assets["report"].get_absolute_href()) == v1 / "report.html"
    assert "permanent_water" in (v1 / "report.html").read_text()
    s1_ids_before = item.properties["skysense:input_items"]
    assert s1_ids_before and all(i.startswith("S1") or "s1" in i.lower() for i in s1_ids_before)

    # the flood acquisition arrives, but only over the west column of tiles
    event = next(it for it in pystac.Catalog.from_file(str(region["catalog"])).get_items(recursive=True)
                 if it.collection_id == S1 and it.datetime.date() == fd)
    new_id = add_clipped_item(live, event, tile_footprint(region["west"]))

    # run 2, a day later, published to the real STAC API as well
    day2 = (fd + timedelta(days=1)).isoformat()
    rc, out2, err = refresh([*base, "--as-of", day2, "--publish", pgstac_server_transactions.url], region["gcs"])
    assert rc == 0, err
    assert out2["status"] == "published" and out2["previous"] == out["version"] and not out2["warnings"], out2
    v2 = state / "flood" / out2["version"]
    doc2 = json.loads((v2 / "version.json").read_text())
    assert doc2["counts"] == {"tiles": 4, "done": 4, "affected": 2, "reused": 2, "failed": 0}, doc2
    tiles2 = _tile_table(v2)  # the per-tile state, read as any Parquet reader would
    assert sorted(tiles2.index[tiles2.affected]) == region["west"], tiles2
    assert sorted(tiles2.index[tiles2.reused]) == region["east"], tiles2
    for t in region["east"]:  # reused: the very same file (a hard link), not a recomputation
        assert (v2 / "tiles" / f"{t}.tif").stat().st_ino == (v1 / "tiles" / f"{t}.tif").stat().st_ino
        assert tiles2.made_by[t] == out["version"]
    for t in region["west"]:
        assert tiles2.made_by[t] == out2["version"] and new_id in list(tiles2.seen[t])
        assert tiles2.event_date[t] == fd.isoformat()
    assert pystac.Item.from_file(str(v2 / "flood.json")).assets["tiles"].get_absolute_href() == str(
        v2 / "tiles.parquet")
    with rasterio.open(v2 / "flood.tif") as src:
        after_flood = float((src.read(1) == FLOOD_WATER).mean())
    assert after_flood > before_flood, (before_flood, after_flood)
    for t in region["west"]:  # the west tiles now show the flood that the truth has in them
        truth_n = flood_pixels(region["truth"], t)
        n1, n2 = (int((rasterio.open(v / "tiles" / f"{t}.tif").read(1) == FLOOD_WATER).sum()) for v in (v1, v2))
        assert n1 <= 0.2 * truth_n + 5 and n2 >= 0.5 * truth_n, (t, truth_n, n1, n2)
    assert json.loads((state / "flood" / LATEST_JSON).read_text())["version"] == out2["version"]
    assert (state / "flood" / "latest").resolve() == v2.resolve()
    # version 1 untouched
    assert {p.relative_to(v1): file_digest(p) for p in v1.rglob("*") if p.is_file()} == v1_files
    assert all((v1 / p).read_bytes() == b for p, b in v1_bytes.items())
    # the static collection lists both versions; the STAC API has the item, searchable by pystac-client
    col = pystac.Collection.from_file(str(state / "flood" / "collection.json"))
    assert sorted(i.id for i in col.get_items()) == sorted([item.id, f"flood-{out2['version'].replace('/', '-')}"])
    from pystac_client import Client

    api = Client.open(pgstac_server_transactions.url)
    found = list(api.search(collections=["skysense-flood"], bbox=[float(v) for v in region["bbox"].split(",")],
                            datetime=f"{fd.isoformat()}/{day2}").items())
    assert [i.id for i in found] == [f"flood-{out2['version'].replace('/', '-')}"]
    assert found[0].assets["data"].href == str((v2 / "flood.tif").resolve())
    assert out2["published"] == {pgstac_server_transactions.url: "created"}

    # the same run twice: a no-op (and the item is not published again)
    rc, out3, err = refresh([*base, "--as-of", day2, "--publish", pgstac_server_transactions.url], region["gcs"])
    assert rc == 0, err
    assert out3["status"] == "up-to-date" and out3["version"] == out2["version"], out3
    assert "nothing new" in out3["message"]
    assert sorted(p.name for p in (state / "flood").glob("*/otsu1*")) == ["otsu1", "otsu1"]

    # two runs at once: one holding the lock, the other exits cleanly at once, or waits with --wait
    with ProductLock(state / "flood" / LOCK):
        rc, out4, err = refresh([*base, "--as-of", day2], region["gcs"])
        assert rc == 0 and out4["status"] == "busy" and "pid" in out4["message"], (rc, out4, err)
    lock = ProductLock(state / "flood" / LOCK).__enter__()
    threading.Timer(4.0, lock.__exit__).start()
    t0 = time.monotonic()
    rc, out5, err = refresh([*base, "--as-of", day2, "--wait", "120"], region["gcs"])
    assert rc == 0 and out5["status"] == "up-to-date", (rc, out5, err)
    assert time.monotonic() - t0 >= 4.0  # it could not have finished before the holder let go
    assert "pid" not in (state / "flood" / LOCK).read_text()  # released by the run that had it

    # killed after its commit but before `latest` moved: the next run finds the committed version and only moves
    # `latest` (the state is put back by hand to what such a kill leaves: version 2 on disk, latest -> version 1)
    latest_doc = json.loads((state / "flood" / LATEST_JSON).read_text())
    (state / "flood" / LATEST_JSON).write_text(json.dumps({**latest_doc, "version": out["version"]}))
    (state / "flood" / "latest").unlink()
    (state / "flood" / "latest").symlink_to(out["version"])
    v2_files = {p.relative_to(v2): file_digest(p) for p in v2.rglob("*") if p.is_file()}
    rc, out_r, err = refresh([*base, "--as-of", day2], region["gcs"])
    assert rc == 0 and out_r["status"] == "recovered" and out_r["version"] == out2["version"], (out_r, err)
    assert json.loads((state / "flood" / LATEST_JSON).read_text())["version"] == out2["version"]
    assert (state / "flood" / "latest").resolve() == v2.resolve()
    assert {p.relative_to(v2): file_digest(p) for p in v2.rglob("*") if p.is_file()} == v2_files

    # a run killed mid-way: the previous version and latest intact; the next run completes the work
    later = next(it for it in pystac.Catalog.from_file(str(region["catalog"])).get_items(recursive=True)
                 if it.collection_id == S1 and it.datetime.date() > fd)
    add_clipped_item(live, later, tile_footprint(region["east"]))
    day3 = later.datetime.date().isoformat()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "refresh.py"), *base, "--as-of", day3,
                             "--ray-address", region["gcs"]], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    seen_lines = []
    for line in proc.stderr:  # kill it once it is ingesting the affected tiles
        seen_lines.append(line)
        if "[ingest]" in line and "tiles of" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert any("2 affected" in ln for ln in seen_lines), seen_lines
    assert json.loads((state / "flood" / LATEST_JSON).read_text())["version"] == out2["version"]
    assert (state / "flood" / "latest").resolve() == v2.resolve()
    assert not (state / "flood" / day3).exists()
    assert read_latest(state / "flood")["version"] == out2["version"]
    rc, out6, err = refresh([*base, "--as-of", day3], region["gcs"])
    assert rc == 0, err
    assert out6["status"] == "published" and out6["previous"] == out2["version"] and out6["affected"] == 2, out6
    v3 = state / "flood" / out6["version"]
    tiles3 = _tile_table(v3)
    assert sorted(tiles3.index[tiles3.affected]) == region["east"]
    assert (state / "flood" / "latest").resolve() == v3.resolve()
    assert not any((state / "flood" / ".work").iterdir())  # the work of the killed run was finished and removed
    with rasterio.open(v3 / "flood.tif") as src:
        assert src.read(1).shape == rasterio.open(v2 / "flood.tif").read(1).shape


def test_refresh_bad_input(region, tmp_path):
    base = ["--catalog", str(region["catalog"]), "--aoi", region["bbox"], "--state", str(tmp_path / "s"),
            *CUBE_FLAGS]
    rc, _, err = refresh(["--product", "crop", *base], region["gcs"])
    assert rc == 2 and "--checkpoint" in err
    rc, _, err = refresh(["--product", "flood", "--catalog", str(tmp_path / "nope.json"), "--aoi", region["bbox"],
                          "--state", str(tmp_path / "s")], region["gcs"])
    assert rc == 2 and "nope.json" in err
    rc, _, err = refresh(["--product", "flood", *base[:2], "--aoi", "1,2,3", "--state", str(tmp_path / "s")],
                         region["gcs"])
    assert rc == 2 and "AOI" in err
    assert not (tmp_path / "s" / "flood" / LATEST_JSON).exists()


# ------------------------------------------------------------------------------------------------------------------
# the flood product on the demo event: the model and the Otsu baseline against the truth
# ------------------------------------------------------------------------------------------------------------------
def test_flood_event_model_and_otsu_iou(region, tmp_path):
    fd = region["flood_date"]
    torch.manual_seed(0)
    enc = save_checkpoint(tmp_path / "tiny.safetensors", build_model("tiny"), meta={"what": "random init"})
    support = json.dumps({"labels": str(region["truth"]), "tiles": [region["west"][0]]})
    rc, out, err = refresh(["--product", "flood", "--catalog", str(region["catalog"]), "--aoi", region["bbox"],
                            "--state", str(tmp_path / "state"), "--as-of", fd.isoformat(), "--checkpoint", str(enc),
                            "--support", support, "--window", "32", "--overlap", "8", *CUBE_FLAGS], region["gcs"],
                           timeout=900)
    assert rc == 0, err
    v = tmp_path / "state" / "flood" / out["version"]
    assert out["version"].startswith(f"{fd.isoformat()}/tiny-fewshot-")
    scores = {}
    for name, cog in (("model (tiny, random init, 1-shot)", v / "flood.tif"), ("otsu", v / "otsu.tif")):
        assert cog_validate(str(cog))[0], cog
        s = score_product(cog, region["truth"], num_classes=3)
        scores[name] = s
        print(f"\n[flood {fd}] {name}: IoU flood water {s.iou[FLOOD_WATER]:.3f}, permanent water "
              f"{s.iou[FLOOD_PERMANENT]:.3f}, dry {s.iou[0]:.3f}, mIoU {s.miou:.3f} over {s.pixels} px")
    otsu = scores["otsu"]
    assert otsu.pixels > 3000
    assert otsu.iou[FLOOD_WATER] > 0.5 and otsu.iou[FLOOD_PERMANENT] > 0.5, otsu.iou
    item = pystac.Item.from_file(str(v / "flood.json"))
    assert "otsu" in item.assets and item.properties["skysense:method"] == "fewshot"
    assert item.properties["skysense:checkpoint_sha256"]


# ------------------------------------------------------------------------------------------------------------------
# the crop product: a fine-tuned head over the season-to-date series, refreshed as dates arrive
# ------------------------------------------------------------------------------------------------------------------
def test_crop_refresh_with_a_head(region, tmp_path):
    from pipeline.finetune import file_sha256, label_legend, save_head

    torch.manual_seed(0)
    model = build_model("tiny")
    enc = save_checkpoint(tmp_path / "tiny.safetensors", model, meta={"what": "random init"})
    labels = region["catalog"].parent / "truth" / "landcover_10m.tif"
    names, colors = label_legend(labels)
    in_dim = 2 * model.cfg.fusion_dim
    (tmp_path / "head").mkdir()
    head_path = save_head(tmp_path / "head" / "head.safetensors", torch.nn.Conv2d(in_dim, 7, 1), kind="linear",
                          num_classes=7, in_dim=in_dim, channels=model.cfg.uper_channels, encoder=enc, preset="tiny",
                          class_names=names, colormap=colors, window=16, labels=str(labels))
    base = ["--product", "crop", "--catalog", str(region["catalog"]), "--aoi", region["bbox"], "--state",
            str(tmp_path / "state"), "--checkpoint", str(tmp_path / "head"), "--season-start", "2024-04-01",
            "--window", "16", "--overlap", "4", *CUBE_FLAGS]
    rc, out, err = refresh([*base, "--as-of", "2024-05-15"], region["gcs"], timeout=900)
    assert rc == 0, err
    assert out["version"] == f"2024-05-15/tiny-head-{file_sha256(head_path)[:10]}" and out["affected"] == 4, out
    v1 = tmp_path / "state" / "crop" / out["version"]
    with rasterio.open(v1 / "crop.tif") as src:
        assert cog_validate(str(v1 / "crop.tif"))[0]
        assert {int(k): v for k, v in json.loads(src.tags()["class_names"]).items()} == names
        assert src.colormap(1)[5][:3] == colors[5][:3]
        arr = src.read(1)
        assert arr.shape[0] >= 64 and (arr != 255).mean() > 0.95 and set(np.unique(arr)) <= set(range(7)) | {255}
    item = pystac.Item.from_file(str(v1 / "crop.json"))
    assert item.properties["skysense:method"] == "head" and item.properties["skysense:head_sha256"]
    with rasterio.open(v1 / "confidence.tif") as src:  # the model's confidence beside its class map
        conf = src.read(1)
        assert src.nodata == 255 and np.array_equal(conf == 255, arr == 255) and conf[arr != 255].max() <= 100
    assert Path(item.assets["confidence"].get_absolute_href()) == v1 / "confidence.tif"
    assert Path(item.assets["vectors"].get_absolute_href()) == v1 / "crop.parquet"
    assert item.common_metadata.start_datetime.date().isoformat() == "2024-04-01"
    # two weeks later: new S2 and S1 dates over every tile -> every tile is predicted again from the longer series
    rc, out2, err = refresh([*base, "--as-of", "2024-05-29"], region["gcs"], timeout=900)
    assert rc == 0, err
    assert out2["status"] == "published" and out2["affected"] == 4 and out2["previous"] == out["version"], out2
    seen1 = _tile_table(v1).seen
    seen2 = _tile_table(tmp_path / "state" / "crop" / out2["version"]).seen
    assert all(len(seen2[t]) > len(seen1[t]) for t in region["tiles"])
