"""Class maps and flood extents as polygons: a class-map GeoTIFF/COG -> GeoParquet, and back.

Why: a product COG answers "what class is this pixel"; a GIS, a database or a report asks "where are the flooded
areas, how big is each, how much in all". :func:`polygonise` turns a uint8 class map (nodata 255,
:data:`pipeline.labels.NODATA`) into one polygon per 4-connected region of one class, with its class id, class
name and area in m², written as GeoParquet (the CRS travels with the file). :func:`rasterise` burns such a file
back onto a raster's grid, which checks the round trip: with no minimum mapping unit and no simplification it
gives the class map back pixel for pixel.

Steps of :func:`polygonise`:

1. Read the band whole. Nodata is the raster's own nodata (and mask) when it has one, else 255.
2. Minimum mapping unit (MMU): ``rasterio.features.sieve`` (GDAL's sieve filter, connectivity 4) merges every
   region smaller than the MMU into its largest neighbour. It runs with the valid-pixel mask, so nodata is never
   a merge target and never filled: nodata stays nodata, and a class patch at a swath edge is not swallowed by
   the nodata around it. A region that stays under the MMU after the sieve (it has no valid neighbour to merge
   into, e.g. a speck surrounded by nodata, or a cluster of specks that merge into each other) is left out, so
   that every polygon written honours the MMU; its pixels read back as nodata. The sieve sees every class, not
   only the kept ones: a water speck in a field is merged into the field before the water class is chosen.
3. ``rasterio.features.shapes`` (connectivity 4, masked to the valid pixels of the kept classes) gives the
   polygons on pixel edges; ``shapely.simplify(preserve_topology=True)`` then simplifies them. With
   ``simplify_m == 0`` this only drops collinear vertices, which is lossless. A tolerance > 0 simplifies each
   polygon on its own, so the borders two neighbouring polygons share may no longer match exactly (slivers and
   overlaps up to about the tolerance); use 0 where the polygons must tile the plane.
4. Areas in m² (see :func:`_areas_m2`): planar in a projected CRS, on the WGS84 ellipsoid in a geographic one.
5. GeoParquet via ``GeoDataFrame.to_parquet``, written to a temporary name in the same directory and renamed,
   so a reader never sees a partial file. No pixel of the kept classes still gives a valid, empty file with the
   same columns and CRS.

Memory: the band is read whole (uint8: a 32768 x 32768 product part is 1 GiB) and the work holds about four
arrays of its size (the band, its sieved copy, two boolean masks), plus the polygons as Python objects, which
grow with the number of regions (a speckled map without an MMU has many). Products larger than that are written
in parts by ``pipeline.mosaic``; polygonise each part.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio.features
import shapely
from pyproj import CRS as ProjCRS
from pyproj import Geod

from pipeline.labels import NODATA, open_label_raster

__all__ = ["VectorResult", "polygonise", "rasterise"]

# Equal-area CRS for areas of lon/lat polygons: NSIDC EASE-Grid 2.0 global, a cylindrical equal-area projection
# on WGS84. Cylindrical: parallels and meridians, the only edges a lon/lat pixel polygon has, stay straight
# lines, so the projected polygon is exactly the same ground and its planar area is its ellipsoidal area.
# pyproj.Geod's polygon area joins vertices by geodesics instead, which bow poleward of a parallel: an edge along
# the 45th parallel 0.1 degree long (one segment once collinear vertices are dropped) moves ~6,400 m² of area,
# 1 degree long ~6.4 km² (growing with the cube of the length); opposite edges only partly cancel.
_EQUAL_AREA_EPSG = 6933
_WGS84 = Geod(ellps="WGS84")
# Slack when the MMU in m² is turned into a pixel count: 500 m² over 100 m² pixels must be 5 px, not 6 because
# of float noise in the pixel area. [ours]
_PX_EPS = 1e-9
# Integer types GDAL's sieve and polygonizer take as they are; other integer rasters are widened to int32.
_GDAL_INT = (np.uint8, np.uint16, np.int16, np.int32)


@dataclass(frozen=True)
class VectorResult:
    """What :func:`polygonise` wrote.

    path: the GeoParquet file; features: rows (polygons) in it; area_m2_by_class: {class name: total area m²} of
    the rows; sieved_pixels: pixels the MMU changed among those of a kept class before or after (every valid
    pixel when all classes are kept): merged into another class, or left out as an isolated region under the MMU;
    seconds: wall time."""

    path: Path
    features: int
    area_m2_by_class: dict[str, float]
    sieved_pixels: int
    seconds: float


def _check_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0.0:  # also refuses NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _metres_per_unit(crs: ProjCRS, centre_lat: float) -> float:
    """Metres per CRS unit along the y axis: the unit's size for a projected CRS; for a geographic one, the
    length of that much latitude at ``centre_lat`` (a degree of longitude is shorter by cos(lat))."""
    unit = crs.axis_info[0].unit_conversion_factor  # metres (projected) or radians (geographic) per unit
    if crs.is_geographic:
        half = math.degrees(unit) / 2.0  # half a unit of latitude, in degrees
        lo, hi = max(centre_lat - half, -90.0), min(centre_lat + half, 90.0)
        return _WGS84.inv(0.0, lo, 0.0, hi)[2] / ((hi - lo) / math.degrees(unit))
    return unit


def _areas_m2(geoms: np.ndarray, crs: ProjCRS) -> np.ndarray:
    """Area in m² of each polygon of ``geoms`` (coordinates in ``crs``).

    Projected CRS: the planar area times the unit's size squared. That is the map's own area: the ground area
    for an equal-area CRS (EPSG:3035, 6933), within about 0.1 % in UTM (scale factor 0.9996 on the central
    meridian, ~1.001 at the zone edge), but 1/cos²(lat) too large in Web Mercator (reproject such rasters first).
    It is also what pixel counts times pixel area give, so UTM products agree with their own pixel statistics.
    Geographic CRS: reprojected to EPSG:6933 (cylindrical equal-area on WGS84, see ``_EQUAL_AREA_EPSG``), then
    planar. Longitudes beyond +-180 (a raster across the antimeridian in 0..360) are not supported."""
    if len(geoms) == 0:
        return np.zeros(0, np.float64)
    if crs.is_geographic:
        import geopandas as gpd

        return np.asarray(gpd.GeoSeries(geoms, crs=crs).to_crs(epsg=_EQUAL_AREA_EPSG).area, np.float64)
    unit = crs.axis_info[0].unit_conversion_factor
    return shapely.area(geoms).astype(np.float64) * unit * unit


def _pixel_area_m2(transform, crs: ProjCRS, width: int, height: int) -> float:
    """Area in m² of one pixel; in a geographic CRS, of the pixel at the raster's centre (pixels shrink towards
    the poles: the MMU in pixels is that of the centre row, off by ~cos ratio at the top and bottom rows)."""
    if crs.is_geographic:
        col, row = width // 2, height // 2
        corners = [transform * (col + dx, row + dy) for dx, dy in ((0, 0), (1, 0), (1, 1), (0, 1))]
        return float(_areas_m2(np.array([shapely.Polygon(corners)]), crs)[0])
    unit = crs.axis_info[0].unit_conversion_factor
    return float(abs(transform.determinant)) * unit * unit


def _empty_frame(crs: ProjCRS, id_dtype: np.dtype):
    import geopandas as gpd
    import pandas as pd

    return gpd.GeoDataFrame(
        {
            "class_id": pd.Series([], dtype=id_dtype),
            "class_name": pd.Series([], dtype=object),
            "area_m2": pd.Series([], dtype=np.float64),
        },
        geometry=gpd.GeoSeries([], crs=crs),
    )


def _write_atomic(frame, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def polygonise(
    raster: str | os.PathLike,
    out: str | os.PathLike,
    *,
    class_names: Mapping[int, str] | None = None,
    classes: Iterable[int] | None = None,
    min_mapping_unit_m2: float = 0.0,
    simplify_m: float = 0.0,
    band: int = 1,
) -> VectorResult:
    """Polygonise band ``band`` of the class-map raster ``raster`` into the GeoParquet file ``out``.

    Columns: ``class_id`` (the raster's values: uint8 for a uint8 raster, else int32), ``class_name`` (str),
    ``area_m2`` (float64, see :func:`_areas_m2`), ``geometry`` (polygons, possibly with holes, in the raster's
    CRS); one row per 4-connected region of one class.

    class_names: {class id: name}; None: the raster's ``class_names`` tag (``pipeline.finetune.label_legend``);
    ids it does not name are named ``str(id)``.
    classes: class ids to keep (e.g. ``[pipeline.flood.FLOOD_WATER]`` for a flood extent); None keeps every
    class; an empty iterable keeps none (an empty file).
    min_mapping_unit_m2: regions smaller than this (m²) are merged into their largest neighbour, or left out when
    they have none (module docstring, step 2); converted to whole pixels by rounding up. 0: no sieve.
    simplify_m: simplification tolerance in metres (converted to CRS units; in a geographic CRS with the length
    of a degree of latitude, so never more than this many metres in any direction); > 0 breaks shared borders.
    band: the band of a multi-band raster (1-based).

    Raises ValueError for a raster that is not of integer type, a band it lacks, a negative MMU or tolerance,
    or a raster without CRS; FileNotFoundError when ``raster`` does not exist. Memory: module docstring."""
    t0 = time.perf_counter()
    mmu = _check_non_negative("min_mapping_unit_m2", min_mapping_unit_m2)
    tolerance_m = _check_non_negative("simplify_m", simplify_m)
    out = Path(out)
    keep_ids = None if classes is None else sorted({int(c) for c in classes})

    with open_label_raster(raster) as src:
        if not 1 <= int(band) <= src.count:
            raise ValueError(f"{raster}: band={band} but the raster has {src.count} band(s)")
        dtype = np.dtype(src.dtypes[band - 1])
        if dtype.kind not in "iu":
            raise ValueError(f"{raster}: band {band} has data type {dtype}, not integer class ids")
        data = src.read(band)
        valid = src.read_masks(band) > 0  # the raster's nodata value, internal mask or alpha
        if src.nodata is None:
            valid &= data != NODATA
        transform, height, width = src.transform, src.height, src.width
        crs = ProjCRS.from_wkt(src.crs.to_wkt())

    if dtype.type not in _GDAL_INT:
        lo, hi = (int(data[valid].min()), int(data[valid].max())) if valid.any() else (0, 0)
        if lo < -(2**31) or hi >= 2**31:
            raise ValueError(f"{raster}: class ids {lo}..{hi} do not fit in int32")
        data = np.where(valid, data, 0).astype(np.int32)
    id_dtype = np.dtype(np.uint8) if dtype == np.uint8 else np.dtype(np.int32)

    size_px = 0
    sieved = data
    if mmu > 0:
        px_m2 = _pixel_area_m2(transform, crs, width, height)
        size_px = max(1, math.ceil(mmu / px_m2 - _PX_EPS))
        if size_px > 1:
            sieved = rasterio.features.sieve(data, size_px, mask=valid, connectivity=4)

    kept = valid if keep_ids is None else valid & np.isin(sieved, keep_ids)
    if sieved is data:
        sieved_pixels = 0
    else:
        changed = sieved != data
        if keep_ids is not None:
            changed &= kept | (valid & np.isin(data, keep_ids))
        sieved_pixels = int(np.count_nonzero(changed))
        del changed

    geoms, ids = [], []
    for geom, value in rasterio.features.shapes(sieved, mask=kept, connectivity=4, transform=transform):
        geoms.append(shapely.geometry.shape(geom))
        ids.append(int(value))
    del sieved, kept, valid, data
    geoms_arr = np.array(geoms, dtype=object)
    ids_arr = np.array(ids, dtype=id_dtype)

    if size_px > 1 and len(geoms_arr):
        # Regions still under the MMU after the sieve had nothing to merge into: leave them out (module
        # docstring, step 2). Pixel counts from the unsimplified pixel-edge polygons are exact.
        px = np.rint(shapely.area(geoms_arr) / abs(transform.determinant)).astype(np.int64)
        small = px < size_px
        sieved_pixels += int(px[small].sum())
        geoms_arr, ids_arr = geoms_arr[~small], ids_arr[~small]

    if len(geoms_arr):
        centre_lat = 0.0
        if crs.is_geographic:
            centre_lat = (transform * (width / 2.0, height / 2.0))[1]
        geoms_arr = shapely.simplify(geoms_arr, tolerance_m / _metres_per_unit(crs, centre_lat),
                                     preserve_topology=True)

    if class_names is None:
        from pipeline.finetune import label_legend  # reads the tag as every other reader of class maps does

        class_names = label_legend(raster)[0]
    names = {int(k): str(v) for k, v in class_names.items()}

    import geopandas as gpd

    if len(geoms_arr):
        areas = _areas_m2(geoms_arr, crs)
        frame = gpd.GeoDataFrame(
            {
                "class_id": ids_arr,
                "class_name": [names.get(int(i), str(int(i))) for i in ids_arr],
                "area_m2": areas,
            },
            geometry=gpd.GeoSeries(geoms_arr, crs=crs),
        )
    else:
        frame = _empty_frame(crs, id_dtype)
    _write_atomic(frame, out)

    by_class: dict[str, float] = {}
    for name, area in zip(frame["class_name"], frame["area_m2"], strict=True):
        by_class[name] = by_class.get(name, 0.0) + float(area)
    return VectorResult(out, len(frame), by_class, sieved_pixels, time.perf_counter() - t0)


def rasterise(
    vectors,
    like: str | os.PathLike,
    *,
    column: str = "class_id",
    nodata: int = NODATA,
    dtype: str | np.dtype | None = None,
) -> np.ndarray:
    """Burn polygons onto the grid of the raster ``like`` (its CRS, transform and size): the inverse of
    :func:`polygonise`, to check a round trip or compare with another map.

    vectors: a GeoParquet path or a GeoDataFrame (reprojected to ``like``'s CRS when it differs); column: the
    value to burn; nodata: the value where no polygon covers a pixel's centre (GDAL's rule: a pixel belongs to a
    polygon when its centre does, so polygons on pixel edges come back exactly); dtype: of the result, None:
    uint8 when the values and ``nodata`` fit in 0..255, else int32. Where polygons overlap (simplification > 0)
    the later row wins. Returns a (rows, cols) array."""
    import geopandas as gpd

    frame = vectors if isinstance(vectors, gpd.GeoDataFrame) else gpd.read_parquet(vectors)
    with rasterio.open(like) as src:
        transform, shape, crs = src.transform, (src.height, src.width), src.crs
    if crs is not None and frame.crs is not None and ProjCRS.from_wkt(crs.to_wkt()) != frame.crs:
        frame = frame.to_crs(crs.to_wkt())
    values = np.asarray(frame[column])
    if dtype is None:
        lo = min(int(values.min()), nodata) if len(values) else nodata
        hi = max(int(values.max()), nodata) if len(values) else nodata
        dtype = np.uint8 if 0 <= lo and hi <= 255 else np.int32
    if len(values) == 0:
        return np.full(shape, nodata, dtype)
    pairs = zip(frame.geometry.values, values.tolist(), strict=True)
    return rasterio.features.rasterize(pairs, out_shape=shape, transform=transform, fill=nodata, dtype=dtype)
