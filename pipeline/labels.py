"""Categorical label rasters (land cover, flood maps, any class-id GeoTIFF/COG) on a cube tile's grids.

A label raster in any CRS and resolution is reprojected with GDAL's warper (``rasterio.warp.reproject``,
nearest neighbour: class ids are never blended) onto the tile's 10 m grid or its HR grid, both including the
halo. Pixels outside the raster and the raster's own nodata become :data:`NODATA` (255), the nodata of every
class map in this project. Only the part of the raster under the tile is read, so a country-wide COG is fine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError

from pipeline import zarr_cube
from pipeline.grid import parse_tile_id

NODATA = 255
# The confidence band beside a class map (pipeline.calibration) is nodata exactly where the map is, with the
# same uint8 value: 0..100 are percent.
CONFIDENCE_NODATA = NODATA

__all__ = ["CONFIDENCE_NODATA", "NODATA", "TileGeoref", "labels_on_grid", "labels_on_tile", "open_label_raster",
           "tile_georef"]


@dataclass(frozen=True)
class TileGeoref:
    """Where a tile sample lies: EPSG code and the transforms / shapes of its 10 m and HR grids (with halo)."""

    tile_id: str
    epsg: int
    transform: Affine
    hr_transform: Affine
    shape: tuple[int, int]
    hr_shape: tuple[int, int]

    def grid(self, hr: bool) -> tuple[Affine, tuple[int, int]]:
        return (self.hr_transform, self.hr_shape) if hr else (self.transform, self.shape)


def tile_georef(cube: str | Path, tile_id: str, attrs: dict | None = None) -> TileGeoref:
    """The tile's georeference from its stored attributes (``epsg``, ``transform``, ``hr_transform``,
    ``tile_px``, ``halo_px``, ``hr_ratio``); a tile that is planned but not written yet gets it from the
    cube's grid. ``attrs`` may pass the tile attributes when the caller has read them already."""
    a = zarr_cube.tile_attrs(cube, tile_id) if attrs is None else attrs
    if all(k in a for k in ("epsg", "transform", "hr_transform", "tile_px", "halo_px", "hr_ratio")):
        n = int(a["tile_px"]) + 2 * int(a["halo_px"])
        r = int(a["hr_ratio"])
        return TileGeoref(
            tile_id,
            int(a["epsg"]),
            Affine.from_gdal(*a["transform"]),
            Affine.from_gdal(*a["hr_transform"]),
            (n, n),
            (n * r, n * r),
        )
    cfg = zarr_cube.cube_config(zarr_cube.open_cube(cube))
    tile = parse_tile_id(tile_id, cfg.grid)
    return TileGeoref(
        tile_id, tile.epsg, tile.transform(), tile.transform(cfg.hr_ratio), tile.shape(), tile.shape(cfg.hr_ratio)
    )


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith("/vsi")


def open_label_raster(label_raster: str | Path) -> rasterio.DatasetReader:
    """Open a label raster with a clear error when it is missing or not a single-band raster with a CRS. A URL
    is held to ``pipeline.hrefs.check_user_input`` (no internal addresses, no unknown schemes)."""
    p = str(label_raster)
    if _is_local(p) and not Path(p).exists():
        raise FileNotFoundError(f"label raster {p} does not exist")
    if not _is_local(p) or p.startswith("/vsi"):
        from pipeline.hrefs import check_user_input

        check_user_input(p, "label raster")
    try:
        src = rasterio.open(p)
    except RasterioIOError as e:
        raise ValueError(f"label raster {p} cannot be opened as a raster: {e}") from e
    if src.crs is None:
        src.close()
        raise ValueError(f"label raster {p} has no CRS: it cannot be placed on a tile grid")
    if src.count < 1:
        src.close()
        raise ValueError(f"label raster {p} has no band")
    return src


def labels_on_grid(src: rasterio.DatasetReader, epsg: int, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Band 1 of the open raster ``src`` reprojected (nearest) onto the grid ``transform``/``shape`` in
    EPSG:``epsg``: uint8 class ids, :data:`NODATA` outside the raster and where it is nodata."""
    dtype = np.dtype(src.dtypes[0])
    src_nodata = src.nodatavals[0]
    if dtype == np.uint8:
        work_dtype, fill = np.uint8, NODATA
    elif dtype.kind in "iu" and dtype.itemsize <= 2:
        work_dtype, fill = np.int32, -(2**31)
    elif dtype.kind in "iu":
        work_dtype, fill = np.float64, np.nan  # int32/uint32/int64 class ids: exact in float64
    elif dtype.kind == "f":
        work_dtype, fill = np.float32 if dtype.itemsize <= 4 else np.float64, np.nan
    else:
        raise ValueError(f"label raster {src.name} has data type {dtype}, not class ids")
    out = np.full(shape, fill, work_dtype)
    rasterio.warp.reproject(
        source=rasterio.band(src, 1),
        destination=out,
        src_nodata=src_nodata,
        dst_transform=transform,
        dst_crs=CRS.from_epsg(epsg),
        dst_nodata=fill,
        resampling=Resampling.nearest,
        init_dest_nodata=True,
    )
    if work_dtype == np.uint8:
        return out
    nodata = np.isnan(out) if np.dtype(work_dtype).kind == "f" else out == fill
    values = out[~nodata]
    if values.size and (values.min() < 0 or values.max() > NODATA or (values != np.round(values)).any()):
        raise ValueError(
            f"label raster {src.name} holds values outside the class ids 0..254 (nodata 255) under this tile "
            f"(min {values.min()}, max {values.max()}); declare its nodata or remap its classes"
        )
    res = np.full(shape, NODATA, np.uint8)
    res[~nodata] = values.astype(np.uint8)
    return res


def label_classes(label_raster: str | Path) -> int | None:
    """Number of classes of a label raster from its ``class_names`` tag (a JSON object {value: name}, as
    ``pipeline.cog.write_cog`` writes it): the largest class value + 1. None when the raster has no such tag or
    cannot be read here (the caller then asks for the count)."""
    try:
        with open_label_raster(label_raster) as src:
            names = src.tags().get("class_names")
    except (OSError, RasterioIOError, ValueError):
        return None
    if not names:
        return None
    values = [int(v) for v in json.loads(names)]
    return max(values) + 1 if values else None


def labels_on_tile(label_raster: str | Path, tile_id: str, cube: str | Path, hr: bool) -> np.ndarray:
    """A categorical raster on a cube tile's grid, including the halo.

    ``hr=False``: the 10 m grid, shape ``(y, x)`` of the tile's ``s2``; ``hr=True``: the HR grid, shape
    ``(y_hr, x_hr)``. uint8 class ids, 255 outside the raster and where the raster is nodata (its declared
    nodata value). Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a raster that is not
    georeferenced or holds values that are not class ids 0..255.
    """
    geo = tile_georef(cube, tile_id)
    transform, shape = geo.grid(hr)
    with open_label_raster(label_raster) as src:
        return labels_on_grid(src, geo.epsg, transform, shape)
