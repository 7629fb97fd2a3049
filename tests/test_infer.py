"""jobs/infer.py and pipeline.inference: sliding-window inference on Ray, per-tile GeoTIFFs with a manifest, the
mosaic COG, quicklook and STAC item. CPU, real local Ray (the session's ``ray_local``; the job runs as a
subprocess attached to it), real cube, no mocks: the ``tiny`` preset on 2 x 2 tiles of 32 px (+ 4 px halo) cut
from the demo region, windows of 16 px overlapping by 4."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.warp
import torch
import zarr
from rio_cogeo.cogeo import cog_validate
from safetensors.torch import save_file

from pipeline import zarr_cube
from pipeline.cube import CubeConfig
from pipeline.finetune import file_sha256, label_legend, save_head
from pipeline.grid import TileGrid, parse_tile_id
from pipeline.inference import (
    MANIFEST,
    InferenceConfig,
    TilePredictor,
    hann_window,
    parse_support,
    plan_inference,
    read_tiles_local,
    run_inference,
    valid_pixels,
    window_plan,
)
from skysense_core import build_model, get_config
from skysense_core.checkpoint import FORMAT, save_checkpoint
from tests.demo_cube import ingest_2x2_tiles

REPO = Path(__file__).resolve().parents[1]
CFG = CubeConfig(grid=TileGrid(32, 4), t_s2=3, t_s1=2, t_hr=1, hr_ratio=8)
RUN = ["--window", "16", "--overlap", "4", "--batch-size", "3"]  # 3 x 3 windows per 40-px tile sample
TEMPERATURE = 2.5  # the test head's confidence temperature (as if fitted by jobs/finetune.py)


def _tile_records(tile_dir: Path) -> dict[str, dict]:
    """The inference manifest's per-tile rows, read as any Parquet reader would (pyarrow), {tile: row}."""
    return {r["tile"]: r for r in pq.read_table(tile_dir / "manifest.parquet").to_pylist()}


# ------------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(demo_region, ray_local, tmp_path_factory):
    """2 x 2 tiles inside the demo region (the layout of tests/test_finetune.py, halo 4), a tiny random-init
    encoder and a linear head on it saved the way jobs/finetune.py saves one (with the demo legend)."""
    catalog, dcfg = demo_region
    tmp = tmp_path_factory.mktemp("infer")
    aoi, report = ingest_2x2_tiles(catalog, dcfg, CFG, tmp / "cube.zarr")
    torch.manual_seed(0)
    model = build_model("tiny")
    enc = save_checkpoint(tmp / "tiny.safetensors", model, meta={"what": "random init"})
    labels = catalog.parent / "truth" / "landcover_10m.tif"
    names, colors = label_legend(labels)
    in_dim = 2 * model.cfg.fusion_dim
    head = torch.nn.Conv2d(in_dim, 7, 1)
    (tmp / "probe").mkdir()
    save_head(tmp / "probe" / "head.safetensors", head, kind="linear", num_classes=7, in_dim=in_dim,
              channels=model.cfg.uper_channels, encoder=enc, preset="tiny", class_names=names, colormap=colors,
              window=16, labels=str(labels), temperature=TEMPERATURE)
    import ray

    return {"cube": tmp / "cube.zarr", "encoder": enc, "probe": tmp / "probe", "tmp": tmp, "aoi": aoi,
            "truth": catalog.parent / "truth", "names": names, "colors": colors,
            "gcs": ray.get_runtime_context().gcs_address, "tiles": sorted(report.done)}


