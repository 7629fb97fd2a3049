"""Mosaics: per-tile predictions (tile cores) streamed into one Cloud-Optimized GeoTIFF per product.

The tiles are GeoTIFFs, each the core of one grid tile in its own CRS (the tile's UTM zone, 10 m), all with the
same band count and data type: uint8 class ids (nodata 255) for class maps, float32 bands (nodata NaN) for
embeddings. The mosaic is one COG in one CRS on a grid aligned to multiples of its resolution.

How (and why this way rather than ``gdalbuildvrt`` + ``gdal_translate -of COG``):

1. Each tile's header is read once (the only per-tile pass over the list): CRS, transform, size. Its bounds go
   into a shapely STRtree in output pixel coordinates, so finding the tiles under a piece of the output is
   logarithmic in the tile count. A VRT would do the same job for tiles on one grid, but GDAL's VRT scans every
   source for every block it reads: time quadratic in the tile count at 10^4-10^5 tiles, and it cannot hold
   tiles in several UTM zones without one warped VRT per tile.
2. The output is filled chunk by chunk (a few tens of MB each, whatever the output size) into a tiled,
   sparse temporary GeoTIFF (uncompressed while that fits the disk comfortably, else ZSTD level 1: it is
   read back once or twice and deleted). Tiles already on the output grid (same CRS and resolution, origin on
   a pixel corner) are copied with a windowed read; all others are warped for that chunk only
   (``rasterio.warp.reproject``). Where tiles overlap, later tiles in the list paint over earlier ones and
   nodata is transparent (as in a VRT). Chunks no tile touches are never written: sparse blocks read back as
   nodata.
3. GDAL's COG driver copies the temporary file into the final layout: internal tiles, deflate, overviews
   resampled with ``overview_resampling`` (``mode`` for classes), IFDs first. It works block by block too.

Peak memory is one chunk, the GDAL block cache (``cache_mb``), a bounded number of open tiles and the tile
index (under a kilobyte per tile): flat in the output size (bench/mosaic.py measures it). GDAL's overview
computation adds strips of the output's full width (a few hundred rows), so at very wide outputs memory grows
with the width, not the area. The file appears atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.transform
import rasterio.warp
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from pipeline import storage
from pipeline.cog import cog_options
from pipeline.grid import utm_epsg, utm_zone

__all__ = ["class_names_tag", "mosaic_parts", "mosaic_tiles", "plan_parts", "quicklook_png", "write_vrt"]

# Points per tile edge when a tile's bounds are projected into another CRS: a UTM square is not a square in
# EPSG:3035 or in lon/lat, and its corners alone can miss a bulging edge.
_EDGE_POINTS = 11
# Pixel tolerance for "this tile lies on the output grid" (float noise in transforms written by other tools).
_ALIGN_TOL = 1e-6
# Open tile datasets kept between chunks (a chunk's right-edge tiles are the next chunk's left-edge tiles).
# Few: an open tile keeps its decoded blocks in GDAL's block cache, which a tile read once per chunk does not
# need, and holding a chunk row's worth of tiles (256) made peak memory grow with the output width (151 MB at
# 10k x 10k, 205 MB at 20k x 20k; 153 MB at 20k with 8 open tiles). Re-opening a tile costs about a ms.
_OPEN_CACHE = 16


@dataclass(frozen=True)
class _Tile:
    path: str
    crs_key: int  # index into the list of distinct tile CRSs
    transform: Affine
    width: int
    height: int
    nodata: float | int | None


def class_names_tag(class_names: Mapping[int, str] | Sequence[str]) -> str:
    """The ``class_names`` tag value: a JSON object {value: name} with string keys sorted by value, as
    ``pipeline.cog.write_cog`` callers write it and ``pipeline.labels.label_classes`` reads it. A sequence
    names the values 0, 1, 2, ..."""
    items = class_names.items() if isinstance(class_names, Mapping) else enumerate(class_names)
    pairs = sorted((int(v), str(n)) for v, n in items)
    return json.dumps({str(v): n for v, n in pairs})


def _is_nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _valid(data: np.ndarray, nodata) -> np.ndarray | None:
    """Mask of pixels that are not ``nodata`` (None: every pixel is valid)."""
    if nodata is None:
        return None
    if _is_nan(nodata):
        return ~np.isnan(data)
    return data != nodata


def _check_nodata(nodata, dtype: np.dtype) -> None:
    if _is_nan(nodata):
        if dtype.kind != "f":
            raise ValueError(f"nodata NaN cannot be stored in {dtype} tiles: give an integer nodata")
        return
    if np.array(nodata).astype(dtype).item() != nodata:
        raise ValueError(f"nodata {nodata!r} is not representable in the tiles' data type {dtype}")


def _read_headers(paths: list[str], progress) -> tuple[list[_Tile], list[CRS], int, np.dtype]:
    """One open per tile: georeference, and the same band count / data type everywhere. Tiles may be ``s3://``
    URLs (GDAL's ``/vsis3/``, ``pipeline.storage``)."""
    storage.configure_gdal()
    tiles: list[_Tile] = []
    crss: list[CRS] = []
    crs_index: dict[str, int] = {}
    count = dtype = None
    for i, p in enumerate(paths):
        if "://" not in p and not p.startswith("/vsi") and not os.path.exists(p):
            raise FileNotFoundError(f"tile {p} does not exist")
        try:
            with rasterio.open(p) as src:
                crs, transform, width, height = src.crs, src.transform, src.width, src.height
                c, dt, nd = src.count, np.dtype(src.dtypes[0]), src.nodata
                if len(set(src.dtypes)) != 1:
                    raise ValueError(f"tile {p} has bands of several data types {src.dtypes}")
        except RasterioError as e:
            raise ValueError(f"tile {p} cannot be opened as a raster: {e}") from e
        if crs is None or transform == Affine.identity():
            raise ValueError(f"tile {p} is not georeferenced (no CRS or no transform)")
        if count is None:
            count, dtype = c, dt
        elif (c, dt) != (count, dtype):
            raise ValueError(f"tile {p} has {c} band(s) of {dt}, the first tile {paths[0]} {count} of {dtype}")
        key = crs.to_wkt()
        if key not in crs_index:
            crs_index[key] = len(crss)
            crss.append(crs)
        tiles.append(_Tile(p, crs_index[key], transform, width, height, nd))
        if progress and (i + 1) % 10_000 == 0:
            progress(f"mosaic: read {i + 1}/{len(paths)} tile headers")
    return tiles, crss, int(count), np.dtype(dtype)


def _tile_bounds(tiles: list[_Tile], crss: list[CRS], dst_crs: CRS) -> np.ndarray:
    """(n, 4) bounds (left, bottom, right, top) of every tile in ``dst_crs``; one vectorised transform per
    source CRS, with densified edges."""
    out = np.empty((len(tiles), 4))
    t = np.linspace(0.0, 1.0, _EDGE_POINTS)
    # Unit-square outline: 4 edges of _EDGE_POINTS points each, in pixel fractions of the tile.
    u = np.concatenate([t, np.ones_like(t), t[::-1], np.zeros_like(t)])
    v = np.concatenate([np.zeros_like(t), t, np.ones_like(t), t[::-1]])
    by_crs: dict[int, list[int]] = {}
    for i, tile in enumerate(tiles):
        by_crs.setdefault(tile.crs_key, []).append(i)
    for key, idx in by_crs.items():
        idx_arr = np.asarray(idx)
        a = np.array([tiles[i].transform[:6] for i in idx])  # a, b, c, d, e, f
        wh = np.array([(tiles[i].width, tiles[i].height) for i in idx], dtype=float)
        cols = u[None, :] * wh[:, :1]
        rows = v[None, :] * wh[:, 1:]
        xs = a[:, 0:1] * cols + a[:, 1:2] * rows + a[:, 2:3]
        ys = a[:, 3:4] * cols + a[:, 4:5] * rows + a[:, 5:6]
        if crss[key] != dst_crs:
            px, py = rasterio.warp.transform(crss[key], dst_crs, xs.ravel(), ys.ravel())
            xs = np.asarray(px).reshape(xs.shape)
            ys = np.asarray(py).reshape(ys.shape)
        bad = ~(np.isfinite(xs).all(axis=1) & np.isfinite(ys).all(axis=1))
        if bad.any():
            raise ValueError(f"tile {tiles[idx[int(np.argmax(bad))]].path} cannot be projected to {dst_crs}")
        out[idx_arr] = np.column_stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)])
    return out


