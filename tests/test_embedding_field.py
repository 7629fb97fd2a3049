"""pipeline.embedding_field without Ray: quantisation, the Zarr v3 field written from real int8 GeoTIFF tiles in
two UTM zones (one chunk per tile, nodata masked by xarray's decoding, CRS through rioxarray) and the streamed
similarity search."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from pipeline.embedding_field import (
    EMBEDDING_NODATA,
    dequantise,
    field_summary,
    most_similar,
    open_field,
    projection,
    quantise,
    read_vector,
    write_field,
)

TILE = 16


def _tile(path, q: np.ndarray, epsg: int, col: int, row: int, x0: float = 500_000.0, y0: float = 5_000_000.0):
    with rasterio.open(path, "w", driver="GTiff", width=TILE, height=TILE, count=q.shape[0], dtype="int8",
                       crs=f"EPSG:{epsg}", nodata=EMBEDDING_NODATA,
                       transform=from_origin(x0 + col * TILE * 10, y0 - row * TILE * 10, 10, 10)) as dst:
        dst.write(q)
    return path


def test_quantise_unit_length_nodata_and_projection():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((64, 5, 5)).astype(np.float32) * 7
    f[:, 0, 0] = np.nan  # a nodata pixel
    f[:, 0, 1] = 0  # a zero vector has no direction
    f[3, 0, 2] = np.inf
    q = quantise(f)
    assert q.dtype == np.int8 and (q[:, 0, :3] == EMBEDDING_NODATA).all()
    assert (q[:, 1:] != EMBEDDING_NODATA).all() and q[:, 1:].min() >= -127  # -128 is never a component
    v = dequantise(q)
    assert np.isnan(v[:, 0, 0]).all()
    norm = np.sqrt((v[:, 1:] ** 2).sum(0))
    assert np.abs(norm - 1).max() <= 8 * 0.5 / 127
    unit = f[:, 1:] / np.linalg.norm(f[:, 1:], axis=0)
    assert np.abs(v[:, 1:] - unit).max() <= 0.5 / 127 + 1e-6  # half a step
    p = projection(1536)
    assert p.shape == (64, 1536) and np.allclose(p @ p.T, np.eye(64), atol=1e-5)
    assert np.array_equal(p, projection(1536)) and projection(64) is None
    wide = quantise(rng.standard_normal((1536, 2, 2)).astype(np.float32), p)
    assert wide.shape == (64, 2, 2)


def test_field_in_two_zones_one_chunk_per_tile_nodata_masked(tmp_path):
    rng = np.random.default_rng(1)
    tiles, vectors = [], {}
    for name, epsg, col, row in (("a", 32632, 0, 0), ("b", 32632, 2, 1), ("c", 32633, 5, 5)):
        q = quantise(rng.standard_normal((64, TILE, TILE)).astype(np.float32))
        q[:, 3, 4] = EMBEDDING_NODATA
        vectors[name] = q
        tiles.append(_tile(tmp_path / f"{name}.tif", q, epsg, col, row))
    out = write_field(tiles, tmp_path / "field.zarr", provenance={"model": "test"})
    summary = field_summary(out)
    assert set(summary["groups"]) == {"epsg32632", "epsg32633"} and summary["provenance"] == {"model": "test"}
    assert summary["groups"]["epsg32632"]["shape"] == [2 * TILE, 3 * TILE]  # the bounding box of tiles a and b
    chunks = sorted(p.relative_to(out).as_posix() for p in out.glob("*/embedding/c/0/*/*"))
    assert chunks == ["epsg32632/embedding/c/0/0/0", "epsg32632/embedding/c/0/1/2", "epsg32633/embedding/c/0/0/0"]
    ds = open_field(out, "epsg32632")
    emb = ds["embedding"]
    assert emb.rio.crs.to_epsg() == 32632 and emb.encoding["chunks"] == (64, TILE, TILE)
    assert emb.rio.transform().c == 500_000 and emb.rio.transform().f == 5_000_000
    vals = emb.values
    assert np.isnan(vals[:, 3, 4]).all()  # the tile's nodata pixel
    assert np.isnan(vals[:, TILE:, :TILE]).all()  # a chunk no tile wrote
    b = vals[:, TILE:, 2 * TILE:]
    np.testing.assert_allclose(np.nan_to_num(b, nan=9), np.nan_to_num(dequantise(vectors["b"]), nan=9), atol=1e-6)
    raw = open_field(out, "epsg32632", decode=False)["embedding"]
    assert raw.dtype == np.int8 and int(raw[0, 3, 4]) == EMBEDDING_NODATA
    # a tile off the zone's tile lattice is refused
    bad = _tile(tmp_path / "bad.tif", vectors["a"], 32632, 0, 0, x0=500_005.0)
    with pytest.raises(ValueError, match="not on the tile grid"):
        write_field([tiles[0], bad], tmp_path / "bad.zarr")
    with pytest.raises(FileExistsError):
        write_field(tiles, out)


def test_most_similar_finds_the_pixel_and_its_copy_across_zones(tmp_path):
    rng = np.random.default_rng(2)
    qa = quantise(rng.standard_normal((64, TILE, TILE)).astype(np.float32))
    qc = quantise(rng.standard_normal((64, TILE, TILE)).astype(np.float32))
    qc[:, 7, 9] = qa[:, 2, 5]  # the same vector in the other zone
    qa[:, 0, 0] = EMBEDDING_NODATA
    out = write_field([_tile(tmp_path / "a.tif", qa, 32632, 0, 0), _tile(tmp_path / "c.tif", qc, 32633, 0, 0)],
                      tmp_path / "f.zarr")
    x, y = 500_000 + 5 * 10 + 5, 5_000_000 - 2 * 10 - 5
    q = read_vector(out, x, y, "epsg32632")
    assert np.array_equal(q, qa[:, 2, 5])
    best = most_similar(out, q, k=3)
    assert {(m.group, m.row, m.col) for m in best[:2]} == {("epsg32632", 2, 5), ("epsg32633", 7, 9)}
    assert best[0].similarity == pytest.approx(1, abs=1e-6) and best[2].similarity < 0.9
    assert (best[0].x, best[0].y) in ((x, y), (500_000 + 95, 5_000_000 - 75))
    again = most_similar(out, q, k=2, exclude=("epsg32632", 2, 5))
    assert (again[0].group, again[0].row, again[0].col) == ("epsg32633", 7, 9)
    assert all(not (m.group == "epsg32632" and (m.row, m.col) == (0, 0)) for m in most_similar(out, q, k=500))
    with pytest.raises(ValueError, match="nodata or zero"):
        most_similar(out, np.zeros(64), k=1)


def test_command_line_lists_the_most_similar_pixels_as_json(tmp_path, capsys):
    """``python -m pipeline.embedding_field FIELD --lon --lat``: the query pixel's copy first, itself left out;
    exit 2 with one line for a point outside the field."""
    import json

    from pyproj import Transformer

    from pipeline.embedding_field import main

    rng = np.random.default_rng(3)
    q = quantise(rng.standard_normal((64, TILE, TILE)).astype(np.float32))
    q[:, 9, 1] = q[:, 4, 6]
    out = write_field([_tile(tmp_path / "a.tif", q, 32632, 0, 0)], tmp_path / "f.zarr")
    lon, lat = Transformer.from_crs(32632, 4326, always_xy=True).transform(500_000 + 65, 5_000_000 - 45)
    assert main([str(out), "--lon", str(lon), "--lat", str(lat), "--k", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and (rows[0]["row"], rows[0]["col"]) == (9, 1) and rows[0]["similarity"] == 1.0
    assert all((r["row"], r["col"]) != (4, 6) for r in rows)
    assert rows[0]["lon"] == pytest.approx(Transformer.from_crs(32632, 4326, always_xy=True).transform(
        500_000 + 15, 5_000_000 - 95)[0], abs=1e-6)
    assert main([str(out), "--lon", "20", "--lat", str(lat)]) == 2
    assert "outside every group" in capsys.readouterr().err