def _job(setup, *args, timeout=300) -> subprocess.CompletedProcess:
    """jobs/infer.py as a subprocess, attached to the session's Ray."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, str(REPO / "jobs" / "infer.py"), "--ray-address", setup["gcs"], *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def landcover(setup):
    """One uninterrupted landcover run of the job (the reference product of the other tests)."""
    out = setup["tmp"] / "products" / "landcover.tif"
    r = _job(setup, "--cube", setup["cube"], "--checkpoint", setup["probe"], "--task", "landcover", "--out", out,
             *RUN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return out, _summary(r.stdout)


def _summary(stdout: str) -> dict:
    """The job's JSON summary line (Ray may interleave worker log lines on stdout)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith('{"complete"'):
            return json.loads(line)
    raise AssertionError(f"no summary line in {stdout[-2000:]!r}")


def _read(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _config(setup, out, **kw) -> InferenceConfig:
    base = dict(cube=str(setup["cube"]), checkpoint=str(setup["probe"]), task="landcover", out=str(out), window=16,
                overlap=4, batch_size=3)
    return InferenceConfig(**{**base, **kw})


def _direct(setup, cfg: InferenceConfig, threads: int | None = None) -> dict[str, np.ndarray]:
    """Every tile predicted in this process, without Ray: tile id -> (bands, 32, 32)."""
    plan = plan_inference(dataclasses.replace(cfg, overwrite=True), say=lambda s: None)
    before = torch.get_num_threads()
    try:
        pred = TilePredictor(dataclasses.replace(plan.spec, threads=threads))
        out = {}
        for t in plan.todo:
            batch = next(read_tiles_local(cfg.cube, [t], modalities=plan.spec.modalities))
            out[t] = pred.predict({k: v[0] for k, v in batch.items()})
        return out
    finally:
        torch.set_num_threads(before)


def _tile_window(src, tile_id: str):
    tile = parse_tile_id(tile_id, CFG.grid)
    return src.window(*tile.core_bounds())


def seam_stats(arr: np.ndarray, tile_px: int, classes: bool) -> tuple[float, float, int]:
    """(mean step across tile borders, mean step inside tiles, border pairs) between 4-neighbours of a mosaic
    (bands, H, W) whose origin is a tile corner: class disagreement (0/1) for class maps, the L2 distance of
    the feature vectors for embeddings; pairs touching nodata are left out."""
    border, inside = [], []
    for axis in (1, 2):
        a = np.take(arr, np.arange(arr.shape[axis] - 1), axis=axis)
        b = np.take(arr, np.arange(1, arr.shape[axis]), axis=axis)
        if classes:
            ok = (a[0] != 255) & (b[0] != 255)
            step = (a[0] != b[0]).astype(float)
        else:
            ok = np.isfinite(a).all(0) & np.isfinite(b).all(0)
            step = np.sqrt(((a - b) ** 2).sum(0))
        idx = np.arange(1, arr.shape[axis])
        crosses = (idx % tile_px == 0)
        crosses = crosses[:, None] if axis == 1 else crosses[None, :]
        crosses = np.broadcast_to(crosses, step.shape)
        border.append(step[ok & crosses])
        inside.append(step[ok & ~crosses])
    b, i = np.concatenate(border), np.concatenate(inside)
    return float(b.mean()), float(i.mean()), int(b.size)


# ------------------------------------------------------------------------------------------------------------------
# windows, blending, support (no Ray)
# ------------------------------------------------------------------------------------------------------------------
def test_windows_cover_every_pixel_and_the_weight_is_never_zero():
    assert window_plan(40, 16, 4) == [0, 12, 24]  # last window anchored to the edge
    assert window_plan(48, 16, 4) == [0, 12, 24, 32]
    assert window_plan(160, 32, 8) == [0, 24, 48, 72, 96, 120, 128]
    for size, w, o in ((40, 16, 4), (48, 16, 0), (160, 32, 8), (16, 16, 4)):
        starts = window_plan(size, w, o)
        cover = np.zeros(size, int)
        for s in starts:
            cover[s:s + w] += 1
        assert cover.min() >= 1 and starts[-1] + w == size
    with pytest.raises(ValueError, match="overlap"):
        window_plan(40, 16, 16)
    w = hann_window(16)
    assert w.shape == (16, 16) and w.min() > 0 and np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])
    assert w[7:9, 7:9].min() == w.max()
    # blending a field that every window predicts the same is the field itself, border pixels included
    field = np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)
    acc, wsum = np.zeros_like(field), np.zeros_like(field)
    for y in window_plan(40, 16, 4):
        for x in window_plan(40, 16, 4):
            acc[y:y + 16, x:x + 16] += field[y:y + 16, x:x + 16] * w
            wsum[y:y + 16, x:x + 16] += w
    assert np.allclose(acc / wsum, field, atol=1e-5)


def test_nodata_follows_the_models_keep_rule():
    """A pixel is valid if some modality has a usable pixel on a valid date; HR counts when half its block does."""
    r, s = 2, 4
    row = {
        "s2_mask": np.zeros((2, s, s), np.uint8), "s2_valid": np.array([True, False]),
        "hr_mask": np.zeros((1, s * r, s * r), bool), "hr_valid": np.array([True]),
    }
    row["s2_mask"][1, 0, 0] = 1  # on a padding date: does not count
    row["s2_mask"][0, 3, 3] = 1
    row["hr_mask"][0, 0:2, 2:4] = True  # block (0, 1): all 4 HR pixels
    row["hr_mask"][0, 2, 2:4] = True  # block (1, 1): 2 of 4 = half
    row["hr_mask"][0, 4, 4] = True  # block (2, 2): 1 of 4
    v = valid_pixels(row, ["hr", "s2"], r)
    assert sorted(zip(*np.nonzero(v), strict=True)) == [(0, 1), (1, 1), (3, 3)]


def test_support_argument_forms(tmp_path):
    f = tmp_path / "support.json"
    f.write_text(json.dumps({"labels": "truth.tif", "tiles": ["32N_0001_0002", "32N_0001_0003"]}))
    a = parse_support(f, tmp_path / "cube.zarr")
    assert [e.tile for e in a] == ["32N_0001_0002", "32N_0001_0003"]
    assert {e.labels for e in a} == {str(tmp_path / "truth.tif")} and a[0].cube == str(tmp_path / "cube.zarr")
    b = parse_support('[{"tile": "32N_0001_0002", "labels": "/x/a.tif", "cube": "/y/c.zarr"}]', "cube.zarr")
    assert b[0].cube == "/y/c.zarr" and b[0].labels == "/x/a.tif"
    for bad in ("[]", '{"tiles": []}', "nope.json", '[{"tile": 3}]'):
        with pytest.raises(ValueError, match="support"):
            parse_support(bad, "cube.zarr")
    # a support FILE is policed like a catalog: its paths stay in its directory tree unless allowed
    from pipeline.hrefs import HrefRefused

    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps([{"tile": "32N_0001_0002", "labels": "/etc/passwd"},
                                {"tile": "32N_0001_0003", "labels": "../elsewhere/truth.tif"}]))
    with pytest.raises(HrefRefused, match="'/etc/passwd' is a local file outside the support file's directory"):
        parse_support(evil, "cube.zarr")
    evil.write_text(json.dumps({"labels": "../elsewhere/truth.tif", "tiles": ["32N_0001_0002"]}))
    with pytest.raises(HrefRefused, match="elsewhere/truth.tif.*--allow-href"):
        parse_support(evil, "cube.zarr")
    ok = parse_support(evil, "cube.zarr", allow=[str(tmp_path.parent / "elsewhere")])
    assert ok[0].labels == str(tmp_path.parent / "elsewhere" / "truth.tif")
    evil.write_text(json.dumps({"labels": "http://127.0.0.1:9/truth.tif", "tiles": ["32N_0001_0002"]}))
    with pytest.raises(HrefRefused, match="internal address"):
        parse_support(evil, "cube.zarr")


