"""Mosaics of per-tile predictions into one COG (pipeline.mosaic) and the product's STAC item
(pipeline.product_item), on small synthetic tiles written with rasterio."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pystac
import pystac.validation
import pytest
import rasterio
import rasterio.features
import rasterio.warp
import shapely
import shapely.geometry
from affine import Affine
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

from pipeline.grid import TileGrid, tiles_for_aoi
from pipeline.mosaic import mosaic_parts, mosaic_tiles, quicklook_png
from pipeline.product_item import PROCESSING_SCHEMA, product_item, write_item

# The quicklook PNG has no georeference, by design.
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

NAMES = {0: "water", 1: "forest", 2: "built-up area", 3: "crop"}
CMAP = {0: (30, 80, 200, 255), 1: (20, 120, 40, 255), 2: (200, 30, 30, 255), 3: (240, 220, 90, 255)}
TILE = 256  # px: 3 x 2 tiles = 768 x 512 px, one overview level at the default 512 px blocks
ORIGIN = (400_000.0, 5_300_000.0)  # top-left of the tile lattice in UTM 32N metres (multiples of 10 m)


def write_tile(path: Path, data: np.ndarray, transform: Affine, crs, nodata) -> Path:
    arr = data[None] if data.ndim == 2 else data
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=arr.shape[2],
        height=arr.shape[1],
        count=arr.shape[0],
        dtype=arr.dtype.name,
        crs=crs,
        transform=transform,
        nodata=nodata,
        compress="deflate",
    ) as dst:
        dst.write(arr)
    return path


def majority_pattern(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes 0-3 whose every aligned 2 x 2 cell holds one class twice and two other classes once each, at
    random places: its mode overview is the majority array. Average resampling (of values, or of palette
    colours) and nearest would give other classes in many cells."""
    major = rng.integers(0, 4, (h // 2, w // 2)).astype(np.uint8)
    # The two other classes: major + 1 + (0 or 1), and major + 3, modulo 4: distinct from each other and major.
    k = rng.integers(0, 2, major.shape).astype(np.uint8)
    cells = np.stack([major, major, (major + 1 + k) % 4, (major + 3) % 4], axis=-1)  # (h/2, w/2, 4)
    cells = rng.permuted(cells, axis=-1)
    full = cells.reshape(h // 2, w // 2, 2, 2).transpose(0, 2, 1, 3).reshape(h, w)
    return full, major


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """3 x 2 class tiles on one 10 m UTM grid, the bottom-right one missing; and the mosaic in memory."""
    d = tmp_path_factory.mktemp("aligned")
    rng = np.random.default_rng(0)
    full, major = majority_pattern(rng, 2 * TILE, 3 * TILE)
    full[5:9, 7:300] = 255  # nodata inside a tile stays nodata (tile nodata is transparent)
    ref = full.copy()
    ref[TILE:, 2 * TILE :] = 255  # the missing tile: no tile covers it
    tiles = []
    for r in range(2):
        for c in range(3):
            if (r, c) == (1, 2):
                continue
            tr = Affine(10, 0, ORIGIN[0] + c * TILE * 10, 0, -10, ORIGIN[1] - r * TILE * 10)
            part = full[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
            tiles.append(write_tile(d / f"t_{r}_{c}.tif", part, tr, "EPSG:32632", 255))
    out = mosaic_tiles(
        tiles, d / "classes.tif", colormap=CMAP, class_names=NAMES, band_names=["class"], tags={"model": "tiny"}
    )
    return dict(dir=d, tiles=tiles, ref=ref, major=major, out=out)


def test_aligned_mosaic_is_exact_valid_cog(aligned):
    out = aligned["out"]
    assert cog_validate(str(out), strict=True)[0], cog_validate(str(out))
    with rasterio.open(out) as src:
        assert src.crs == CRS.from_epsg(32632)
        assert src.transform == Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1])
        assert (src.width, src.height, src.count) == (3 * TILE, 2 * TILE, 1)
        assert src.dtypes == ("uint8",) and src.nodata == 255
        assert src.block_shapes == [(512, 512)]
        assert src.compression.name == "deflate"
        assert src.colormap(1)[2] == CMAP[2] and src.colorinterp[0].name == "palette"
        assert json.loads(src.tags()["class_names"]) == {str(k): v for k, v in NAMES.items()}
        assert src.tags()["model"] == "tiny" and src.descriptions == ("class",)
        # Every pixel equals the tiles' (no hole at a tile border); the missing tile's area is nodata.
        np.testing.assert_array_equal(src.read(1), aligned["ref"])
        assert src.overviews(1) == [2]
    with rasterio.open(out, overview_level=0) as ov:
        level = ov.read(1)
    # Mode: the majority of every 2 x 2 cell, nodata where a whole cell is nodata (the missing tile). Nearest
    # fails here; average on a paletted band cannot (GDAL resamples it by colour, which lands on the majority
    # too): test_class_overviews_are_mode_not_average tells mode from average.
    expect = aligned["major"].copy()
    expect[TILE // 2 :, TILE:] = 255
    inside = np.ones_like(expect, bool)
    inside[2:5, 3:150] = False  # cells partly nodata: GDAL's mode ignores nodata there
    np.testing.assert_array_equal(level[inside], expect[inside])


def test_product_in_parts_opens_as_one_raster_equal_to_the_single_cog(aligned, tmp_path):
    """Past ``part_px`` a product is a set of COGs on one grid plus a VRT: opened through the VRT (as GDAL and
    QGIS open it) it equals the single-COG mosaic of the same tiles pixel for pixel, with its georeference,
    colour table, class names and band names; a part no tile touches is not written and reads as nodata."""
    vrt, parts = mosaic_parts(aligned["tiles"], tmp_path / "classes.vrt", 300, colormap=CMAP, class_names=NAMES,
                              band_names=["class"], tags={"model": "tiny"})
    assert sorted(p.name for p in parts) == ["r000_c000.tif", "r000_c001.tif", "r000_c002.tif", "r001_c000.tif",
                                             "r001_c001.tif"]  # r001_c002 lies in the missing tile
    assert all(p.parent == tmp_path / "classes.parts" and cog_validate(str(p))[0] for p in parts)
    with rasterio.open(aligned["out"]) as one, rasterio.open(vrt) as many:
        assert many.driver == "VRT"
        assert (many.crs, many.transform, many.width, many.height) == (one.crs, one.transform, one.width,
                                                                       one.height)
        assert many.nodata == 255 and many.dtypes == ("uint8",) and many.descriptions == ("class",)
        assert many.colormap(1)[2] == CMAP[2]
        assert json.loads(many.tags()["class_names"]) == {str(k): v for k, v in NAMES.items()}
        np.testing.assert_array_equal(many.read(1), one.read(1))
    with rasterio.open(parts[1]) as part:  # each part on the product's grid: its origin a pixel of the whole
        assert part.transform == Affine(10, 0, ORIGIN[0] + 300 * 10, 0, -10, ORIGIN[1])
        assert (part.width, part.height) == (300, 300)
    with pytest.raises(FileExistsError):
        mosaic_parts(aligned["tiles"], vrt, 300)


def test_class_overviews_are_mode_not_average(tmp_path):
    """Without a colour table (with one, GDAL resamples a paletted band by colour, which for these cells
    also lands on the majority) mode and average differ: mode overviews hold the majority of every cell."""
    full, major = majority_pattern(np.random.default_rng(3), 256, 384)
    tile = write_tile(tmp_path / "t.tif", full, Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]), "EPSG:32632", 255)
    levels = {}
    for how in ("mode", "average"):
        out = mosaic_tiles([tile], tmp_path / f"{how}.tif", overview_resampling=how, blocksize=128)
        with rasterio.open(out, overview_level=0) as ov:
            levels[how] = ov.read(1)
    np.testing.assert_array_equal(levels["mode"], major)
    assert (levels["average"] != major).mean() > 0.3  # the check above tells the two apart


def test_overlapping_tiles_later_wins_nodata_transparent(tmp_path):
    """Tile b overlaps the right half of tile a: b's pixels win there, except where b is nodata."""
    a = np.full((20, 40), 1, np.uint8)
    b = np.full((20, 40), 2, np.uint8)
    b[:, :5] = 255
    ta = write_tile(tmp_path / "a.tif", a, Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]), "EPSG:32632", 255)
    tb = write_tile(tmp_path / "b.tif", b, Affine(10, 0, ORIGIN[0] + 200, 0, -10, ORIGIN[1]), "EPSG:32632", 255)
    with rasterio.open(mosaic_tiles([ta, tb], tmp_path / "m.tif")) as src:
        got = src.read(1)
    ref = np.full((20, 60), 2, np.uint8)
    ref[:, :25] = 1
    np.testing.assert_array_equal(got, ref)