def _default_crs(tiles: list[_Tile], crss: list[CRS]) -> CRS:
    """The tiles' CRS when they share one, else the UTM zone of the centre of their lon/lat bounding box."""
    if len(crss) == 1:
        return crss[0]
    lonlat = _tile_bounds(tiles, crss, CRS.from_epsg(4326))
    lon = (lonlat[:, 0].min() + lonlat[:, 2].max()) / 2
    lat = (lonlat[:, 1].min() + lonlat[:, 3].max()) / 2
    return CRS.from_epsg(utm_epsg(utm_zone(lon), lat < 0))


def _default_resolution(tiles: list[_Tile], crss: list[CRS], dst_crs: CRS) -> float:
    """The finest tile resolution when the tiles' CRS units are the output's; else the resolution GDAL
    suggests for the first tile in ``dst_crs``."""
    res = min(min(abs(t.transform.a), abs(t.transform.e)) for t in tiles)
    same_units = all(
        c == dst_crs or (c.is_projected and dst_crs.is_projected and c.linear_units == dst_crs.linear_units)
        for c in crss
    )
    if same_units:
        return float(res)
    t0 = tiles[0]
    b = rasterio.transform.array_bounds(t0.height, t0.width, t0.transform)
    tr, _, _ = rasterio.warp.calculate_default_transform(crss[t0.crs_key], dst_crs, t0.width, t0.height, *b)
    return float(abs(tr.a))