# ------------------------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------------------------
def test_landcover_cog_matches_a_direct_prediction(setup, landcover):
    out, summary = landcover
    assert summary["complete"] and summary["done"] == 4 and summary["processed"] == 4 and summary["failed"] == 0
    assert cog_validate(str(out))[0], cog_validate(str(out))
    tiles = [parse_tile_id(t, CFG.grid) for t in setup["tiles"]]
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == tiles[0].epsg  # the AOI's UTM zone
        assert src.dtypes == ("uint8",) and src.nodata == 255 and src.count == 1
        x0 = min(t.core_bounds()[0] for t in tiles)
        y1 = max(t.core_bounds()[3] for t in tiles)
        assert src.transform.to_gdal() == (x0, 10.0, 0.0, y1, 0.0, -10.0)
        assert (src.width, src.height) == (64, 64)  # exactly the 2 x 2 tile cores
        assert src.overviews(1), "no overviews"
        assert {k: tuple(v) for k, v in src.colormap(1).items() if k < 7} == setup["colors"]
        tags = src.tags()
        assert {int(k): v for k, v in json.loads(tags["class_names"]).items()} == setup["names"]
        assert tags["task"] == "landcover" and tags["model_preset"] == "tiny"
        data = src.read(1)
        # the AOI lies inside the tile cores, and the demo data cover every pixel: no hole
        west, south, east, north = rasterio.warp.transform_bounds("EPSG:4326", src.crs, *setup["aoi"].bounds)
        assert src.bounds.left <= west and src.bounds.right >= east
        assert src.bounds.bottom <= south and src.bounds.top >= north
        assert (data != 255).all() and data.max() < 7
        assert len(np.unique(data)) >= 2
        direct = _direct(setup, _config(setup, out), threads=2)
        for t, pred in direct.items():
            got = src.read(1, window=_tile_window(src, t))
            assert np.array_equal(got, pred[0]), (t, float((got != pred[0]).mean()))
    item = json.loads(out.with_suffix(".json").read_text())
    assert any("classification" in e for e in item["stac_extensions"])
    props = item["properties"]
    assert props["skysense:model_preset"] == "tiny"
    assert props["skysense:checkpoint_sha256"] == file_sha256(setup["encoder"])
    assert props["skysense:input_items"] and props["skysense:cube"] == Path(setup["cube"]).name
    assert item["assets"]["thumbnail"]["href"].endswith(".png") and out.with_suffix(".png").stat().st_size > 0
    manifest = json.loads((out.parent / "landcover.tiles" / MANIFEST).read_text())
    assert manifest["counts"] == {"done": 4, "failed": 0}
    assert manifest["tiles_table"] == "manifest.parquet"
    rec = _tile_records(out.parent / "landcover.tiles")
    assert len(rec) == 4 and all((out.parent / "landcover.tiles" / r["file"]).exists() for r in rec.values())


def test_class_map_comes_with_confidence_polygons_report_and_cost(setup, landcover):
    """Beside the class COG: the confidence COG (uint8 percent of the top class: softmax of the blended logits at
    the head's temperature; nodata exactly where the class map's is), equal to a direct prediction's at the
    head's temperature, which it takes from the head file (a higher temperature lowers every confidence toward
    1/7, an infinite one gives exactly round(100 / 7)); the
    GeoParquet polygons, which rasterised back give the class map itself (no minimum mapping unit); the report;
    all of them assets of the STAC item, which also carries the processing extension and the run's cost."""
    import geopandas as gpd

    from pipeline.vectors import rasterise

    out, _ = landcover
    conf = out.with_name("landcover.confidence.tif")
    assert cog_validate(str(conf))[0]
    with rasterio.open(out) as cls_src, rasterio.open(conf) as src:
        assert src.dtypes == ("uint8",) and src.nodata == 255 and src.count == 1
        assert (src.crs, src.transform, src.shape) == (cls_src.crs, cls_src.transform, cls_src.shape)
        c, k = src.read(1), cls_src.read(1)
        assert np.array_equal(c == 255, k == 255)
        valid = c[k != 255]
        assert valid.max() <= 100 and valid.min() >= 100 // 7  # a 7-class softmax's top class is >= 1/7
        plan = plan_inference(dataclasses.replace(_config(setup, out), overwrite=True), say=lambda s: None)
        assert plan.spec.temperature == TEMPERATURE
        before = torch.get_num_threads()
        try:
            preds = {t: TilePredictor(dataclasses.replace(plan.spec, threads=2, temperature=t))
                     for t in (TEMPERATURE, 1.0, 1e6)}
            lower = 0
            for t in plan.todo:
                batch = next(read_tiles_local(str(setup["cube"]), [t], modalities=plan.spec.modalities))
                row = {kk: v[0] for kk, v in batch.items()}
                at = {temp: p.predict_rows([row], confidence=True)[0] for temp, p in preds.items()}
                got = src.read(1, window=_tile_window(src, t)).astype(int)
                ok = at[1.0][0] != 255
                assert np.abs(got - at[TEMPERATURE][1].astype(int)).max() <= 1, t  # rounding across threads
                assert (at[TEMPERATURE][1][ok] <= at[1.0][1][ok]).all()
                lower += int((at[TEMPERATURE][1][ok] < at[1.0][1][ok]).sum())
                assert (at[1e6][1][ok] == round(100 / 7)).all()
            assert lower > 0
        finally:
            torch.set_num_threads(before)
    vec = gpd.read_parquet(out.with_suffix(".parquet"))
    assert list(vec.columns) == ["class_id", "class_name", "area_m2", "geometry"]
    assert vec.crs.to_epsg() == parse_tile_id(setup["tiles"][0], CFG.grid).epsg
    assert set(vec["class_name"]) <= set(setup["names"].values())
    assert np.array_equal(rasterise(vec, out), k)
    assert abs(vec["area_m2"].sum() - (k != 255).sum() * 100.0) < 1e-3
    item = json.loads(out.with_suffix(".json").read_text())
    assets = item["assets"]
    assert {k: os.path.normpath(a["href"]) for k, a in assets.items() if k != "data" and k != "thumbnail"} == {
        "confidence": "landcover.confidence.tif", "vectors": "landcover.parquet", "report": "landcover.report.html"}
    assert assets["confidence"]["raster:bands"][0]["unit"] == "percent"
    assert out.with_name("landcover.report.html").exists()
    props = item["properties"]
    assert any("processing" in e for e in item["stac_extensions"])
    assert props["processing:level"] == "L4" and "torch" in props["processing:software"]
    assert props["skysense:cpu_seconds"] > 0 and props["skysense:km2_per_hour"] > 0
    assert props["skysense:area_km2"] == pytest.approx(4 * 0.32 ** 2)
    html = out.with_name("landcover.report.html").read_text()
    assert 'src="landcover.png"' in html and "km²" in html