def test_refuses_existing_output_unless_overwrite(aligned, tmp_path):
    out = tmp_path / "m.tif"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="m.tif exists"):
        mosaic_tiles(aligned["tiles"][:2], out)
    assert out.read_bytes() == b"precious"
    mosaic_tiles(aligned["tiles"][:2], out, overwrite=True, colormap=CMAP)
    with rasterio.open(out) as src:
        assert src.width == 2 * TILE and src.height == TILE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif"]  # no temporary file left behind


def test_unreadable_tile_names_the_file(aligned, tmp_path):
    bad = tmp_path / "corrupt_tile.tif"
    bad.write_bytes(b"II*\x00 this is not a GeoTIFF")
    with pytest.raises(ValueError, match="corrupt_tile.tif"):
        mosaic_tiles([*aligned["tiles"], bad], tmp_path / "m.tif")
    # A tile cut short: its header may still open, its pixels cannot be read.
    cut = tmp_path / "cut_tile.tif"
    data = aligned["tiles"][0].read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut_tile.tif"):
        mosaic_tiles([cut], tmp_path / "m.tif")
    with pytest.raises(FileNotFoundError, match="no_such_tile.tif"):
        mosaic_tiles([tmp_path / "no_such_tile.tif"], tmp_path / "m.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt_tile.tif", "cut_tile.tif"]


