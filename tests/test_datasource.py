"""The cube datasource with a real local Ray and a real (small) demo cube: exactly the done tiles, once per epoch,
also across two streaming-split consumers; windows that tile the sample exactly; row values equal to the cube;
label rasters on the tile grids; and batches that a tiny model eats."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import date

import numpy as np
import pytest
import rasterio
import rasterio.windows
import torch
from pyproj import Transformer

from pipeline import zarr_cube
from pipeline.cube import CubeConfig
from pipeline.datasource import (
    CollateToInput,
    CubeDatasource,
    done_tiles,
    read_cube,
    rows_to_input,
    window_origins,
)
from pipeline.grid import TileGrid, load_aoi, parse_tile_id
from pipeline.ingest import run_ingest
from pipeline.labels import labels_on_tile
from skysense_core.inputs import SkySenseInput

# 64 + 2 x 8 px tiles (80 px samples, 640 px HR); a 16-day season: 3 S2 dates + 1 padding slot, 2 S1, 1 HR.
CFG = CubeConfig(grid=TileGrid(64, 8), t_s2=4, t_s1=2, t_hr=1, hr_ratio=8)
SEASON = (date(2024, 5, 10), date(2024, 5, 26))


@pytest.fixture(scope="module")
def cube(demo_region, ray_local, tmp_path_factory):
    """A 2 x 2 tile cube at the region's west edge: the west column sticks out of the region, the east column
    lies inside it. One planned tile is left unwritten, so the index holds a tile that is not DONE."""
    catalog, dcfg = demo_region
    m = CFG.grid.tile_m
    ox, oy = dcfg.origin_xy
    col0, row0 = int(ox // m), int((oy - dcfg.extent_m / 2) // m)
    x0, y0 = col0 * m + 0.45 * m, row0 * m + 0.45 * m  # an AOI touching exactly 2 x 2 tile cores
    to_ll = Transformer.from_crs(dcfg.epsg, 4326, always_xy=True)
    aoi = load_aoi((*to_ll.transform(x0, y0), *to_ll.transform(x0 + m, y0 + m)))
    skipped = f"32N_{col0:04d}_{row0 + 1:04d}"
    out = tmp_path_factory.mktemp("ds-cube") / "cube.zarr"
    report = run_ingest(str(catalog), aoi, *SEASON, out, CFG, progress=None, tile_filter=lambda t: t.id != skipped)
    assert report.ok and len(report.done) == 3, report.summary()
    inside = f"32N_{col0 + 1:04d}_{row0:04d}"
    edge = f"32N_{col0:04d}_{row0:04d}"
    region = (ox, oy - dcfg.extent_m, ox + dcfg.extent_m, oy)
    b_in, b_edge = parse_tile_id(inside, CFG.grid).bounds(), parse_tile_id(edge, CFG.grid).bounds()
    assert region[0] <= b_in[0] and b_in[2] <= region[2] and region[1] <= b_in[1] and b_in[3] <= region[3]
    assert b_edge[0] < region[0] < b_edge[2]
    return {"path": out, "done": sorted(report.done), "skipped": skipped, "inside": inside, "edge": edge,
            "truth": catalog.parent / "truth", "region": region}


def _tile_ids(batch) -> list[str]:
    return [str(t) for t in batch["tile_id"]]


def test_exactly_the_done_tiles_once_per_epoch_also_across_two_consumers(cube):
    path = cube["path"]
    root = zarr_cube.open_cube(path)
    assert cube["skipped"] in zarr_cube.tile_ids(root) and not zarr_cube.is_done(path, cube["skipped"])
    assert done_tiles(path) == cube["done"]
    src = CubeDatasource(path)
    assert src.tiles == cube["done"] and src.num_rows() == 3
    tasks = CubeDatasource(path, window=40, tiles_per_task=2).get_read_tasks(100)
    assert [t.metadata.num_rows for t in tasks] == [8, 4]  # 2 + 1 tiles x 4 windows
    assert len(CubeDatasource(path).get_read_tasks(2)) == 2 and len(src.get_read_tasks(100)) == 3
    windowed = CubeDatasource(path, window=40)
    assert sum(t.metadata.size_bytes for t in tasks) == windowed.estimate_inmemory_data_size() > 0
    with pytest.raises(ValueError, match="not done"):
        CubeDatasource(path, tiles=[cube["skipped"]])
    with pytest.raises(ValueError, match="not in the index"):
        CubeDatasource(path, tiles=["32N_0001_0001"])
    ds = read_cube(path, modalities=("s2",))
    assert ds.count() == 3
    assert sorted(t for b in ds.iter_batches(batch_size=2) for t in _tile_ids(b)) == cube["done"]

    epochs = 2
    seen: dict[tuple[int, int], list[str]] = {}
    errors: list[BaseException] = []
    its = ds.streaming_split(2, equal=False)

    def consume(rank: int) -> None:
        try:
            for epoch in range(epochs):
                seen[rank, epoch] = [t for b in its[rank].iter_batches(batch_size=1) for t in _tile_ids(b)]
        except BaseException as e:  # reported on the main thread
            errors.append(e)

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a consumer hung"
    for epoch in range(epochs):
        union = Counter(seen[0, epoch]) + Counter(seen[1, epoch])
        assert sorted(union) == cube["done"] and set(union.values()) == {1}, (epoch, seen)


def test_windows_cover_each_tile_exactly(cube):
    path, tid = cube["path"], cube["inside"]
    size, r = CFG.grid.size_px, CFG.hr_ratio
    assert window_origins(size, 32, 24) == [0, 24, 48]
    assert window_origins(size, 40) == [0, 40] and window_origins(size, 36, 36) == [0, 36, 44]
    with pytest.raises(ValueError, match="larger than the tile"):
        window_origins(size, size + 4)
    src = CubeDatasource(path, tiles=[tid], modalities=("s2", "hr"), window=32, stride=24)
    assert src.num_rows() == 9 and src.windows == [(y, x) for y in (0, 24, 48) for x in (0, 24, 48)]
    rows = read_cube(path, tiles=[tid], modalities=("s2", "hr"), window=32, stride=24).take_all()
    assert len(rows) == 9 and {(int(w["y0"]), int(w["x0"])) for w in rows} == set(src.windows)
    ref = zarr_cube.open_tile(path, tid)
    s2, hr = ref.s2.values.astype(np.float32), ref.hr.values.astype(np.float32)
    got_s2, got_hr = np.full(s2.shape, np.nan, np.float32), np.full(hr.shape, np.nan, np.float32)
    cover = np.zeros((size, size), int)
    for w in rows:
        y, x = int(w["y0"]), int(w["x0"])
        assert w["s2"].shape == (CFG.t_s2, 10, 32, 32) and w["hr"].shape == (CFG.t_hr, 3, 32 * r, 32 * r)
        got_s2[..., y : y + 32, x : x + 32] = w["s2"]
        got_hr[..., y * r : (y + 32) * r, x * r : (x + 32) * r] = w["hr"]
        cover[y : y + 32, x : x + 32] += 1
    assert (cover >= 1).all()
    np.testing.assert_array_equal(got_s2, s2)
    np.testing.assert_array_equal(got_hr, hr)


def _coverage_from_cube(path, tid) -> np.ndarray:
    """(H, W) on the S2 grid: some modality has a usable pixel on some date (HR: any pixel of the 8 x 8 block)."""
    ref = zarr_cube.open_tile(path, tid)
    r = CFG.hr_ratio
    cover = np.zeros((CFG.grid.size_px,) * 2, bool)
    for m in ("s2", "s1", "hr"):
        mask = ref[f"{m}_mask"].values.astype(bool) & ref[f"{m}_valid"].values.astype(bool)[:, None, None]
        any_t = mask.any(0)
        if m == "hr":
            any_t = any_t.reshape(any_t.shape[0] // r, r, any_t.shape[1] // r, r).any((1, 3))
        cover |= any_t
    return cover


def test_min_valid_drops_the_windows_without_data_and_keeps_the_rest(cube):
    path, w = cube["path"], 16
    all_wins = {(t, y, x) for t in cube["done"] for y in window_origins(CFG.grid.size_px, w)
                for x in window_origins(CFG.grid.size_px, w)}
    rows = read_cube(path, window=w, min_valid=0.5).take_all()
    got = {(str(r["tile_id"]), int(r["y0"]), int(r["x0"])) for r in rows}
    assert len(got) == len(rows)  # each window once
    covers = {t: _coverage_from_cube(path, t) for t in cube["done"]}
    expect = {(t, y, x) for t, y, x in all_wins if covers[t][y : y + w, x : x + w].mean() >= 0.5}
    assert got == expect
    by_tile = Counter(t for t, _, _ in got)
    assert by_tile[cube["inside"]] == 25 and 0 < by_tile[cube["edge"]] < 25  # the edge tile sticks out
    assert len(read_cube(path, window=w).take_all()) == len(all_wins)  # min_valid 0 keeps every window
    with pytest.raises(ValueError, match="min_valid"):
        CubeDatasource(path, min_valid=1.5)


def test_shuffle_reorders_the_tiles_every_execution(cube):
    src = CubeDatasource(cube["path"], shuffle=True, modalities=("s1",))
    orders = {tuple(_first_tile(task) for task in src.get_read_tasks(100)) for _ in range(30)}
    assert all(sorted(o) == cube["done"] for o in orders)
    assert len(orders) > 1  # 3 tiles: 30 draws of 6 orders all equal has probability 6**-29
    plain = CubeDatasource(cube["path"], modalities=("s1",))
    assert [_first_tile(t) for t in plain.get_read_tasks(100)] == cube["done"]


def _first_tile(task) -> str:
    from ray.data.block import BlockAccessor

    block = next(iter(task()))
    return str(BlockAccessor.for_block(block).to_numpy("tile_id")[0])


def test_row_values_equal_the_cube(cube):
    path, tid = cube["path"], cube["edge"]
    (row,) = read_cube(path, tiles=[tid]).take_all()
    ref = zarr_cube.open_tile(path, tid)
    n, r = CFG.grid.size_px, CFG.hr_ratio
    assert row["tile_id"] == tid and row["y0"] == 0 and row["x0"] == 0
    for m, t in (("s2", CFG.t_s2), ("s1", CFG.t_s1), ("hr", CFG.t_hr)):
        side = n * r if m == "hr" else n
        assert row[m].dtype == np.float32 and row[m].shape[0] == t and row[m].shape[-2:] == (side, side)
        np.testing.assert_array_equal(row[m], ref[m].values.astype(np.float32))  # NaN == NaN for S1
        assert row[f"{m}_mask"].dtype == bool
        np.testing.assert_array_equal(row[f"{m}_mask"], ref[f"{m}_mask"].values.astype(bool))
        np.testing.assert_array_equal(row[f"{m}_valid"], ref[f"{m}_valid"].values)
        times = ref[f"time_{m}"].values
        filled = np.array([bool(i) for i in ref.attrs["items"][m]])
        doy = np.array([0 if np.isnat(d) else date.fromisoformat(str(d)[:10]).timetuple().tm_yday for d in times])
        assert row[f"{m}_doy"].dtype == np.int64
        np.testing.assert_array_equal(row[f"{m}_doy"], np.where(filled, doy, 0))
    assert np.isnan(row["s1"]).any() and not row["s1_mask"].all(), "the edge tile holds S1 nodata"
    assert (row["s2_doy"][:3] > 0).all() and row["s2_doy"][3] == 0 and not row["s2_valid"][3], "padding slot"
    assert np.isnat(ref["time_s2"].values[3]), "the cube stores a padding date as NaT, not 1970-01-01"
    ids = zarr_cube.tile_ids(zarr_cube.open_cube(path))
    idx = zarr_cube.open_cube(path)["index"]
    k = ids.index(tid)
    assert row["lat"] == idx["center_lat"][k] and row["lon"] == idx["center_lon"][k]


def _truth_read(href, transform, shape) -> np.ndarray:
    with rasterio.open(href) as src:
        bounds = rasterio.transform.array_bounds(*shape, transform)
        win = rasterio.windows.from_bounds(*bounds, transform=src.transform)
        return src.read(1, window=win, boundless=True, fill_value=255, out_shape=shape)


def test_labels_on_the_tile_grids(cube):
    path, truth = cube["path"], cube["truth"]
    r = CFG.hr_ratio
    for key in ("inside", "edge", "skipped"):  # "skipped": not written; its grid comes from the cube config
        tile = parse_tile_id(cube[key], CFG.grid)
        lo = labels_on_tile(truth / "landcover_10m.tif", tile.id, path, hr=False)
        hr = labels_on_tile(truth / "landcover_hr.tif", tile.id, path, hr=True)
        hr_from_10m = labels_on_tile(truth / "landcover_10m.tif", tile.id, path, hr=True)
        assert lo.dtype == hr.dtype == np.uint8 and lo.shape == tile.shape() and hr.shape == tile.shape(r)
        np.testing.assert_array_equal(lo, _truth_read(truth / "landcover_10m.tif", tile.transform(), tile.shape()))
        np.testing.assert_array_equal(hr, _truth_read(truth / "landcover_hr.tif", tile.transform(r), tile.shape(r)))
        np.testing.assert_array_equal(hr_from_10m, np.kron(lo, np.ones((r, r), np.uint8)))  # nearest, aligned
        if key == "inside":
            assert (lo != 255).all() and (hr != 255).all() and len(np.unique(lo)) >= 2
    edge = parse_tile_id(cube["edge"], CFG.grid)
    lo = labels_on_tile(truth / "landcover_10m.tif", edge.id, path, hr=False)
    outside = int(round((cube["region"][0] - edge.bounds()[0]) / 10))  # columns west of the region
    assert 0 < outside < lo.shape[1]
    assert (lo[:, :outside] == 255).all() and (lo[:, outside:] != 255).all()
    flood = next(truth.glob("flood_*.tif"))
    f = labels_on_tile(flood, cube["inside"], path, hr=False)
    assert set(np.unique(f)) <= {0, 1, 2}
    with pytest.raises(FileNotFoundError, match="no_such.tif"):
        labels_on_tile(truth / "no_such.tif", cube["inside"], path, hr=False)
    with pytest.raises(FileNotFoundError, match="no_such.tif"):
        CubeDatasource(path, labels=truth / "no_such.tif")


def test_batches_feed_a_tiny_model(cube, torch_one_thread):
    import ray

    path, truth = cube["path"], cube["truth"]
    r = CFG.hr_ratio
    # The passes below are compared row by row: one tile (one read task), and an order-preserving execution so
    # that the extra map stage of drop_columns cannot reorder rows either.
    ctx = ray.data.DataContext.get_current()
    ordered = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        _batches_feed_a_tiny_model(path, truth, r, cube)
    finally:
        ctx.execution_options.preserve_order = ordered


def _batches_feed_a_tiny_model(path, truth, r, cube):
    from skysense_core import build_model

    ds = read_cube(path, tiles=[cube["inside"]], window=32, stride=24, labels=truth / "landcover_hr.tif")
    batch = next(iter(ds.iter_batches(batch_size=2, batch_format="numpy")))
    x, y = rows_to_input(batch)
    assert isinstance(x, SkySenseInput) and x.modalities == ("hr", "s2", "s1") and x.batch_size == 2
    assert tuple(x.s2.data.shape) == (2, CFG.t_s2, 10, 32, 32) and x.s2.data.dtype == torch.float32
    assert tuple(x.s1.data.shape) == (2, CFG.t_s1, 2, 32, 32)
    assert tuple(x.hr.data.shape) == (2, CFG.t_hr, 3, 32 * r, 32 * r)
    assert tuple(x.hr.mask.shape) == (2, CFG.t_hr, 32 * r, 32 * r) and x.hr.mask.dtype == torch.bool
    assert x.s2.doy.dtype == torch.int64 and tuple(x.s2.valid.shape) == (2, CFG.t_s2)
    assert tuple(x.lat.shape) == (2,) and y is not None and y.dtype == torch.int64
    assert tuple(y.shape) == (2, 32 * r, 32 * r)
    for i in range(2):  # the labels are the label raster's window of that row
        tid, y0, x0 = str(batch["tile_id"][i]), int(batch["y0"][i]), int(batch["x0"][i])
        full = labels_on_tile(truth / "landcover_hr.tif", tid, path, hr=True)
        np.testing.assert_array_equal(y[i].numpy(), full[y0 * r : (y0 + 32) * r, x0 * r : (x0 + 32) * r])
    assert tuple(batch["labels_grid"].shape) == (2, 32, 32)

    assert zarr_cube.cube_config(zarr_cube.open_cube(path)).hr_ratio == r
    model = build_model("tiny", hr_ratio=r).eval()
    with torch.no_grad():
        out = model(x)
    assert tuple(out.fused_mm.shape[-2:]) == (32, 32) and torch.isfinite(out.fused).all()

    # The same through iter_torch_batches: with the string column dropped, and with the collate function.
    tb = next(iter(ds.drop_columns(["tile_id"]).iter_torch_batches(batch_size=2)))
    x2, y2 = rows_to_input(tb, modalities=("s2",))
    assert x2.modalities == ("s2",) and torch.equal(x2.s2.data, x.s2.data) and torch.equal(y2, y)
    x3, y3 = next(iter(ds.iter_torch_batches(batch_size=2, collate_fn=CollateToInput(("s2", "s1")))))
    assert x3.modalities == ("s2", "s1") and torch.equal(x3.s1.mask, x.s1.mask) and torch.equal(y3, y)
    with pytest.raises(KeyError, match="hr"):
        rows_to_input({k: v for k, v in batch.items() if not k.startswith("hr")}, modalities=("hr",))


def test_label_classes_come_from_the_rasters_own_tag(demo_region, tmp_path):
    from pipeline.labels import label_classes

    truth = demo_region[0].parent / "truth"
    assert label_classes(truth / "landcover_10m.tif") == 7
    assert label_classes(truth / "flood_20241022.tif") == 3  # its own classes, not the land-cover ones
    untagged = tmp_path / "untagged.tif"
    with rasterio.open(truth / "flood_20241022.tif") as src:
        profile, data = src.profile, src.read()
    with rasterio.open(untagged, "w", **profile) as dst:
        dst.write(data)
    assert label_classes(untagged) is None
    assert label_classes(tmp_path / "missing.tif") is None


def test_a_lost_or_damaged_chunk_fails_the_tile_instead_of_reading_as_nodata(cube, tmp_path):
    """Every chunk is written (empty ones too) with a CRC32C checksum: a chunk file that is gone, or whose bytes
    changed, makes the tile's read fail with the array named, where zarr alone would return fill values (a
    100 % nodata tile in a product reported complete)."""
    import shutil

    from pipeline.inference import read_tiles_local

    copy = tmp_path / "cube.zarr"
    shutil.copytree(cube["path"], copy)
    lost, damaged = cube["done"][0], cube["done"][1]
    g = zarr_cube.tile_group(lost)
    chunks = [p for p in (copy / g / "s2" / "c").rglob("*") if p.is_file()]
    assert chunks
    for p in chunks:
        p.unlink()
    with pytest.raises(zarr_cube.CubeError, match=rf"tile {lost}.*'s2' has 0 of its 1 chunks.*re-ingest"):
        next(read_tiles_local(copy, [lost]))
    f = next(p for p in (copy / zarr_cube.tile_group(damaged) / "s1_mask" / "c").rglob("*") if p.is_file())
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        next(read_tiles_local(copy, [damaged]))
    next(read_tiles_local(copy, [cube["done"][2]]))  # the others read as before