def test_product_report_renders_in_chromium_with_scores_added(setup, landcover, driver, tmp_path):
    """The land-cover product's report, with scores added afterwards as the demo adds them
    (``pipeline.report.update_report``), in a real headless Chromium: no console error, the quicklook loaded,
    the legend, class areas (which add up to the mapped area), the model beside the baseline."""
    import shutil as sh

    from pipeline.report import update_report
    from tests.browser import console_errors as _console_errors

    out, _ = landcover
    copy = tmp_path / "product"  # a copy: the other tests read the original
    copy.mkdir()
    for f in out.parent.glob("landcover.*"):
        if f.is_file():
            sh.copy2(f, copy / f.name)
    doc = json.loads((copy / "landcover.report.json").read_text())
    assert doc["quicklook"] == "landcover.png"  # relative: the copied product is whole on its own
    html = update_report(copy / "landcover.report.html",
                         metrics=[{"name": "mIoU", "model": 0.5, "baseline": 0.25}], baseline_name="raw pixels",
                         truth_name="test truth")
    areas = json.loads((copy / "landcover.report.json").read_text())["class_areas_km2"]
    with rasterio.open(out) as src:
        mapped = (src.read(1) != 255).sum() * 100 / 1e6
    assert sum(areas.values()) == pytest.approx(mapped, rel=1e-6) and set(areas) <= set(setup["names"].values())
    driver.get(html.as_uri())
    assert _console_errors(driver) == []
    state = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
    assert state and all(ok and w > 0 for ok, w in state)
    text = driver.find_element("tag name", "body").text
    assert "raw pixels" in text and "0.500" in text and "0.250" in text and "tiny" in text
    assert all(name in text for name in areas)


def test_embedding_field_int8_unit_vectors_one_chunk_per_tile(setup):
    """--task embeddings writes the int8 field (pipeline.embedding_field): it opens in xarray with its CRS, one
    Zarr chunk per tile; every vector is the direct prediction's F_fus scaled to unit length and quantised (to
    within one step of 1/127); dequantised vectors are unit-length within the quantisation error; the STAC item
    says how to dequantise; the similarity search finds a pixel itself first."""
    from pipeline.embedding_field import EMBEDDING_SCALE, most_similar, open_field, quantise, read_vector

    out = setup["tmp"] / "products" / "field.zarr"
    res = run_inference(_config(setup, out, task="embeddings", checkpoint=str(setup["encoder"]), threads=2),
                        progress=None)
    assert res.complete and res.out == out and out.is_dir()
    assert not out.with_suffix(".tif").exists()  # field only: no COG unless asked
    tiles = [parse_tile_id(t, CFG.grid) for t in setup["tiles"]]
    ds = open_field(out)
    emb = ds["embedding"]
    assert emb.rio.crs.to_epsg() == tiles[0].epsg
    assert emb.shape == (64, 64, 64) and emb.encoding["chunks"] == (64, 32, 32)
    raw = open_field(out, decode=False)["embedding"]
    assert raw.dtype == np.int8
    chunks = sorted(p.relative_to(out) for p in out.glob("epsg*/embedding/c/0/*/*"))
    assert len(chunks) == 4
    vec = emb.values
    norm = np.sqrt((vec ** 2).sum(0))
    assert np.isfinite(norm).all()
    assert np.abs(norm - 1).max() <= 64 ** 0.5 * 0.5 * EMBEDDING_SCALE  # each component off by <= half a step
    plan = plan_inference(dataclasses.replace(_config(setup, out, task="embeddings",
                                                      checkpoint=str(setup["encoder"])), overwrite=True),
                          say=lambda s: None)
    before = torch.get_num_threads()
    try:
        direct = TilePredictor(dataclasses.replace(plan.spec, threads=2))
        for t in tiles:
            batch = next(read_tiles_local(str(setup["cube"]), [t.id], modalities=plan.spec.modalities))
            want = quantise(direct.predict({k: v[0] for k, v in batch.items()}))
            x0, _, _, y1 = t.core_bounds()
            got = raw.sel(x=slice(x0, x0 + 320), y=slice(y1, y1 - 320)).values
            assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1, t.id
    finally:
        torch.set_num_threads(before)
    item = json.loads(out.with_suffix(".json").read_text())
    data = item["assets"]["data"]
    assert os.path.normpath(data["href"]) == "field.zarr" and data["type"] == "application/vnd+zarr"
    assert data["raster:bands"][0]["scale"] == pytest.approx(1 / 127) and data["raster:bands"][0]["nodata"] == -128
    assert item["properties"]["skysense:task"] == "embeddings"
    from pipeline.embedding_field import field_summary

    prov = field_summary(out)["provenance"]  # what made it, without the layout of this machine
    assert prov["checkpoint"] == "tiny.safetensors" and prov["checkpoint_sha256"] == file_sha256(setup["encoder"])
    assert not [v for v in prov.values() if isinstance(v, str) and v.startswith("/")]
    x, y = float(ds.x[10]), float(ds.y[20])
    best = most_similar(out, read_vector(out, x, y), k=5)
    assert (best[0].x, best[0].y) == (x, y) and best[0].similarity > 0.999
    assert all(a.similarity >= b.similarity for a, b in zip(best, best[1:], strict=False))
    # a pixel's nearest neighbours in the field share its class (the demo truth) far more often than chance
    with rasterio.open(setup["truth"] / "landcover_10m.tif") as truth:
        def classes_at(xs, ys):
            tx, ty = rasterio.warp.transform(emb.rio.crs, truth.crs, list(xs), list(ys))
            return np.array([v[0] for v in truth.sample(list(zip(tx, ty, strict=True)))])

        gx, gy = np.meshgrid(ds.x.values, ds.y.values)
        every = classes_at(gx.ravel(), gy.ravel())
        rng = np.random.default_rng(0)
        same, chance = [], []
        for i in rng.choice(len(every), 15, replace=False):
            r, c = divmod(int(i), gx.shape[1])
            group = next(iter(json.loads((out / "zarr.json").read_text())["attributes"]["skysense:embedding_field"]
                              ["groups"]))
            near = most_similar(out, raw.values[:, r, c], k=10, exclude=(group, r, c))
            same.append(float((classes_at([m.x for m in near], [m.y for m in near]) == every[i]).mean()))
            chance.append(float((every == every[i]).mean()))
    print(f"\nsimilarity: {np.mean(same):.2f} of the 10 nearest share the query's class, chance {np.mean(chance):.2f}")
    assert np.mean(same) > 1.5 * np.mean(chance)