@pytest.fixture(scope="module")
def two_zones(tmp_path_factory):
    """Grid tiles (40 px cores) of an AOI across the 6 E boundary of UTM zones 31N and 32N, each tile one value
    (zone 31: 1..4, zone 32: 5..8 by position), with their footprints in lon/lat."""
    d = tmp_path_factory.mktemp("zones")
    grid = TileGrid(tile_px=40, halo_px=0)
    aoi = shapely.geometry.box(5.99, 47.998, 6.01, 48.006)
    tiles = tiles_for_aoi(aoi, grid)
    assert {t.zone for t in tiles} == {31, 32}
    paths, values, footprints = [], [], []
    for t in tiles:
        v = (1 if t.zone == 31 else 5) + (t.col % 2) + 2 * (t.row % 2)
        x0, _, _, y1 = t.core_bounds()
        paths.append(
            write_tile(d / f"{t.id}.tif", np.full((40, 40), v, np.uint8), Affine(10, 0, x0, 0, -10, y1), t.crs, 255)
        )
        values.append(v)
        footprints.append(t.footprint_lonlat(halo=False))
    return dict(dir=d, paths=paths, values=values, footprints=footprints)


def _check_coverage(out: Path, zones: dict) -> None:
    """Inside the union of the tile footprints (less two pixels) no pixel is nodata, and a point inside
    exactly one tile has that tile's value; outside every footprint (beyond two pixels) all is nodata."""
    with rasterio.open(out) as src:
        data, crs, tr = src.read(1), src.crs, src.transform
        res = abs(tr.a)

    def to_dst(g):
        return shapely.transform(g, lambda xy: np.column_stack(rasterio.warp.transform("EPSG:4326", crs, *xy.T)))

    fps = [to_dst(shapely.segmentize(f, 1e-4)) for f in zones["footprints"]]
    union = shapely.union_all(fps)
    inner = rasterio.features.geometry_mask([union.buffer(-2 * res)], data.shape, tr, invert=True)
    assert inner.sum() > 0.8 * data.size * (union.area / (data.size * res * res))
    assert (data[inner] != 255).all(), "holes inside the tiles' union"
    outer = rasterio.features.geometry_mask([union.buffer(2 * res)], data.shape, tr)
    assert (data[outer] == 255).all()
    checked = 0
    for fp, v in zip(fps, zones["values"], strict=True):
        p = fp.centroid
        if sum(f.buffer(2 * res).contains(p) for f in fps) == 1:
            r, c = rasterio.transform.rowcol(tr, p.x, p.y)
            assert data[r, c] == v
            checked += 1
    assert checked >= 4


