"""The embedding field: one unit-length int8 vector per 10 m pixel, as a chunked, georeferenced Zarr v3 store.

What users of embedding products (Google's Satellite Embedding / AlphaEarth, TESSERA) expect: a compact field
they can open with xarray, search by similarity and feed to a linear probe, not float32 feature bands. The
layout follows the Satellite Embedding dataset's: :data:`EMBEDDING_DIMS` dimensions, each pixel's vector scaled
to unit length and quantised linearly to int8 (``round(v * 127)``, so a component is read back as
``q / 127``), nodata ``-128`` (:data:`EMBEDDING_NODATA`). 64 int8 = 64 bytes a pixel, 640 kB a km² before
compression, 4x less than the 64 float32 bands of ``tiny``'s F_fus and 96x less than ``base``'s 1,536.

The width. ``tiny``'s F_fus has exactly 64 channels (2 x ``fusion_dim`` 32): kept as they are. Wider presets
(``base`` 1,536, ``huge`` 2,048) are projected to 64 by a fixed random orthonormal matrix (:func:`projection`,
seeded, stored in the field as ``projection``) [ours]: no paper gives a trained 64-d projection of F_fus, and
a random orthonormal map keeps cosine similarities within a Johnson-Lindenstrauss distortion while costing
nothing to fit; a learned one (PCA on a region, or a distilled head) is the obvious next step and changes
nothing in the format.

Layout of ``<name>.zarr`` (Zarr v3, written by :func:`write_field` from the per-tile GeoTIFFs of an inference
run)::

    /                       attrs "skysense:embedding_field": format, dims, scale, nodata, groups, provenance
    /projection             (dims, F) float32, only when F > dims: vector = projection @ F_fus, then unit-normed
    /<epsg group>/          one group per CRS of the tiles (UTM zone), e.g. "epsg32633"
        embedding           (band, y, x) int8, chunks (dims, tile_px, tile_px): ONE CHUNK PER TILE CORE;
                            attrs scale_factor 1/127, add_offset 0, _FillValue -128 (zarr v3: xarray masks only
                            what the attributes name), grid_mapping spatial_ref
        x, y                pixel-centre coordinates in the group's CRS, metres
        band                0 .. dims-1
        spatial_ref         CF grid mapping (crs_wkt, GeoTransform): rioxarray's ``.rio.crs``

    ds = xr.open_zarr("embeddings.zarr", group="epsg32633")      # decoded: float64 q / 127, NaN nodata
    ds.embedding.rio.crs                                          # EPSG:32633

:func:`most_similar` answers "which pixels are most like this one" over the whole field, chunk by chunk
(cosine similarity, a running top k), so memory does not grow with the field; from the shell::

    python -m pipeline.embedding_field out/embeddings.zarr --lon 9.03 --lat 45.13 --k 20   # JSON lines
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EMBEDDING_DIMS", "EMBEDDING_NODATA", "EMBEDDING_SCALE", "FIELD_FORMAT", "Match", "dequantise", "field_groups",
    "most_similar", "open_field", "projection", "quantise", "read_vector", "vector_at_lonlat", "write_field",
]

EMBEDDING_DIMS = 64  # the Satellite Embedding dataset's width; tiny's F_fus is exactly this wide
EMBEDDING_NODATA = -128  # int8 nodata; valid components are -127 .. 127
EMBEDDING_SCALE = 1.0 / 127.0  # component = q * scale (+ offset 0)
FIELD_FORMAT = "skysense-embedding-field/1"
PROJECTION_SEED = 20260  # [ours] seed of the fixed random orthonormal projection of wider presets


def projection(in_dim: int, dims: int = EMBEDDING_DIMS, seed: int = PROJECTION_SEED) -> np.ndarray | None:
    """The (dims, in_dim) float32 matrix with orthonormal rows that maps F_fus to the field's width, or None when
    ``in_dim <= dims`` (the features are kept as they are). Deterministic: the QR factor of a seeded Gaussian."""
    if in_dim <= dims:
        return None
    g = np.random.default_rng(seed).standard_normal((in_dim, dims))
    q, r = np.linalg.qr(g)
    q *= np.sign(np.diag(r))  # a unique factor, not one that depends on LAPACK's sign choice
    return q.T.astype(np.float32)


def quantise(features: np.ndarray, proj: np.ndarray | None = None) -> np.ndarray:
    """(F, h, w) float features (NaN where nodata) -> (dims, h, w) int8: projected (``proj``), scaled to unit
    length per pixel, ``round(v * 127)``; :data:`EMBEDDING_NODATA` where any feature is not finite or the vector
    is zero."""
    f = np.asarray(features, np.float32)
    ok = np.isfinite(f).all(0)
    flat = np.where(ok, f, 0).reshape(f.shape[0], -1)
    if proj is not None:
        flat = proj @ flat
    norm = np.linalg.norm(flat, axis=0)
    ok &= (norm > 0).reshape(ok.shape)
    unit = flat / np.where(norm > 0, norm, 1)
    q = np.clip(np.rint(unit * 127), -127, 127).astype(np.int8).reshape(-1, *f.shape[1:])
    q[:, ~ok] = EMBEDDING_NODATA
    return q


def dequantise(q: np.ndarray) -> np.ndarray:
    """int8 field values (dims, ...) -> float32 components ``q / 127``, NaN where nodata."""
    q = np.asarray(q)
    out = q.astype(np.float32) * EMBEDDING_SCALE
    out[..., :] = np.where(q == EMBEDDING_NODATA, np.nan, out)
    return out


# ------------------------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TileHeader:
    path: str
    epsg: int
    x0: float  # left edge, CRS metres
    y1: float  # top edge
    res: float
    size: tuple[int, int]  # (height, width)
    bands: int


def _header(path: str) -> _TileHeader:
    import rasterio

    with rasterio.open(path) as src:
        if src.dtypes[0] != "int8":
            raise ValueError(f"{path} is {src.dtypes[0]}, not an int8 embedding tile")
        epsg = src.crs.to_epsg()
        if epsg is None:
            raise ValueError(f"{path}: the field groups tiles by EPSG code; its CRS has none")
        t = src.transform
        return _TileHeader(str(path), epsg, t.c, t.f, t.a, (src.height, src.width), src.count)


def field_groups(root) -> list[str]:
    """The CRS groups of an open field (``zarr.open_group``), from its root attributes."""
    return list(root.attrs[FIELD_ATTR]["groups"])


FIELD_ATTR = "skysense:embedding_field"


def write_field(tiles: Sequence[str | Path], out: str | Path, *, provenance: Mapping[str, Any] | None = None,
                proj: np.ndarray | None = None, threads: int = 4, overwrite: bool = False) -> Path:
    """The Zarr v3 field at ``out`` (module docstring) from per-tile int8 GeoTIFFs (dims bands, nodata -128,
    one tile core each, on the 10 m grid of their UTM zone). Tiles are grouped by CRS; each group's array spans
    the tiles' bounding box, its chunks are the tile cores (a tile is written as exactly one chunk, by
    ``threads`` threads at once; chunks no tile covers are never written and read as nodata). Written to a
    temporary store beside ``out`` and renamed into place: a reader never sees half a field.
    ``provenance``: kept in the root attributes (model, checkpoint, dates, ...)."""
    import rasterio
    import zarr
    from rasterio.crs import CRS

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"the embedding field {out} exists: pass overwrite")
    paths = [str(p) for p in tiles]
    if not paths:
        raise ValueError("no tiles to write an embedding field from")
    heads = [_header(p) for p in paths]
    dims, (th, tw), res = heads[0].bands, heads[0].size, heads[0].res
    for h in heads:
        if (h.bands, h.size, h.res) != (dims, (th, tw), res):
            raise ValueError(f"{h.path}: {h.bands} bands of {h.size} px at {h.res} m, the first tile "
                             f"{paths[0]} {dims} of {(th, tw)} at {res}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    groups: dict[str, dict] = {}
    if proj is not None:
        root.create_array("projection", data=np.asarray(proj, np.float32), dimension_names=["band", "feature"])
    jobs = []
    for epsg in sorted({h.epsg for h in heads}):
        members = [h for h in heads if h.epsg == epsg]
        left, top = min(h.x0 for h in members), max(h.y1 for h in members)
        right = max(h.x0 + tw * res for h in members)
        bottom = min(h.y1 - th * res for h in members)
        width, height = round((right - left) / res), round((top - bottom) / res)
        name = f"epsg{epsg}"
        g = root.create_group(name)
        emb = g.create_array(
            "embedding", shape=(dims, height, width), chunks=(dims, th, tw), dtype="int8",
            fill_value=EMBEDDING_NODATA, dimension_names=["band", "y", "x"],
            attributes={"scale_factor": EMBEDDING_SCALE, "add_offset": 0.0, "_FillValue": EMBEDDING_NODATA,
                        "grid_mapping": "spatial_ref",
                        "coordinates": "spatial_ref", "units": "1",
                        "long_name": "unit-length embedding vector, int8 (component = value / 127)"})
        g.create_array("x", data=left + (np.arange(width) + 0.5) * res, dimension_names=["x"],
                       attributes={"units": "m", "standard_name": "projection_x_coordinate", "axis": "X"})
        g.create_array("y", data=top - (np.arange(height) + 0.5) * res, dimension_names=["y"],
                       attributes={"units": "m", "standard_name": "projection_y_coordinate", "axis": "Y"})
        g.create_array("band", data=np.arange(dims, dtype=np.int32), dimension_names=["band"])
        crs = CRS.from_epsg(epsg)
        g.create_array("spatial_ref", shape=(), dtype="int32", fill_value=0, dimension_names=[],
                       attributes={"crs_wkt": crs.to_wkt(), "spatial_ref": crs.to_wkt(),
                                   "GeoTransform": f"{left} {res} 0 {top} 0 {-res}"})
        groups[name] = {"epsg": epsg, "shape": [height, width], "transform": [res, 0, left, 0, -res, top],
                        "tiles": len(members)}
        for h in members:
            fr, fc = (top - h.y1) / res, (h.x0 - left) / res
            r0, c0 = round(fr), round(fc)
            if abs(fr - r0) > 1e-6 or abs(fc - c0) > 1e-6 or r0 % th or c0 % tw:
                raise ValueError(f"{h.path} is not on the tile grid of its zone (offset {fr:g}, {fc:g} px from the "
                                 f"first tile corner; chunks are whole tiles)")
            jobs.append((emb, h.path, r0, c0))

    def put(job) -> None:
        arr, path, r0, c0 = job
        with rasterio.open(path) as src:
            arr[:, r0:r0 + th, c0:c0 + tw] = src.read()

    with ThreadPoolExecutor(max(1, threads)) as pool:  # zarr compresses outside the GIL
        list(pool.map(put, jobs))
    root.attrs[FIELD_ATTR] = {
        "format": FIELD_FORMAT, "dims": dims, "dtype": "int8", "scale": EMBEDDING_SCALE, "offset": 0.0,
        "nodata": EMBEDDING_NODATA, "unit_length": True, "projection": "projection" if proj is not None else None,
        "groups": groups, "tile_px": [th, tw], "resolution_m": res, "provenance": dict(provenance or {}),
    }
    zarr.consolidate_metadata(str(tmp))  # one metadata read opens every group (xarray looks for it)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------------------------
# reading and searching
# ------------------------------------------------------------------------------------------------------------------
def open_field(path: str | Path, group: str | None = None, decode: bool = True):
    """The field's group (default the first) as an xarray Dataset with its CRS (rioxarray); ``decode``: components
    as float64 ``q / 127`` with NaN nodata (xarray's CF decoding), else the raw int8."""
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr
    import zarr

    root = zarr.open_group(str(path), mode="r")
    group = group or field_groups(root)[0]
    ds = xr.open_zarr(str(path), group=group, mask_and_scale=decode, zarr_format=3)
    return ds


def read_vector(path: str | Path, x: float, y: float, group: str | None = None) -> np.ndarray:
    """The int8 vector (dims,) of the pixel containing (x, y) in the group's CRS (metres)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    name = group or field_groups(root)[0]
    info = root.attrs[FIELD_ATTR]["groups"][name]
    res, _, left, _, _, top = info["transform"]
    r, c = int(math.floor((top - y) / res)), int(math.floor((x - left) / res))
    h, w = info["shape"]
    if not (0 <= r < h and 0 <= c < w):
        raise ValueError(f"({x}, {y}) lies outside the field group {name}")
    return np.asarray(root[name]["embedding"][:, r, c])


@dataclass(frozen=True)
class Match:
    """One pixel of a similarity search: its group, row / column in it, centre (x, y) in the group's CRS and the
    cosine similarity to the query (-1 .. 1)."""

    group: str
    row: int
    col: int
    x: float
    y: float
    similarity: float


def _chunks(root, name: str) -> Iterator[tuple[int, int, np.ndarray]]:
    """(row0, col0, int8 block (dims, th, tw)) of every chunk of a group that holds data: on a local store the
    written chunks are listed from their files ("c/0/<row>/<col>", the default zarr v3 key encoding), so a sparse
    field costs only its tiles; elsewhere every chunk is read (unwritten ones come back as nodata)."""
    arr = root[name]["embedding"]
    _, th, tw = arr.chunks
    _, h, w = arr.shape
    base = Path(str(getattr(arr.store, "root", ""))) / arr.path / "c" / "0"
    if base.is_dir():
        cells = sorted((int(p.parent.name), int(p.name)) for p in base.glob("*/*") if p.name.isdigit())
    else:
        cells = [(i, j) for i in range(math.ceil(h / th)) for j in range(math.ceil(w / tw))]
    for i, j in cells:
        r0, c0 = i * th, j * tw
        yield r0, c0, np.asarray(arr[:, r0:r0 + th, c0:c0 + tw])


def most_similar(path: str | Path, query: np.ndarray, k: int = 100, *, exclude: tuple[str, int, int] | None = None,
                 ) -> list[Match]:
    """The ``k`` pixels of the field most similar to ``query`` (an int8 or float vector of the field's width, e.g.
    :func:`read_vector`) by cosine similarity, best first. Streams the field one chunk (one tile) at a time and
    keeps a running top k, so memory is one chunk whatever the field's size; nodata pixels never match.
    ``exclude``: (group, row, col) of a pixel to leave out (the query's own)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    q = np.asarray(query, np.float32)
    qn = float(np.linalg.norm(q))
    if qn == 0 or not np.isfinite(qn):
        raise ValueError("the query vector is nodata or zero")
    q = q / qn
    best_s = np.empty(0, np.float32)
    best_at: list[tuple[str, int, int]] = []
    for name in field_groups(root):
        for r0, c0, block in _chunks(root, name):
            d, th, tw = block.shape
            flat = block.reshape(d, -1)
            valid = flat[0] != EMBEDDING_NODATA
            if not valid.any():
                continue
            v = flat.astype(np.float32)
            norm = np.sqrt(np.einsum("ij,ij->j", v, v))
            sim = (q @ v) / np.where(norm > 0, norm, 1)
            sim[~valid | (norm == 0)] = -np.inf
            if exclude is not None and exclude[0] == name:
                er, ec = exclude[1] - r0, exclude[2] - c0
                if 0 <= er < th and 0 <= ec < tw:
                    sim[er * tw + ec] = -np.inf
            take = min(k, int(np.isfinite(sim).sum()))
            if take == 0:
                continue
            idx = np.argpartition(-sim, take - 1)[:take]
            cand_s = np.concatenate([best_s, sim[idx]])
            cand_at = best_at + [(name, r0 + int(i) // tw, c0 + int(i) % tw) for i in idx]
            keep = np.argsort(-cand_s, kind="stable")[:k]
            best_s, best_at = cand_s[keep], [cand_at[i] for i in keep]
    out = []
    groups = root.attrs[FIELD_ATTR]["groups"]
    for s, (name, r, c) in zip(best_s, best_at, strict=True):
        res, _, left, _, _, top = groups[name]["transform"]
        out.append(Match(name, r, c, left + (c + 0.5) * res, top - (r + 0.5) * res, float(s)))
    return out


def vector_at_lonlat(path: str | Path, lon: float, lat: float) -> tuple[str, int, int, np.ndarray]:
    """(group, row, col, int8 vector) of the field's pixel at ``lon``/``lat`` (degrees): the first CRS group whose
    extent holds the point. Raises ``ValueError`` when none does."""
    import zarr
    from pyproj import Transformer

    root = zarr.open_group(str(path), mode="r")
    for name, info in root.attrs[FIELD_ATTR]["groups"].items():
        x, y = Transformer.from_crs(4326, info["epsg"], always_xy=True).transform(lon, lat)
        res, _, left, _, _, top = info["transform"]
        r, c = int(math.floor((top - y) / res)), int(math.floor((x - left) / res))
        h, w = info["shape"]
        if 0 <= r < h and 0 <= c < w:
            return name, r, c, np.asarray(root[name]["embedding"][:, r, c])
    raise ValueError(f"lon {lon}, lat {lat} lies outside every group of the field {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.embedding_field FIELD --lon LON --lat LAT [--k K]``: the K pixels of the field most
    like the one at LON/LAT, one JSON object per line (group, row, col, x, y in the group's CRS, lon, lat,
    similarity), best first, the pixel itself left out. Exit 2 for a point outside the field or a nodata pixel."""
    import argparse

    from pyproj import Transformer

    p = argparse.ArgumentParser(description="pixels of an embedding field most similar to one pixel (cosine)")
    p.add_argument("field", help="the embedding field (jobs/infer.py --task embeddings --out FIELD.zarr)")
    p.add_argument("--lon", type=float, required=True)
    p.add_argument("--lat", type=float, required=True)
    p.add_argument("--k", type=int, default=20, help="matches to print (default 20)")
    a = p.parse_args(argv)
    if a.k < 1:
        p.error(f"--k must be at least 1, got {a.k}")
    if not (Path(a.field) / "zarr.json").exists():
        p.error(f"{a.field} is not an embedding field (no zarr.json)")
    try:
        group, r, c, q = vector_at_lonlat(a.field, a.lon, a.lat)
        matches = most_similar(a.field, q, a.k, exclude=(group, r, c))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    epsg = {n: g["epsg"] for n, g in field_summary(a.field)["groups"].items()}
    for m in matches:
        lon, lat = Transformer.from_crs(epsg[m.group], 4326, always_xy=True).transform(m.x, m.y)
        print(json.dumps({"group": m.group, "row": m.row, "col": m.col, "x": m.x, "y": m.y, "lon": round(lon, 7),
                          "lat": round(lat, 7), "similarity": round(m.similarity, 5)}))
    return 0


def field_summary(path: str | Path) -> dict[str, Any]:
    """The root attributes of a field (format, dims, groups, provenance) as a dict."""
    import zarr

    return json.loads(json.dumps(dict(zarr.open_group(str(path), mode="r").attrs[FIELD_ATTR])))


if __name__ == "__main__":
    sys.exit(main())