def test_product_past_part_px_is_cog_parts_with_a_vrt_and_a_collection(setup, landcover, tmp_path):
    """The landcover tiles of the reference run made into a product of 32 px parts (``part_px``): 2 x 2 part
    COGs written by Ray tasks, a VRT that opens as one raster equal pixel for pixel to the single-COG product,
    and a STAC Collection whose items are the parts."""
    import pystac

    ref, _ = landcover
    out = tmp_path / "landcover.tif"
    res = run_inference(_config(setup, out, name="landcover.tiles", work_dir=str(ref.parent), part_px=32),
                        progress=None)
    assert res.complete and not res.processed and len(res.skipped) == 4  # the reference run's tiles, reused
    assert res.out == tmp_path / "landcover.vrt" and not out.exists()
    parts = sorted((tmp_path / "landcover.parts").glob("*.tif"))
    assert [p.name for p in parts] == ["r000_c000.tif", "r000_c001.tif", "r001_c000.tif", "r001_c001.tif"]
    with rasterio.open(res.out) as many, rasterio.open(ref) as one:
        assert (many.crs, many.transform, many.shape) == (one.crs, one.transform, one.shape)
        assert np.array_equal(many.read(), one.read())
        assert {k: many.colormap(1)[k] for k in range(7)} == {k: one.colormap(1)[k] for k in range(7)}
    coll = pystac.Collection.from_file(str(res.item))
    items = list(coll.get_items())
    assert sorted(Path(i.assets["data"].get_absolute_href()).name for i in items) == [p.name for p in parts]
    assert all(i.collection_id == "landcover" and i.properties["skysense:model_preset"] == "tiny" for i in items)
    assert Path(coll.assets["index"].get_absolute_href()) == res.out
    assert res.quicklook.exists()


def test_embeddings_and_seams(setup, landcover):
    """F_fus as float32 bands (--embedding-dtype float32); across tile borders neighbouring pixels differ no more
    than inside tiles, for the features and for the class map (the tile halo and the blended windows leave no
    seam)."""
    out = setup["tmp"] / "products" / "embeddings.tif"
    res = run_inference(_config(setup, out, task="embeddings", checkpoint=str(setup["encoder"]), threads=1,
                                embedding_dtype="float32"), progress=None)
    assert res.complete and len(res.done) == 4
    assert cog_validate(str(out))[0]
    with rasterio.open(out) as src:
        assert src.count == 64 and src.dtypes[0] == "float32" and np.isnan(src.nodata)
        assert src.descriptions[0] == "fus_mm_0000" and src.descriptions[-1] == "fus_geo_0031"
        feats = src.read()
    assert np.isfinite(feats).all()
    fb, fi, n = seam_stats(feats, CFG.grid.tile_px, classes=False)
    cb, ci, _ = seam_stats(_read(landcover[0]), CFG.grid.tile_px, classes=True)
    print(f"\nseams: feature step across borders {fb:.4f} vs inside {fi:.4f}; class disagreement across borders "
          f"{cb:.4f} vs inside {ci:.4f} ({n} border pairs)")
    assert fb <= fi * 1.1, (fb, fi)
    # class disagreement on 128 border pairs: allow the binomial noise of that sample (2 sigma)
    assert cb <= ci + 2 * np.sqrt(max(ci * (1 - ci), 1e-3) / n), (cb, ci)


