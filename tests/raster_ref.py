"""Independent reference reads for the ingest tests: a source raster put onto a tile's grid with rasterio
directly (GDAL warp), to compare against what the pipeline wrote."""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject

from pipeline.grid import Tile


def reproject_to_tile(
    href: str,
    tile: Tile,
    *,
    band: int = 1,
    ratio: int = 1,
    dtype=np.uint16,
    resampling: Resampling = Resampling.bilinear,
    src_nodata=None,
    dst_nodata=0,
) -> np.ndarray:
    """Band ``band`` of ``href`` warped onto the tile grid at ``10 / ratio`` m with ``resampling``."""
    out = np.zeros(tile.shape(ratio), dtype)
    with rasterio.open(href) as src:
        reproject(
            rasterio.band(src, band),
            out,
            dst_transform=tile.transform(ratio),
            dst_crs=tile.crs.to_wkt(),
            resampling=resampling,
            src_nodata=src_nodata,
            dst_nodata=dst_nodata,
        )
    return out


def exact_bilinear(href: str, tile: Tile, *, band: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact bilinear interpolation of a source band at the tile's pixel centres (pyproj for the coordinates,
    numpy for the interpolation: no GDAL warp approximation). Returns (values, local range, inside): the range
    of the 4 x 4 source pixels around each point bounds how much a position error of up to one source pixel
    can change the value; ``inside`` marks pixels with all four interpolation neighbours in the source."""
    from pyproj import Transformer

    with rasterio.open(href) as src:
        a = src.read(band).astype(np.float64)
        inv, crs = ~src.transform, src.crs
    n = tile.shape()[0]
    t = tile.transform()
    cols, rows = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5)
    x, y = t.c + t.a * cols, t.f + t.e * rows
    sx, sy = Transformer.from_crs(tile.epsg, crs, always_xy=True).transform(x, y)
    fc, fr = inv.a * sx + inv.b * sy + inv.c - 0.5, inv.d * sx + inv.e * sy + inv.f - 0.5
    c0, r0 = np.floor(fc).astype(int), np.floor(fr).astype(int)
    inside = (c0 >= 0) & (r0 >= 0) & (c0 < a.shape[1] - 1) & (r0 < a.shape[0] - 1)
    c0, r0 = np.clip(c0, 0, a.shape[1] - 2), np.clip(r0, 0, a.shape[0] - 2)
    wc, wr = fc - c0, fr - r0
    q = np.stack([a[r0, c0], a[r0, c0 + 1], a[r0 + 1, c0], a[r0 + 1, c0 + 1]])
    values = q[0] * (1 - wc) * (1 - wr) + q[1] * wc * (1 - wr) + q[2] * (1 - wc) * wr + q[3] * wc * wr
    # A small position error can move the interpolation into a neighbouring cell: bound the change by the
    # range of the 4 x 4 source pixels around the point (edge-clamped).
    rr = np.clip(r0[None] + np.arange(-1, 3)[:, None, None], 0, a.shape[0] - 1)
    cc = np.clip(c0[None] + np.arange(-1, 3)[:, None, None], 0, a.shape[1] - 1)
    block = a[rr[:, None], cc[None, :]]  # (4, 4, n, n)
    grad = block.max(axis=(0, 1)) - block.min(axis=(0, 1))
    return values, grad, inside
