"""Writing Cloud-Optimized GeoTIFFs: the one place that sets the COG creation options.

GDAL's COG driver (through rasterio) does the layout: internal tiles, overviews, and IFDs ahead of data.
Used for the demo region's assets and truth, and for product mosaics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS


def hex_rgba(color: str) -> tuple[int, int, int, int]:
    """'#rrggbb' -> (r, g, b, 255), a colour-table entry."""
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16), 255


def cog_options(
    dtype: np.dtype | str,
    *,
    paletted: bool = False,
    blocksize: int = 256,
    overview_resampling: str = "average",
    num_threads: int | str | None = None,
) -> dict[str, object]:
    """The COG driver's creation options for rasters of ``dtype``, as rasterio profile keys (lower case; GDAL
    takes them as the upper-case ``-co`` options): deflate, a predictor suited to the data, internal tiles of
    ``blocksize`` pixels, overviews resampled with ``overview_resampling``, BigTIFF when it might be needed.
    ``num_threads``: GDAL threads for compression and overviews (``"ALL_CPUS"`` or a count; None: GDAL's
    default, one)."""
    predictor = "FLOATING_POINT" if np.issubdtype(np.dtype(dtype), np.floating) else "STANDARD"
    if paletted:
        predictor = "NO"  # paletted rasters compress better without the horizontal predictor
    opts: dict[str, object] = dict(
        compress="deflate",
        predictor=predictor,
        blocksize=blocksize,
        overview_resampling=overview_resampling,
        bigtiff="if_safer",
    )
    if num_threads is not None:
        opts["num_threads"] = str(num_threads)
    return opts


def write_cog(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    transform: Affine,
    crs: CRS | str | int,
    nodata: float | int | None = None,
    band_names: Sequence[str] | None = None,
    colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
    tags: Mapping[str, str] | None = None,
    overview_resampling: str = "average",
    blocksize: int = 256,
) -> Path:
    """Write ``data`` (bands, rows, cols) or (rows, cols) as a deflate COG with overviews.

    The file appears atomically (written to a temporary name, then renamed), so a reader never sees a
    partial COG. ``overview_resampling`` is ``average`` for continuous data, ``mode``/``nearest`` for classes.
    """
    path = Path(path)
    arr = data[None] if data.ndim == 2 else data
    count, height, width = arr.shape
    if isinstance(crs, int):
        crs = CRS.from_epsg(crs)
    profile = dict(
        driver="COG",
        width=width,
        height=height,
        count=count,
        dtype=arr.dtype.name,
        crs=crs,
        transform=transform,
        nodata=nodata,
        **cog_options(
            arr.dtype, paletted=colormap is not None, blocksize=blocksize, overview_resampling=overview_resampling
        ),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(arr)
        if band_names is not None:
            for i, name in enumerate(band_names, start=1):
                dst.set_band_description(i, name)
        if colormap is not None:
            dst.write_colormap(1, dict(colormap))
        if tags:
            dst.update_tags(**tags)
    os.replace(tmp, path)
    return path