def test_stopped_run_resumes_with_only_the_missing_tiles_through_a_killed_actor(setup, landcover):
    """Stop the run halfway (the --max-tiles hook), re-run: only the tiles not recorded done are predicted. The
    inference actor of the re-run is SIGKILLed while it predicts a tile: Ray Data replaces it and retries the tile,
    the run completes with every tile, and the product is pixel-identical to the uninterrupted run's."""
    out = setup["tmp"] / "products" / "resumed.tif"
    first = run_inference(_config(setup, out, max_tiles=2, threads=2), progress=None)
    assert first.stopped_early and first.out is None and not out.exists()
    tile_dir = out.parent / "resumed.tiles"
    rec = _tile_records(tile_dir)
    done_before = {t for t, r in rec.items() if r["status"] == "done"}
    assert 2 <= len(done_before) < 4

    box: dict = {}

    def run():
        try:
            box["r"] = run_inference(_config(setup, out, threads=2, write_pids=True), progress=None)
        except BaseException as e:  # reported below, in the test's thread
            box["e"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and th.is_alive():
        busy = sorted((tile_dir / "pids").glob("busy-*")) if (tile_dir / "pids").exists() else []
        if busy:  # the actor is predicting a tile: kill it mid-task
            killed = int(busy[0].name.split("-")[1])
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.02)
    th.join(timeout=300)
    assert killed is not None, "the run ended before its actor could be killed"
    assert "e" not in box, box.get("e")
    second = box["r"]
    assert second.complete and len(second.done) == 4, second.summary()
    assert set(second.skipped) == done_before
    assert set(second.processed) == set(setup["tiles"]) - done_before  # only the missing tiles
    pids = {int(p.read_text()) for p in (tile_dir / "pids").glob("actor-*.pid")}
    assert killed in pids and len(pids) >= 2  # a new actor took over
    interrupted = (tile_dir / "pids" / f"busy-{killed}").read_text().split()  # left behind by the dead actor
    rec = _tile_records(tile_dir)
    assert interrupted and all(rec[t]["status"] == "done" and rec[t]["worker"] != killed for t in interrupted)
    assert np.array_equal(_read(out), _read(landcover[0]))  # pixel-identical to the uninterrupted run
    runs = json.loads((tile_dir / MANIFEST).read_text())["runs"]
    assert [r["processed"] for r in runs] == [len(first.processed), len(second.processed)]


def _node_of(pid: int, nodes) -> object | None:
    """The cluster_utils node whose raylet started worker process ``pid`` (its parent)."""
    from tests.ray_cluster import node_of

    return node_of(pid, nodes)


def test_worker_node_lost_mid_run_loses_no_tile(setup, tmp_path):
    """A real multi-node Ray cluster on this machine (``ray.cluster_utils``: a head with no CPU that the job's
    driver attaches to, two worker nodes of 1 CPU each). While the inference actor predicts a tile, its whole
    worker node is removed (raylet, object store and workers killed). Ray Data starts a new actor on the other
    node and retries the tile: the run completes with 0 lost tiles, and every tile equals the undisturbed
    prediction (in this process, 1 torch thread as the 1-CPU actors)."""
    from tests.ray_cluster import worker_cluster

    with worker_cluster(workers=2, cpus=1) as (cluster, nodes):
        out = tmp_path / "lost-node.tif"
        tile_dir = tmp_path / "lost-node.tiles"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        cmd = [sys.executable, str(REPO / "jobs" / "infer.py"), "--ray-address", cluster.address, "--cube",
               setup["cube"], "--checkpoint", setup["probe"], "--task", "landcover", "--out", out, *RUN,
               "--num-actors", "1", "--cpus-per-actor", "1", "--write-pids"]
        job = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        removed = None
        deadline = time.time() + 240
        while time.time() < deadline and job.poll() is None and removed is None:
            busy = sorted((tile_dir / "pids").glob("busy-*")) if (tile_dir / "pids").exists() else []
            for b in busy:  # the actor is predicting a tile: remove its node
                pid, ids = int(b.name.split("-")[1]), b.read_text().split() if b.exists() else []
                if not ids:
                    continue
                node = _node_of(pid, nodes)
                assert node is not None, f"actor {pid} runs on none of the worker nodes"
                cluster.remove_node(node, allow_graceful=False)
                removed = pid, ids
                break
            time.sleep(0.02)
        stdout, stderr = job.communicate(timeout=300)
        assert removed is not None, "the run ended before a node could be removed:\n" + stderr[-3000:]
        assert job.returncode == 0, stdout[-2000:] + stderr[-6000:]
        summary = _summary(stdout)
        assert summary["complete"] and summary["done"] == 4 and summary["failed"] == 0, summary
        rec = _tile_records(tile_dir)
        assert all(r["status"] == "done" for r in rec.values()) and len(rec) == 4
        pids = {int(p.read_text()) for p in (tile_dir / "pids").glob("actor-*.pid")}
        assert removed[0] in pids and len(pids) >= 2  # an actor on the other node took over
        assert all(rec[t]["worker"] != removed[0] for t in removed[1])  # the interrupted tile, done by another
        direct = _direct(setup, _config(setup, out), threads=1)
        with rasterio.open(out) as src:
            for t, pred in direct.items():
                got = src.read(1, window=_tile_window(src, t))
                assert np.array_equal(got, pred[0]), (t, float((got != pred[0]).mean()))