def test_two_utm_zones_default_crs(two_zones, tmp_path):
    out = mosaic_tiles(two_zones["paths"], tmp_path / "zones.tif")
    with rasterio.open(out) as src:
        # The union's centre is at ~6.0 E: UTM zone 32N (6-12 E) by the grid's zone rule.
        assert src.crs == CRS.from_epsg(32632)
        assert src.res == (10.0, 10.0) and src.transform.c % 10 == 0 and src.transform.f % 10 == 0
        values = set(np.unique(src.read(1)).tolist())
        assert values <= {*two_zones["values"], 255} and values & {1, 2, 3, 4} and values & {5, 6, 7, 8}
    _check_coverage(out, two_zones)
    assert cog_validate(str(out))[0]


def test_two_utm_zones_into_epsg_3035(two_zones, tmp_path):
    out = mosaic_tiles(two_zones["paths"], tmp_path / "laea.tif", dst_crs=3035, resolution=20)
    with rasterio.open(out) as src:
        assert src.crs == CRS.from_epsg(3035)
        assert src.res == (20.0, 20.0) and src.transform.c % 20 == 0 and src.transform.f % 20 == 0
    _check_coverage(out, two_zones)


def test_float_embeddings_nan_nodata(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 64, 80)).astype(np.float32)
    b = rng.normal(size=(3, 64, 80)).astype(np.float32)
    a[:, 10:20, 30:40] = np.nan
    # Tile b sits one tile width to the right of a gap: the gap is nodata.
    ta = write_tile(tmp_path / "a.tif", a, Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]), "EPSG:32632", float("nan"))
    tb = write_tile(
        tmp_path / "b.tif", b, Affine(10, 0, ORIGIN[0] + 1600, 0, -10, ORIGIN[1]), "EPSG:32632", float("nan")
    )
    out = mosaic_tiles(
        [ta, tb],
        tmp_path / "emb.tif",
        nodata=float("nan"),
        overview_resampling="average",
        band_names=["e0", "e1", "e2"],
        blocksize=128,
    )
    assert cog_validate(str(out))[0]
    with rasterio.open(out) as src:
        assert src.dtypes == ("float32",) * 3 and math.isnan(src.nodata)
        assert src.descriptions == ("e0", "e1", "e2") and src.block_shapes[0] == (128, 128)
        assert src.overviews(1) == [2]
        got = src.read()
    ref = np.full((3, 64, 240), np.nan, np.float32)
    ref[:, :, :80], ref[:, :, 160:] = a, b
    np.testing.assert_array_equal(got, ref)
    png = quicklook_png(out, tmp_path / "emb.png", max_side=100)
    with rasterio.open(png) as q:
        assert (q.width, q.height, q.count) == (100, 27, 4)
        alpha = q.read(4)
        # The gap between the tiles (columns 80-160 of 240) is transparent, tile b (160-240) opaque.
        assert (alpha[:, 35:65] == 0).all() and (alpha[:, 68:] == 255).all()


def test_quicklook_paletted(aligned, tmp_path):
    png = quicklook_png(aligned["out"], tmp_path / "q.png", max_side=192)
    with rasterio.open(png) as q:
        assert q.driver == "PNG" and (q.width, q.height, q.count) == (192, 128, 4)
        rgba = q.read()
    assert (rgba[3, -32:, -64:] == 0).all()  # the missing tile is transparent
    colours = {tuple(int(x) for x in px) for px in rgba[:, 8:64, :64].reshape(4, -1).T}  # below the nodata strip
    assert colours <= set(CMAP.values()) and len(colours) > 1