class _OpenTiles:
    """A small LRU of open tile datasets (tiles are visited by neighbouring chunks in turn)."""

    def __init__(self, size: int = _OPEN_CACHE):
        self.size = size
        self._open: OrderedDict[int, rasterio.DatasetReader] = OrderedDict()

    def get(self, i: int, path: str) -> rasterio.DatasetReader:
        src = self._open.get(i)
        if src is not None:
            self._open.move_to_end(i)
            return src
        try:
            src = rasterio.open(path)
        except RasterioError as e:
            raise ValueError(f"tile {path} cannot be opened as a raster: {e}") from e
        self._open[i] = src
        if len(self._open) > self.size:
            self._open.popitem(last=False)[1].close()
        return src

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()


def _temp_compression(nbytes: float, directory: Path) -> str | None:
    """None (uncompressed, the fastest to write and read back) when the full-size temporary file would take
    less than a quarter of the free disk, else ZSTD level 1."""
    free = shutil.disk_usage(directory).free
    return None if nbytes < free / 4 else "zstd"


def _output_grid(infos: list[_Tile], crss: list[CRS], dst_crs, resolution, extent=None):
    """(output CRS, resolution, every tile's bounds in it (N, 4), (x0, y1, width, height)) of a mosaic: the
    grid aligned to multiples of the resolution over the tiles' union, or over ``extent``."""
    dcrs = _default_crs(infos, crss) if dst_crs is None else CRS.from_user_input(dst_crs)
    res = float(resolution) if resolution is not None else _default_resolution(infos, crss, dcrs)
    if not res > 0:
        raise ValueError(f"resolution must be > 0, got {res}")
    bounds = _tile_bounds(infos, crss, dcrs)
    left, bottom, right, top = extent if extent is not None else (
        bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max())
    # Snap outwards to multiples of the resolution; the tolerance keeps exact multiples where they are.
    x0 = math.floor(left / res + _ALIGN_TOL) * res
    y1 = math.ceil(top / res - _ALIGN_TOL) * res
    width = math.ceil((right - x0) / res - _ALIGN_TOL)
    height = math.ceil((y1 - bottom) / res - _ALIGN_TOL)
    return dcrs, res, bounds, (x0, y1, width, height)


@dataclass(frozen=True)
class ProductPart:
    """One COG of a product split in parts: its place in the product grid (row and column of parts; pixel
    offset and size), its extent in the product CRS and the indices of the tiles under it."""

    row: int
    col: int
    px: tuple[int, int, int, int]  # column offset, row offset, width, height in product pixels
    bounds: tuple[float, float, float, float]
    tiles: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"r{self.row:03d}_c{self.col:03d}.tif"


@dataclass(frozen=True)
class PartsPlan:
    """The product grid and its parts (:func:`plan_parts`)."""

    crs: CRS
    res: float
    transform: Affine
    width: int
    height: int
    count: int
    dtype: np.dtype
    nodata: float | int | None
    parts: tuple[ProductPart, ...]