def test_fewshot_from_labelled_support_tiles(setup, torch_one_thread):
    """The few-shot predictor (in this process: the Ray plumbing is the same for every task) on a query tile,
    from one support tile labelled by the demo's HR land-cover truth: the support window is the one with the
    most labelled pixels, classes, names and colours come from the label raster."""
    support = setup["tmp"] / "support.json"
    support.write_text(json.dumps({"labels": str(setup["truth"] / "landcover_hr.tif"), "tiles": setup["tiles"][3:]}))
    cfg = _config(setup, setup["tmp"] / "products" / "fewshot.tif", task="fewshot", checkpoint=str(setup["encoder"]),
                  support=str(support), tiles=setup["tiles"][:1])
    with pytest.raises(ValueError, match="outside the support file's directory"):  # the truth lies elsewhere
        plan_inference(cfg, say=lambda s: None)
    cfg = dataclasses.replace(cfg, allow_hrefs=(str(setup["truth"]),))
    plan = plan_inference(cfg, say=lambda s: None)
    s = plan.spec.support
    assert s.num_classes == 7 and s.labels.shape == (1, 16 * 8, 16 * 8) and s.origins[0][0] == setup["tiles"][3]
    assert (s.labels < 7).all()  # the demo truth labels every HR pixel
    assert plan.class_names == setup["names"] and plan.colormap == setup["colors"]
    assert plan.fingerprint["support"] == s.digest()
    pred = _direct(setup, cfg)[setup["tiles"][0]]
    assert pred.shape == (1, 32, 32) and pred.dtype == np.uint8 and pred.max() < 7
    again = _direct(setup, cfg)[setup["tiles"][0]]
    assert np.array_equal(pred, again)  # the label-id draw is seeded: the same map every time


# ------------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------------
def _main(args) -> int:
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import infer as job
    finally:
        sys.path.remove(str(REPO / "jobs"))
    return job.main([str(a) for a in args])


