"""A small labelled cube cut from the embedded demo region: the 2 x 2 tiles that several tests share."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from pyproj import Transformer

from pipeline.cube import CubeConfig
from pipeline.demo import DemoConfig
from pipeline.grid import load_aoi
from pipeline.ingest import run_ingest

SEASON = (date(2024, 5, 10), date(2024, 6, 10))


def aoi_2x2_tiles(dcfg: DemoConfig, cfg: CubeConfig):
    """The AOI (lon/lat polygon) of the 2 x 2 tiles of ``cfg.grid`` east of the demo origin: from 45 % into the
    first tile to 45 % into the second, both ways."""
    m = cfg.grid.tile_m
    ox, oy = dcfg.origin_xy
    col0, row0 = int(ox // m) + 2, int((oy - dcfg.extent_m / 2) // m)
    x0, y0 = col0 * m + 0.45 * m, row0 * m + 0.45 * m
    to_ll = Transformer.from_crs(dcfg.epsg, 4326, always_xy=True)
    return load_aoi((*to_ll.transform(x0, y0), *to_ll.transform(x0 + m, y0 + m)))


def ingest_2x2_tiles(catalog: Path, dcfg: DemoConfig, cfg: CubeConfig, dest: Path, **kw):
    """Ingest the 2 x 2 tiles of :func:`aoi_2x2_tiles` over :data:`SEASON` into ``dest`` (``kw``: more
    ``run_ingest`` arguments); returns ``(aoi, ingest report)``."""
    aoi = aoi_2x2_tiles(dcfg, cfg)
    report = run_ingest(str(catalog), aoi, *SEASON, dest, cfg, progress=None, **kw)
    assert report.ok and len(report.done) == 4, report.summary()
    return aoi, report