def plan_parts(tiles: Sequence[str | Path], part_px: int, *, dst_crs=None, resolution=None, nodata=255,
               progress: Callable[[str], None] | None = None) -> PartsPlan:
    """The grid of the whole product (as :func:`mosaic_tiles` would make it) cut into parts of ``part_px`` x
    ``part_px`` output pixels (the last row and column smaller), each with the tiles under it; parts no tile
    touches are left out. One pass over the tile headers."""
    if part_px < 16:
        raise ValueError(f"part_px must be >= 16, got {part_px}")
    paths = [str(p) for p in tiles]
    if not paths:
        raise ValueError("no tiles to mosaic")
    infos, crss, count, dtype = _read_headers(paths, progress)
    if nodata is None:
        nodata = infos[0].nodata
    dcrs, res, bounds, (x0, y1, width, height) = _output_grid(infos, crss, dst_crs, resolution)
    tree = shapely.STRtree(shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3]))
    parts = []
    for r, r0 in enumerate(range(0, height, part_px)):
        for c, c0 in enumerate(range(0, width, part_px)):
            w, h = min(part_px, width - c0), min(part_px, height - r0)
            left, top = x0 + c0 * res, y1 - r0 * res
            box = (left, top - h * res, left + w * res, top)
            # strictly inside: a tile that only touches the part's edge puts no pixel in it
            hits = [int(i) for i in np.sort(tree.query(shapely.box(*box), predicate="intersects"))
                    if shapely.box(*bounds[i]).intersection(shapely.box(*box)).area > 0]
            if hits:
                parts.append(ProductPart(r, c, (c0, r0, w, h), box, tuple(hits)))
    return PartsPlan(dcrs, res, Affine(res, 0.0, x0, 0.0, -res, y1), width, height, count, np.dtype(dtype), nodata,
                     tuple(parts))