def test_bad_input_is_refused_before_any_work(setup, landcover, tmp_path, capsys):
    out, _ = landcover
    before = out.stat().st_mtime_ns
    base = ["--cube", setup["cube"], "--task", "landcover", *RUN]
    assert _main([*base, "--checkpoint", setup["probe"], "--out", out]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == before  # untouched
    # a checkpoint of another preset: small has 32 HR pixels per Sentinel pixel, the cube 8
    other = tmp_path / "small.safetensors"
    save_file({"model.ctpe": torch.zeros(1)}, str(other),
              metadata={"format": FORMAT, "config": json.dumps(get_config("small").to_dict()), "meta": "{}"})
    emb = ["--cube", setup["cube"], "--task", "embeddings", "--out", tmp_path / "e.tif"]
    assert _main([*emb, "--checkpoint", other]) == 2
    err = capsys.readouterr().err
    assert "preset 'small'" in err and "32 HR pixels" in err
    assert _main([*base, "--checkpoint", setup["encoder"], "--out", tmp_path / "x.tif"]) == 2
    assert "needs a fine-tuned head" in capsys.readouterr().err
    assert _main([*base, "--checkpoint", setup["probe"], "--out", tmp_path / "x.tif", "--window", "18"]) == 2
    assert "--window must be a multiple of 4" in capsys.readouterr().err
    assert _main(["--cube", tmp_path / "none.zarr", "--checkpoint", setup["probe"], "--task", "landcover",
                  "--out", tmp_path / "x.tif"]) == 2
    assert _main([*emb[:3], "fewshot", "--checkpoint", setup["encoder"], "--out", tmp_path / "f.tif"]) == 2
    assert "--support is required" in capsys.readouterr().err
    assert _main([*base, "--checkpoint", setup["probe"], "--out", tmp_path / "x.tif", "--min-mapping-unit",
                  "-5"]) == 2
    assert "--min-mapping-unit must be >= 0" in capsys.readouterr().err
    assert _main([*base, "--checkpoint", setup["probe"], "--out", tmp_path / "x.tif", "--simplify", "-1"]) == 2
    assert "--simplify must be >= 0" in capsys.readouterr().err
    assert _main([*emb, "--checkpoint", setup["encoder"], "--out", tmp_path / "e.zip"]) == 2
    assert "or an embedding field (.zarr)" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tif")) and not list(tmp_path.glob("*.tiles"))  # nothing written


def test_missing_tile_and_corrupt_chunk_fail_alone(setup, tmp_path, capsys):
    """A tile the ingest never wrote and a tile with a corrupt chunk are failed with their reasons; their
    neighbours are done; exit 1 and no product unless --allow-partial, which mosaics the rest."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(setup["cube"], bad)
    missing, corrupt = setup["tiles"][0], setup["tiles"][3]
    root = zarr.open_group(str(bad), mode="r+", zarr_format=3)
    ids = zarr_cube.tile_ids(root)
    status = root["index/status"][:]
    status[ids.index(missing)] = zarr_cube.FAILED
    root["index/status"][:] = status
    shutil.rmtree(bad / "tiles" / missing)
    chunks = sorted(p for p in (bad / "tiles" / corrupt / "s2").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[0].write_bytes(b"\x00not a zstd frame" * 50)
    out = tmp_path / "partial.tif"
    args = ["--cube", bad, "--checkpoint", setup["probe"], "--task", "landcover", "--out", out, *RUN]
    assert _main(args) == 1
    assert "2 tile(s) failed" in capsys.readouterr().err
    assert not out.exists()
    m = _tile_records(tmp_path / "partial.tiles")
    assert "failed at ingest" in m[missing]["reason"]
    assert m[corrupt]["status"] == "failed" and "read failed" in m[corrupt]["reason"]
    good = [t for t in setup["tiles"] if t not in (missing, corrupt)]
    assert all(m[t]["status"] == "done" for t in good)
    assert _main([*args, "--allow-partial"]) == 0
    summary = _summary(capsys.readouterr().out)
    assert summary["processed"] == 1 and summary["skipped"] == 2  # only the corrupt tile is tried again
    with rasterio.open(out) as src:
        data = src.read(1)
        for t in (missing, corrupt):
            assert (src.read(1, window=_tile_window(src, t)) == 255).all()
        for t in good:
            assert (src.read(1, window=_tile_window(src, t)) != 255).all()
    assert (data == 255).sum() == 2 * 32 * 32


def test_object_storage_round_trip_on_nodes_that_share_no_disk(setup, landcover, demo_region, s3_server):
    """Cube, tile predictions and product at s3:// URLs on a real S3-compatible server (moto, 127.0.0.1), jobs
    attached to a 2-node Ray cluster whose nodes reach them through the environment's credentials only. The ingest
    is killed (SIGKILL of its process group) once a tile is done and resumes; the cube equals the local one tile
    for tile, the product read back through GDAL's /vsis3/ equals the local run's pixel for pixel, and a re-run
    predicts nothing."""
    import pandas as pd

    from pipeline import storage
    from tests.demo_cube import SEASON
    from tests.ray_cluster import worker_cluster

    catalog, _ = demo_region
    with pytest.raises(zarr_cube.CubeError, match="the bucket 'no-such-bucket' cannot be listed"):
        zarr_cube.check_out("s3://no-such-bucket/cube.zarr")
    root = f"s3://{s3_server['bucket']}/run"
    cube, out = f"{root}/cube.zarr", f"{root}/products/landcover.tif"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **s3_server["env"]}
    grid = ["--tile-px", "32", "--halo-px", "4", "--t-s2", str(CFG.t_s2), "--t-s1", str(CFG.t_s1), "--t-hr",
            str(CFG.t_hr), "--hr-ratio", str(CFG.hr_ratio)]
    with worker_cluster(workers=2, cpus=1) as (cluster, _nodes):  # its nodes inherit the S3 environment
        ingest = [sys.executable, str(REPO / "jobs" / "ingest.py"), "--catalog", str(catalog), "--bbox",
                  *map(str, setup["aoi"].bounds), "--start", SEASON[0].isoformat(), "--end", SEASON[1].isoformat(),
                  "--out", cube, *grid, "--cpus-per-tile", "1", "--ray-address", cluster.address]
        job = subprocess.Popen(ingest, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and job.poll() is None:
            if any(zarr_cube.is_done(cube, t) for t in setup["tiles"]):
                os.killpg(job.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        job.wait(timeout=60)
        assert job.returncode == -signal.SIGKILL, "the ingest ended before it could be killed:\n" + job.stdout.read()
        time.sleep(2)  # the dead driver's tasks are cancelled by their nodes
        done_before = {t for t in setup["tiles"] if zarr_cube.is_done(cube, t)}
        assert 1 <= len(done_before) < 4, done_before
        again = subprocess.run(ingest, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"{len(done_before)} tiles already done, {4 - len(done_before)} to do" in again.stdout + again.stderr
        for t in setup["tiles"]:
            a, b = zarr_cube.open_tile(cube, t), zarr_cube.open_tile(setup["cube"], t)
            for name in ("s2", "s2_mask", "s1", "s1_mask", "hr", "hr_mask"):
                assert a[name].equals(b[name]), (t, name)

        infer = [sys.executable, str(REPO / "jobs" / "infer.py"), "--ray-address", cluster.address, "--cube", cube,
                 "--checkpoint", str(setup["probe"]), "--task", "landcover", "--out", out, *RUN,
                 "--cpus-per-actor", "1"]
        # the inference driver is killed too, once a tile prediction is on the server, and the run resumes
        tile_dir = f"{root}/products/landcover.tiles"
        job = subprocess.Popen(infer, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and job.poll() is None:
            if any(storage.exists(f"{tile_dir}/tiles/{t}.tif") for t in setup["tiles"]):
                os.killpg(job.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        job.wait(timeout=60)
        assert job.returncode == -signal.SIGKILL, "the inference ended before it could be killed:\n" + \
            job.stdout.read()
        assert not storage.exists(out)  # no product from a killed run
        time.sleep(2)  # the dead driver's actor is removed by the cluster
        r = subprocess.run(infer, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        summary = _summary(r.stdout)
        assert summary["complete"] and summary["done"] == 4 and summary["out"] == out, summary
        assert summary["processed"] + summary["skipped"] == 4, summary
        storage.configure_gdal()
        with rasterio.open(out) as src:  # /vsis3/
            assert np.array_equal(src.read(), _read(landcover[0]))
        for sidecar in (".png", ".json", ".confidence.tif", ".parquet", ".report.html", ".report.json"):
            assert storage.exists(out[:-4] + sidecar), sidecar
        with rasterio.open(out[:-4] + ".confidence.tif") as src, rasterio.open(
                landcover[0].with_name("landcover.confidence.tif")) as ref:
            assert np.abs(src.read().astype(int) - ref.read().astype(int)).max() <= 1
        rows = pd.read_parquet(f"{root}/products/landcover.tiles/manifest.parquet")  # s3fs, as any reader
        assert sorted(rows.tile) == setup["tiles"] and (rows.status == "done").all()
        r2 = subprocess.run([*infer, "--overwrite"], env=env, capture_output=True, text=True, timeout=300)
        assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-6000:]
        s2 = _summary(r2.stdout)
        assert s2["complete"] and s2["processed"] == 0 and s2["skipped"] == 4, s2