def test_product_item(aligned, tmp_path):
    out = aligned["out"]
    png = quicklook_png(out, tmp_path / "q.png")
    prov = {
        "model_preset": "tiny",
        "checkpoint_sha256": "ab" * 32,
        "input_items": ["S2A_1", "S1A_2"],
        "cube": "/data/cube.zarr",
        "dates": [datetime(2024, 5, 1, tzinfo=timezone.utc)],
        "software": {"skysense": "0.1.0"},
    }
    item = product_item(
        out,
        item_id="landcover-2024-tiny",
        start=datetime(2024, 4, 1),
        end=datetime(2024, 9, 30, tzinfo=timezone.utc),
        colormap=CMAP,
        provenance=prov,
        quicklook=png,
        collection="skysense-products",
        collection_href="../collection.json",
    )
    # class_names from the COG's own tag; colours from the colormap.
    classes = ClassificationExtension.ext(item.assets["data"]).classes
    assert [(c.value, c.name, c.color_hint) for c in classes] == [
        (0, "water", "1E50C8"),
        (1, "forest", "147828"),
        (2, "built-up_area", "C81E1E"),
        (3, "crop", "F0DC5A"),
    ]
    assert classes[2].title == "built-up area"
    proj = ProjectionExtension.ext(item)
    assert proj.epsg == 32632 and proj.shape == [2 * TILE, 3 * TILE]
    assert proj.transform == [10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1]]
    assert RasterExtension.ext(item.assets["data"]).bands[0].nodata == 255
    assert item.properties["skysense:checkpoint_sha256"] == "ab" * 32
    assert item.properties["skysense:dates"] == ["2024-05-01T00:00:00Z"]
    assert item.properties["processing:software"] == {"skysense": "0.1.0"}
    assert PROCESSING_SCHEMA in item.stac_extensions
    assert item.common_metadata.start_datetime == datetime(2024, 4, 1, tzinfo=timezone.utc)
    assert item.datetime is None and item.collection_id == "skysense-products"
    assert item.assets["data"].media_type == pystac.MediaType.COG and item.assets["thumbnail"].roles == ["thumbnail"]
    # The bbox holds every tile's lon/lat footprint.
    bbox = shapely.geometry.box(*item.bbox)
    for t in aligned["tiles"]:
        with rasterio.open(t) as src:
            lonlat = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
        assert bbox.buffer(1e-9).contains(shapely.geometry.box(*lonlat))
    assert shapely.geometry.shape(item.geometry).is_valid

    path = write_item(item, tmp_path / "items" / "landcover.json")
    raw = json.loads(path.read_text())
    href = raw["assets"]["data"]["href"]
    assert not Path(href).is_absolute() and (path.parent / href).resolve() == out.resolve()
    assert {link["rel"]: link["href"] for link in raw["links"]} == {"collection": "../collection.json"}
    # The core schema ships with pystac (extension schemas need the network, not there in tests).
    pystac.validation.validate_dict(raw, extensions=[])
    back = pystac.Item.from_file(str(path))
    assert back.id == item.id and back.bbox == item.bbox
    assert Path(back.assets["data"].get_absolute_href()) == out.resolve()
    assert Path(back.assets["thumbnail"].get_absolute_href()) == png.resolve()
    assert [c.to_dict() for c in ClassificationExtension.ext(back.assets["data"]).classes] == [
        c.to_dict() for c in classes
    ]


def test_product_item_float_nan_nodata(tmp_path):
    arr = np.random.default_rng(2).normal(size=(2, 32, 32)).astype(np.float32)
    t = write_tile(tmp_path / "e.tif", arr, Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]), "EPSG:32632", np.nan)
    out = mosaic_tiles([t], tmp_path / "emb.tif", nodata=None, overview_resampling="average")  # tiles' own NaN
    item = product_item(out, item_id="emb", start=datetime(2024, 6, 1), end=None)
    assert item.datetime == datetime(2024, 6, 1, tzinfo=timezone.utc)
    assert "classification:classes" not in item.assets["data"].extra_fields
    assert [b.nodata for b in RasterExtension.ext(item.assets["data"]).bands] == ["nan", "nan"]
    path = write_item(item, tmp_path / "emb.json")  # NaN must not reach the JSON
    assert "NaN" not in path.read_text()
    assert pystac.Item.from_file(str(path)).id == "emb"