def mosaic_parts(
    tiles: Sequence[str | Path],
    out_vrt: str | Path,
    part_px: int,
    *,
    map_fn: Callable[[Callable, list], list] | None = None,
    dst_crs: str | int | None = None,
    resolution: float | None = None,
    nodata: float | int | None = 255,
    colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    band_names: Sequence[str] | None = None,
    tags: Mapping[str, str] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    **mosaic_kwargs,
) -> tuple[Path, list[Path]]:
    """A product too large for one COG: one COG per part of ``part_px`` output pixels (:func:`plan_parts`) in
    ``<out_vrt stem>.parts/``, each made by :func:`mosaic_tiles` over its tiles on the whole product's grid,
    and a GDAL VRT at ``out_vrt`` that GDAL, QGIS and rasterio open as one raster (the parts on the same grid,
    so the VRT is exact: no resampling). ``map_fn(fn, args_list) -> results`` runs the parts (default: one
    after another; ``pipeline.inference`` passes Ray tasks). The other arguments as :func:`mosaic_tiles`.
    Returns (VRT path, part COG paths)."""
    out_vrt = Path(out_vrt)
    if out_vrt.exists() and not overwrite:
        raise FileExistsError(f"mosaic output {out_vrt} exists: remove it or pass overwrite=True")
    say = progress or (lambda _msg: None)
    plan = plan_parts(tiles, part_px, dst_crs=dst_crs, resolution=resolution, nodata=nodata)
    say(f"mosaic: {plan.width} x {plan.height} px in {len(plan.parts)} part(s) of at most {part_px} px")
    parts_dir = out_vrt.with_suffix(".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in tiles]
    common = dict(dst_crs=plan.crs.to_epsg() or plan.crs.to_wkt(), resolution=plan.res, nodata=plan.nodata,
                  colormap=colormap, class_names=class_names, band_names=band_names, tags=tags, overwrite=True,
                  **mosaic_kwargs)
    jobs = [([paths[i] for i in p.tiles], str(parts_dir / p.name), p.bounds, common) for p in plan.parts]
    run = map_fn or (lambda fn, args: [fn(a) for a in args])
    written = [Path(p) for p in run(_mosaic_part, jobs)]
    for stale in set(parts_dir.glob("r*_c*.tif")) - set(written):  # parts of an earlier, larger product
        stale.unlink()
    write_vrt(out_vrt, plan, written, colormap=colormap, class_names=class_names, band_names=band_names,
              tags=tags)
    say(f"mosaic: wrote {out_vrt} over {len(written)} part COG(s) in {parts_dir.name}/")
    return out_vrt, written


def _mosaic_part(job) -> str:
    """One part of :func:`mosaic_parts` (a top-level function: Ray tasks pickle it)."""
    tiles, out, bounds, common = job
    return str(mosaic_tiles(tiles, out, bounds=bounds, **common))


def write_vrt(path: str | Path, plan: PartsPlan, parts: Sequence[str | Path], *, colormap=None, class_names=None,
              band_names=None, tags=None) -> Path:
    """A GDAL VRT of the part COGs on the product grid of ``plan`` (sources relative to the VRT). Hand-written
    XML: rasterio has no ``BuildVRT`` and GDAL's Python bindings are not a dependency; parts on one grid need
    only a ``SimpleSource`` each, with the part's pixel window as ``DstRect``."""
    import xml.etree.ElementTree as ET

    path = Path(path)
    by_name = {p.name: p for p in plan.parts}
    root = ET.Element("VRTDataset", rasterXSize=str(plan.width), rasterYSize=str(plan.height))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = plan.crs.to_wkt()
    t = plan.transform
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    all_tags = dict(tags or {})
    if class_names is not None:
        all_tags["class_names"] = class_names_tag(class_names)
    if all_tags:
        md = ET.SubElement(root, "Metadata")
        for k, v in all_tags.items():
            ET.SubElement(md, "MDI", key=str(k)).text = str(v)
    gdal_type = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
                 "float32": "Float32", "float64": "Float64"}[plan.dtype.name]
    for b in range(1, plan.count + 1):
        band = ET.SubElement(root, "VRTRasterBand", dataType=gdal_type, band=str(b))
        if plan.nodata is not None:
            ET.SubElement(band, "NoDataValue").text = "nan" if _is_nan(plan.nodata) else repr(plan.nodata)
        if band_names is not None:
            ET.SubElement(band, "Description").text = str(band_names[b - 1])
        if colormap is not None and b == 1:
            ET.SubElement(band, "ColorInterp").text = "Palette"
            table = ET.SubElement(band, "ColorTable")
            for v in range(max(int(k) for k in colormap) + 1):
                rgba = tuple(colormap.get(v, (0, 0, 0, 0))) + (255,) * (4 - len(tuple(colormap.get(v, (0, 0, 0, 0)))))
                ET.SubElement(table, "Entry", c1=str(rgba[0]), c2=str(rgba[1]), c3=str(rgba[2]), c4=str(rgba[3]))
        for p in parts:
            part = by_name[Path(p).name]
            c0, r0, w, h = part.px
            src = ET.SubElement(band, "SimpleSource")
            ET.SubElement(src, "SourceFilename", relativeToVRT="1").text = os.path.relpath(p, path.parent)
            ET.SubElement(src, "SourceBand").text = str(b)
            ET.SubElement(src, "SrcRect", xOff="0", yOff="0", xSize=str(w), ySize=str(h))
            ET.SubElement(src, "DstRect", xOff=str(c0), yOff=str(r0), xSize=str(w), ySize=str(h))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    ET.ElementTree(root).write(tmp, encoding="utf-8")
    os.replace(tmp, path)
    return path


def product_blocksize(tile_px: int, n_tiles: int) -> int:
    """Internal tile side of a product of ``n_tiles`` tile cores of ``tile_px``: 512 px, smaller for small
    products (GDAL makes overviews only down to one block, and a demo product of a few tiles should have
    overviews too)."""
    side = tile_px * math.sqrt(max(n_tiles, 1))
    return 512 if side >= 2048 else max(16, 2 ** int(math.log2(max(side / 4, 16))))


def mosaic_tiles(
    tiles: Sequence[str | Path],
    out: str | Path,
    *,
    dst_crs: str | int | None = None,
    resolution: float | None = None,
    nodata: float | int | None = 255,
    resampling: str = "nearest",
    overview_resampling: str = "mode",
    colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    band_names: Sequence[str] | None = None,
    tags: Mapping[str, str] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    blocksize: int = 512,
    chunk_mb: float = 32.0,
    cache_mb: int = 64,
    num_threads: int | str = "ALL_CPUS",
    bounds: Sequence[float] | None = None,
) -> Path:
    """Mosaic per-tile GeoTIFFs into one COG at ``out`` and return its path.

    ``tiles``: GeoTIFF paths (any CRS and resolution; same band count and data type). Where they overlap,
    later tiles paint over earlier ones; each tile's own nodata is transparent.
    ``dst_crs``: output CRS (EPSG code or any rasterio CRS string); default the tiles' CRS when they share
    one, else the UTM zone of the centre of their union. ``resolution``: output pixel size in ``dst_crs``
    units (metres for UTM and EPSG:3035); default the tiles' (finest) resolution. The grid is aligned to
    multiples of it and covers the union of the tiles; pixels no tile covers are ``nodata``.
    ``nodata``: the output's nodata (255 for class maps; give ``float("nan")`` for float embeddings; None:
    the tiles' own nodata). ``resampling``: for tiles that must be warped (``nearest`` for classes).
    ``overview_resampling``: ``mode`` for classes, ``average`` for continuous bands.
    ``colormap`` ({value: RGBA}) becomes the colour table (single-band uint8/uint16 only); ``class_names``
    ({value: name} or a list indexed by value) the ``class_names`` tag (JSON {value: name});
    ``band_names`` the band descriptions; ``tags`` extra dataset tags.
    ``blocksize``: internal tile side of the COG in pixels. ``chunk_mb``: memory of one output chunk (MB);
    ``cache_mb``: GDAL block cache (MB); ``num_threads``: GDAL threads for compression and overviews.
    ``progress`` is called with a line of text per stage. ``bounds``: (left, bottom, right, top) in ``dst_crs``
    units, the output's extent instead of the tiles' union (snapped outwards to the resolution; one part of a
    larger product, :func:`mosaic_parts`).

    Raises ``FileExistsError`` when ``out`` exists and not ``overwrite``, ``FileNotFoundError`` for a
    missing tile and ``ValueError`` for a tile that cannot be read or does not match the others.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"mosaic output {out} exists: remove it or pass overwrite=True")
    paths = [str(p) for p in tiles]
    if not paths:
        raise ValueError("no tiles to mosaic")
    say = progress or (lambda _msg: None)
    res_kind = Resampling[resampling]
    Resampling[overview_resampling]  # fail early on a typo, not after the whole first pass

    with rasterio.Env(GDAL_CACHEMAX=int(cache_mb), GDAL_NUM_THREADS=str(num_threads)):
        infos, crss, count, dtype = _read_headers(paths, progress)
        if nodata is None:
            nodata = infos[0].nodata
            if nodata is None:
                raise ValueError("the tiles declare no nodata: give one for the pixels no tile covers")
        _check_nodata(nodata, dtype)
        if band_names is not None and len(band_names) != count:
            raise ValueError(f"{len(band_names)} band names for {count} band(s)")
        if colormap is not None and (count != 1 or dtype not in (np.uint8, np.uint16)):
            raise ValueError(f"a colour table needs single-band uint8/uint16 tiles, not {count} band(s) of {dtype}")

        dcrs, res, bounds, (x0, y1, width, height) = _output_grid(infos, crss, dst_crs, resolution, bounds)
        transform = Affine(res, 0.0, x0, 0.0, -res, y1)
        say(f"mosaic: {len(infos)} tiles -> {width} x {height} px, {count} band(s) {dtype}, {dcrs}, {res:g}")

        # Tile bounds in output pixels (col0, row0, col1, row1) for the index; on-grid tiles get integer offsets.
        pix = np.column_stack(
            [(bounds[:, 0] - x0) / res, (y1 - bounds[:, 3]) / res, (bounds[:, 2] - x0) / res, (y1 - bounds[:, 1]) / res]
        )
        same_crs = [c == dcrs for c in crss]
        aligned = np.zeros(len(infos), bool)
        for i, t in enumerate(infos):
            tr = t.transform
            if same_crs[t.crs_key] and tr.b == 0 and tr.d == 0 and abs(tr.a - res) <= _ALIGN_TOL * res:
                if abs(tr.e + res) <= _ALIGN_TOL * res:
                    c, r = pix[i, 0], pix[i, 1]
                    if abs(c - round(c)) < _ALIGN_TOL and abs(r - round(r)) < _ALIGN_TOL:
                        aligned[i] = True
        pix[aligned] = np.round(pix[aligned])
        tree = shapely.STRtree(shapely.box(pix[:, 0], pix[:, 1], pix[:, 2], pix[:, 3]))
        say(f"mosaic: {int(aligned.sum())} tiles on the output grid, {int((~aligned).sum())} to warp")

        # Chunks: square, whole blocks, about chunk_mb each.
        px_bytes = count * dtype.itemsize
        side = int(math.sqrt(chunk_mb * 2**20 / px_bytes)) // blocksize * blocksize
        side = max(blocksize, side)

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.mosaic-{os.getpid()}.tif")
        tmp_cog = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        temp_compress = _temp_compression(float(width) * height * px_bytes, out.parent)
        profile = dict(
            driver="GTiff",
            width=width,
            height=height,
            count=count,
            dtype=dtype.name,
            crs=dcrs,
            transform=transform,
            nodata=nodata,
            tiled=True,
            blockxsize=blocksize,
            blockysize=blocksize,
            sparse_ok=True,  # chunks no tile touches are not written and read back as nodata
            bigtiff="yes",  # an uncompressed temporary file passes 4 GB at ~65k x 65k uint8
            interleave="pixel" if count <= 4 else "band",
        )
        if temp_compress:
            profile.update(compress=temp_compress, zstd_level=1, num_threads=str(num_threads))
        opened = _OpenTiles()
        try:
            with rasterio.open(tmp, "w", **profile) as dst:
                n_rows = math.ceil(height / side)
                for ri, r0 in enumerate(range(0, height, side)):
                    ch = min(side, height - r0)
                    for c0 in range(0, width, side):
                        cw = min(side, width - c0)
                        hits = tree.query(shapely.box(c0, r0, c0 + cw, r0 + ch))
                        if len(hits) == 0:
                            continue
                        buf = np.full((count, ch, cw), nodata, dtype)
                        wrote = False
                        for i in np.sort(hits):  # list order: later tiles paint over earlier ones
                            t = infos[i]
                            try:
                                if aligned[i]:
                                    wrote |= _copy_aligned(opened, i, t, pix[i], buf, r0, c0)
                                else:
                                    wrote |= _copy_warped(
                                        opened, i, t, pix[i], buf, r0, c0, transform, dcrs, nodata, res_kind
                                    )
                            except RasterioError as e:
                                raise ValueError(f"tile {t.path} cannot be read: {e}") from e
                        if wrote:
                            dst.write(buf, window=Window(c0, r0, cw, ch))
                    say(f"mosaic: chunk row {ri + 1}/{n_rows} written")
                if band_names is not None:
                    for b, name in enumerate(band_names, start=1):
                        dst.set_band_description(b, name)
                if colormap is not None:
                    dst.write_colormap(1, dict(colormap))
                all_tags = dict(tags or {})
                if class_names is not None:
                    all_tags["class_names"] = class_names_tag(class_names)
                if all_tags:
                    dst.update_tags(**all_tags)
            opened.close()
            say(f"mosaic: overviews ({overview_resampling}) and COG layout")
            opts = cog_options(
                dtype,
                paletted=colormap is not None,
                blocksize=blocksize,
                overview_resampling=overview_resampling,
                num_threads=num_threads,
            )
            rasterio.shutil.copy(tmp, tmp_cog, driver="COG", **opts)
            if out.exists() and not overwrite:  # appeared while we worked: still never clobber it
                raise FileExistsError(f"mosaic output {out} exists: remove it or pass overwrite=True")
            os.replace(tmp_cog, out)
        finally:
            opened.close()
            for p in (tmp, tmp_cog, Path(f"{tmp_cog}.ovr.tmp"), Path(f"{tmp}.aux.xml")):
                p.unlink(missing_ok=True)
    say(f"mosaic: wrote {out}")
    return out


def _copy_aligned(opened: _OpenTiles, i: int, t: _Tile, pix, buf: np.ndarray, r0: int, c0: int) -> bool:
    """Copy the part of an on-grid tile inside the chunk at (r0, c0) into ``buf``: a windowed read, no warp."""
    tc0, tr0 = int(pix[0]), int(pix[1])
    _, ch, cw = buf.shape
    a0, a1 = max(r0, tr0), min(r0 + ch, tr0 + t.height)
    b0, b1 = max(c0, tc0), min(c0 + cw, tc0 + t.width)
    if a1 <= a0 or b1 <= b0:
        return False
    src = opened.get(i, t.path)
    data = src.read(window=Window(b0 - tc0, a0 - tr0, b1 - b0, a1 - a0))
    view = buf[:, a0 - r0 : a1 - r0, b0 - c0 : b1 - c0]
    valid = _valid(data, t.nodata)
    if valid is None:
        view[...] = data
    else:
        np.copyto(view, data, where=valid)
    return True


def _copy_warped(
    opened: _OpenTiles, i, t: _Tile, pix, buf, r0, c0, transform: Affine, dcrs: CRS, nodata, resampling
) -> bool:
    """Warp the part of a tile inside the chunk at (r0, c0) onto the output grid and paint its valid pixels."""
    _, ch, cw = buf.shape
    # The tile's footprint in output pixels, one pixel wider for resampling kernels at its edge.
    a0, a1 = max(r0, math.floor(pix[1]) - 1), min(r0 + ch, math.ceil(pix[3]) + 1)
    b0, b1 = max(c0, math.floor(pix[0]) - 1), min(c0 + cw, math.ceil(pix[2]) + 1)
    if a1 <= a0 or b1 <= b0:
        return False
    src = opened.get(i, t.path)
    scratch = np.full((buf.shape[0], a1 - a0, b1 - b0), nodata, buf.dtype)
    rasterio.warp.reproject(
        source=rasterio.band(src, list(range(1, src.count + 1))),
        destination=scratch,
        src_nodata=t.nodata,
        dst_transform=transform * Affine.translation(b0, a0),
        dst_crs=dcrs,
        dst_nodata=nodata,
        resampling=resampling,
        init_dest_nodata=True,
    )
    valid = _valid(scratch, nodata)
    np.copyto(buf[:, a0 - r0 : a1 - r0, b0 - c0 : b1 - c0], scratch, where=valid)
    return True


def quicklook_png(cog: str | Path, png: str | Path, max_side: int = 1024) -> Path:
    """A small RGBA PNG of ``cog``, at most ``max_side`` pixels on its longer side (never upscaled).

    Read decimated, so GDAL serves it from an overview level, not the full resolution. Paletted rasters get
    their colour table; others are stretched (2nd-98th percentile of valid pixels per band): the first three
    bands as RGB, or band 1 as grey. Nodata is transparent. Written atomically.
    """
    png = Path(png)
    with rasterio.open(cog) as src:
        scale = max(src.width, src.height) / max_side
        w, h = src.width, src.height
        if scale > 1:
            w, h = max(1, round(src.width / scale)), max(1, round(src.height / scale))
        paletted = src.count == 1 and src.colorinterp[0].name == "palette"
        bands = [1] if paletted or src.count < 3 else [1, 2, 3]
        data = src.read(bands, out_shape=(len(bands), h, w), resampling=Resampling.nearest)
        valid = _valid(data, src.nodata)
        valid = np.ones(data.shape[1:], bool) if valid is None else valid.all(axis=0)
        rgba = np.zeros((4, h, w), np.uint8)
        if paletted:
            lut = np.zeros((256 if data.dtype == np.uint8 else 65536, 4), np.uint8)
            for v, c in src.colormap(1).items():
                if v < len(lut):
                    lut[v] = c[:4] if len(c) >= 4 else (*c[:3], 255)
            rgba = np.moveaxis(lut[data[0]], -1, 0).copy()
        else:
            for k in range(3):
                band = data[min(k, len(bands) - 1)].astype(np.float64)
                good = band[valid & np.isfinite(band)]
                lo, hi = np.percentile(good, [2, 98]) if good.size else (0.0, 1.0)
                scaled = (band - lo) / (hi - lo if hi > lo else 1.0) * 255
                rgba[k] = np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)
            rgba[3] = 255
        rgba[3][~valid] = 0
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    try:
        with warnings.catch_warnings():  # a quicklook has no georeference, on purpose
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", driver="PNG", width=w, height=h, count=4, dtype="uint8") as dst:
                dst.write(rgba)
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.aux.xml").unlink(missing_ok=True)
    return png
