"""The embedded demo region: a synthetic but physically plausible multi-sensor STAC catalog.

``python -m pipeline.demo --out DIR [--size-km 5] [--seed 0] [--hr-ratio 8]`` writes ``DIR/catalog.json``,
a static STAC catalog over a square in UTM zone 32N (Po plain, Italy), with COG assets:

- ``sentinel-2-l2a``: one item about every 5 days over a (leap) year; the 10 bands of
  :data:`pipeline.bands.S2_BANDS` as uint16 reflectance x 1e4 at their native 10/20 m, nodata 0, and ``SCL``
  at 20 m. Clouds (opaque cores, thin edges, cirrus) and their shadows are rendered into the bands and
  marked in SCL; ``eo:cloud_cover`` is their share of the valid pixels. Some dates lie at a swath edge and
  are partly nodata, with a footprint to match.
- ``sentinel-1-rtc``: one item about every 6 days, VV and VH as linear gamma0 float32 (like Planetary
  Computer RTC) with multiplicative speckle, alternating ascending/descending orbits; a river flood shows on
  the flood date.
- ``hr-rgb``: high-resolution RGB (uint8, one 3-band ``image`` asset like NAIP) on two dates at
  ``10 / hr_ratio`` m, with texture per class (tree crowns, tramlines, roofs and streets, ripples).

Ground truth in ``DIR/truth/``: ``landcover_10m.tif`` (the S2 grid, class of the HR map at each S2 pixel
centre, as SkySense samples HR labels), ``landcover_hr.tif`` (the HR grid) and ``flood_<date>.tif``
(0 dry, 1 flood water, 2 permanent water), all uint8 with nodata 255, colour tables and class names.

The landscape is a set of continuous fields (meanders, hills, a town, rotated field parcels) evaluated at
any resolution, so the HR map, the truth and the S2/S1 pixels agree. Vegetation follows phenology curves;
the two crop types share one curve shifted in time, so only the time series tells them apart. Every
S2 pixel mixes the classes of the HR pixels inside it. Generation is deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pystac
from affine import Affine
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from pystac.extensions.sar import FrequencyBand, Polarization, SarExtension
from pystac.extensions.sat import OrbitState, SatExtension
from scipy import ndimage
from shapely.geometry import box, mapping

from pipeline import bands as B
from pipeline.cog import hex_rgba, write_cog
from pipeline.flood import FLOOD_CLASSES, FLOOD_DRY, FLOOD_PERMANENT, FLOOD_WATER, flood_legend
from pipeline.grid import to_lonlat
from pipeline.providers import DEMO_PROVIDER_NAME

log = logging.getLogger(__name__)

S2_COLLECTION = "sentinel-2-l2a"
S1_COLLECTION = "sentinel-1-rtc"
HR_COLLECTION = "hr-rgb"
S1_NODATA = -32768.0


@dataclass(frozen=True)
class LandCoverClass:
    value: int
    name: str
    color: str  # hex RGB
    description: str


# Dynamic World-like palette.
DEMO_CLASSES: tuple[LandCoverClass, ...] = (
    LandCoverClass(0, "water", "#419bdf", "river, lake"),
    LandCoverClass(1, "forest", "#397d49", "deciduous hill and riparian woods"),
    LandCoverClass(2, "grassland", "#88b053", "meadows and pasture, green all year, mown"),
    LandCoverClass(3, "built_up", "#c4281b", "town: roofs, streets, roads"),
    LandCoverClass(4, "bare", "#a59b8f", "quarry and river sand bars"),
    LandCoverClass(5, "crop_early", "#e49635", "cereal: green March-June, harvested in July"),
    LandCoverClass(6, "crop_late", "#dfc35a", "maize: same growth curve 75 days later, harvested in October"),
)
WATER, FOREST, GRASS, BUILT, BARE, CROP_EARLY, CROP_LATE = range(7)
NODATA_CLASS = 255


@dataclass(frozen=True)
class DemoConfig:
    size_km: float = 5.0
    seed: int = 0
    hr_ratio: int = 8
    year: int = 2024  # a leap year: day 366 occurs
    epsg: int = 32632
    # Upper-left corner in UTM 32N: about 45.15 N, 9.0 E (Po plain).
    origin_xy: tuple[float, float] = (500_000.0, 5_000_000.0)
    s2_revisit_days: int = 5
    s1_revisit_days: int = 6
    hr_dates: tuple[str, ...] = ("2024-05-18", "2024-08-21")
    flood_near: str = "2024-10-22"  # the flood date is the S1 acquisition closest to this

    def __post_init__(self):
        if not (0.2 <= self.size_km <= 50):  # [ours] 20 px at least; 50 km is 25 M S2 px per date already
            raise ValueError(f"size_km must be between 0.2 and 50 km, got {self.size_km}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.hr_ratio < 1 or self.hr_ratio & (self.hr_ratio - 1):
            raise ValueError(f"hr_ratio must be a power of 2, got {self.hr_ratio}")

    @property
    def s2_px(self) -> int:
        n = int(round(self.size_km * 100))
        return n + (n % 2)  # even, so the 20 m bands tile it exactly

    @property
    def extent_m(self) -> float:
        return self.s2_px * 10.0

    @property
    def hr_res_m(self) -> float:
        return 10.0 / self.hr_ratio

    def transform(self, res: float) -> Affine:
        return Affine(res, 0.0, self.origin_xy[0], 0.0, -res, self.origin_xy[1])

    def s2_dates(self) -> list[date]:
        return _dates(self.year, 3, self.s2_revisit_days)

    def s1_dates(self) -> list[date]:
        return _dates(self.year, 2, self.s1_revisit_days)

    def flood_date(self) -> date:
        target = date.fromisoformat(self.flood_near)
        return min(self.s1_dates(), key=lambda d: abs((d - target).days))


def _dates(year: int, first_day: int, step: int) -> list[date]:
    d, end, out = date(year, 1, first_day), date(year, 12, 31), []
    while d <= end:
        out.append(d)
        d += timedelta(days=step)
    return out


# --------------------------------------------------------------------------------------------- landscape


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigmas: Sequence[float], weights=None
) -> np.ndarray:
    """Sum of Gaussian-filtered white noise octaves, rescaled to [0, 1].

    An octave with a large sigma is made on a grid coarser by ``sigma / 4`` and upsampled bilinearly, which
    looks the same and costs a fraction of a full-resolution filter.
    """
    weights = weights or [1.0] * len(sigmas)
    out = np.zeros(shape, np.float32)
    for s, w in zip(sigmas, weights, strict=True):
        k = max(1, int(s // 4))
        small = (shape[0] // k + 2, shape[1] // k + 2) if k > 1 else shape
        f = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), s / k, mode="wrap")
        if k > 1:
            f = ndimage.zoom(f, k, order=1)[: shape[0], : shape[1]]
        out += w * f / (f.std() + 1e-9)
    lo, hi = np.percentile(out, [0.5, 99.5])
    return np.clip((out - lo) / (hi - lo), 0, 1)


class Landscape:
    """Continuous land-cover fields over the demo square, evaluated at any set of points.

    Coordinates ``u`` (metres east of the west edge) and ``v`` (metres south of the north edge).
    """

    BASE_RES = 20.0  # resolution of the stored noise fields; sampled bilinearly

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 1])
        L = self.L = cfg.extent_m
        nb = int(L / self.BASE_RES) + 8
        self.elev = _smooth_noise(rng, (nb, nb), [nb / 6, nb / 20], [1.0, 0.35])
        self.edge_noise = _smooth_noise(rng, (nb, nb), [3.0, 1.2], [1.0, 0.5])
        self.river_y0 = L * rng.uniform(0.28, 0.38)
        self.river_amp = (L * rng.uniform(0.05, 0.09), L * rng.uniform(0.01, 0.025))
        self.river_wl = (L * rng.uniform(0.8, 1.1), L * rng.uniform(0.2, 0.3))
        self.river_ph = rng.uniform(0, 2 * np.pi, 2)
        self.lake_c = np.array([L * rng.uniform(0.15, 0.3), L * rng.uniform(0.7, 0.85)])
        self.lake_r = L * rng.uniform(0.045, 0.065)
        self.town_c = np.array([L * rng.uniform(0.62, 0.75), L * rng.uniform(0.6, 0.72)])
        self.town_r = L * rng.uniform(0.1, 0.13)
        self.quarry_c = np.array([L * rng.uniform(0.08, 0.2), L * rng.uniform(0.08, 0.2)])
        self.quarry_r = L * rng.uniform(0.03, 0.045)
        self.road_angle = rng.uniform(-0.25, 0.25)
        # Field parcels: a grid rotated by `parcel_angle`, with random row/column widths.
        self.parcel_angle = rng.uniform(np.deg2rad(4), np.deg2rad(14))
        span = 1.6 * L
        self.col_edges = np.concatenate([[-span], -span + np.cumsum(rng.uniform(110, 330, 400))])
        self.row_edges = np.concatenate([[-span], -span + np.cumsum(rng.uniform(110, 330, 400))])
        self.n_cols = len(self.col_edges) - 1
        n_parcels = self.n_cols * (len(self.row_edges) - 1)
        self.parcel_class = rng.choice(
            np.array([GRASS, CROP_EARLY, CROP_LATE]), size=n_parcels, p=[0.26, 0.37, 0.37]
        ).astype(np.uint8)
        self.parcel_shift = rng.normal(0, 6, n_parcels).astype(np.float32)  # sowing date jitter, days
        self.parcel_amp = rng.uniform(0.8, 1.0, n_parcels).astype(np.float32)
        self.parcel_soil = rng.uniform(0.8, 1.2, n_parcels).astype(np.float32)
        self.parcel_mow = rng.uniform(150, 200, n_parcels).astype(np.float32)
        self.parcel_tram_dir = rng.integers(0, 2, n_parcels).astype(np.uint8)
        # Town: buildings on a grid aligned with the main road.
        self.block = 24.0

    def _sample(self, field_: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        coords = np.stack(np.broadcast_arrays(v / self.BASE_RES + 4, u / self.BASE_RES + 4))
        return ndimage.map_coordinates(field_, coords, order=1, mode="nearest").astype(np.float32)

    def river_centre(self, u: np.ndarray) -> np.ndarray:
        (a1, a2), (w1, w2), (p1, p2) = self.river_amp, self.river_wl, self.river_ph
        return self.river_y0 + a1 * np.sin(2 * np.pi * u / w1 + p1) + a2 * np.sin(2 * np.pi * u / w2 + p2)

    def river_half_width(self, u: np.ndarray) -> np.ndarray:
        return 14.0 + 10.0 * (u / self.L)

    def river_distance(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Distance (m) from the river bank, 0 inside the channel (vertical offset, good for gentle meanders)."""
        return np.maximum(np.abs(v - self.river_centre(u)) - self.river_half_width(u), 0.0)

    def parcel_id(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.parcel_angle), math.sin(self.parcel_angle)
        a = c * u + s * v
        b = -s * u + c * v
        col = np.clip(np.searchsorted(self.col_edges, a) - 1, 0, self.n_cols - 1)
        row = np.clip(np.searchsorted(self.row_edges, b) - 1, 0, len(self.row_edges) - 2)
        return (row * self.n_cols + col).astype(np.int32)

    def road_distance(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        # A straight road through the town centre, and a cross road.
        tu, tv = self.town_c
        ca, sa = math.cos(self.road_angle), math.sin(self.road_angle)
        d1 = np.abs(-sa * (u - tu) + ca * (v - tv))
        d2 = np.abs(ca * (u - tu) + sa * (v - tv))
        return np.minimum(d1, np.where(v > tv - self.town_r * 1.5, d2, np.inf))

    def classes(self, u: np.ndarray, v: np.ndarray, parcel: np.ndarray | None = None) -> np.ndarray:
        """Land-cover class (DEMO_CLASSES values) at points (u, v) (broadcastable arrays, e.g. from ``grid``)."""
        edge = self._sample(self.edge_noise, u, v)
        elev = self._sample(self.elev, u, v)
        out = self.parcel_class[self.parcel_id(u, v) if parcel is None else parcel]
        rd = self.river_distance(u, v)
        forest = (elev > 0.66) | ((rd < 45 + 40 * edge) & (elev > 0.25))
        out[forest] = FOREST
        sandbar = (rd > 0) & (rd < 14 + 10 * edge) & (edge > 0.55)
        quarry = np.hypot(u - self.quarry_c[0], v - self.quarry_c[1]) < self.quarry_r * (0.8 + 0.5 * edge)
        out[sandbar | quarry] = BARE
        town = np.hypot(u - self.town_c[0], v - self.town_c[1]) < self.town_r * (0.75 + 0.5 * edge)
        road = self.road_distance(u, v) < 6.0
        out[town | road] = BUILT
        lake = np.hypot(u - self.lake_c[0], (v - self.lake_c[1]) * 1.3) < self.lake_r * (0.85 + 0.3 * edge)
        out[(rd == 0) | lake] = WATER
        return out

    def flood(self, u: np.ndarray, v: np.ndarray, classes: np.ndarray, extent: float = 1.0) -> np.ndarray:
        """Flooded (not permanently wet) points; ``extent`` in (0, 1] shrinks the flood as it recedes."""
        elev = self._sample(self.elev, u, v)
        edge = self._sample(self.edge_noise, u, v)
        reach = extent * (120 + 380 * (1 - elev) + 60 * edge)
        return (self.river_distance(u, v) < reach) & (elev < 0.55) & (classes != WATER) & (classes != BUILT)

    def grid(self, res: float) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates at ``res`` metres: u as a (1, n) row, v as an (n, 1) column (they broadcast)."""
        n = int(round(self.L / res))
        c = ((np.arange(n, dtype=np.float64) + 0.5) * res).astype(np.float32)
        return c[None, :], c[:, None]


# --------------------------------------------------------------------------------------------- phenology


def double_logistic(doy: float | np.ndarray, sos, eos, width: float = 9.0) -> np.ndarray:
    """Green-up at ``sos`` and senescence at ``eos`` (day of year), 0..1."""
    return 1.0 / (1 + np.exp(-(doy - sos) / width)) - 1.0 / (1 + np.exp(-(doy - eos) / width))


CROP_EARLY_SOS, CROP_EARLY_EOS = 75.0, 180.0
CROP_SHIFT_DAYS = 75.0  # crop_late: the same curve, this many days later


def class_green_fraction(c: int, doy: float, parcel_shift, parcel_amp, parcel_mow) -> np.ndarray | float:
    """Green vegetation cover (0..1) of class ``c`` on day-of-year ``doy``; per parcel (arrays) for fields."""
    season = 0.5 - 0.5 * math.cos(2 * math.pi * (doy - 15) / 366)  # 0 mid-January, 1 mid-July
    if c == FOREST:
        return 0.35 + 0.6 * double_logistic(doy, 105, 300, 12)
    if c == GRASS:
        mown = (doy > parcel_mow) & (doy < parcel_mow + 20)
        return 0.45 + 0.4 * season * (1 - 0.5 * mown)
    if c in (CROP_EARLY, CROP_LATE):
        shift = parcel_shift + (CROP_SHIFT_DAYS if c == CROP_LATE else 0.0)
        return np.clip(
            0.05 + 0.9 * parcel_amp * double_logistic(doy, CROP_EARLY_SOS + shift, CROP_EARLY_EOS + shift), 0, 1
        )
    if c == BUILT:
        return 0.12 + 0.1 * season
    return 0.03 if c == BARE else 0.0


def green_fraction(cls: np.ndarray, doy: float, parcel: np.ndarray, land: Landscape) -> np.ndarray:
    """Green vegetation cover (0..1) per pixel of a class map on day-of-year ``doy``."""
    f = np.zeros(cls.shape, np.float32)
    for c in range(len(DEMO_CLASSES)):
        m = cls == c
        if m.any():
            p = parcel[m]
            f[m] = class_green_fraction(c, doy, land.parcel_shift[p], land.parcel_amp[p], land.parcel_mow[p])
    return f


# Endmember spectra, reflectance x 1e4 in S2_BANDS order (B02 B03 B04 B05 B06 B07 B08 B8A B11 B12).
SPEC = {
    "soil": np.array([1100, 1400, 1750, 2000, 2150, 2250, 2400, 2500, 3300, 2800], np.float32),
    "veg": np.array([280, 620, 300, 1050, 2900, 3600, 4000, 4100, 1900, 900], np.float32),
    "forest": np.array([230, 450, 250, 700, 1900, 2450, 2750, 2850, 1350, 620], np.float32),
    "litter": np.array([500, 700, 850, 1100, 1400, 1600, 1800, 1900, 2300, 1700], np.float32),
    "water": np.array([650, 560, 320, 230, 160, 140, 110, 100, 60, 40], np.float32),
    "turbid": np.array([900, 1000, 850, 700, 400, 300, 250, 230, 120, 80], np.float32),
    "urban": np.array([1250, 1350, 1450, 1550, 1650, 1700, 1800, 1850, 2300, 2100], np.float32),
    "sand": np.array([1700, 2000, 2300, 2500, 2650, 2750, 2850, 2950, 3500, 3000], np.float32),
    "cloud": np.array([7200, 7000, 6900, 6900, 6900, 6900, 6900, 6800, 4600, 3200], np.float32),
    "cirrus": np.array([1100, 1050, 1000, 1000, 1000, 1000, 1000, 1000, 900, 700], np.float32),
}
# Sentinel-1 gamma0 in dB per class: (VV, VH) bare state, and the gain at full vegetation.
S1_DB = {
    WATER: ((-22.0, -28.5), (0.0, 0.0)),
    FOREST: ((-8.0, -14.5), (0.8, 1.5)),
    GRASS: ((-12.0, -20.0), (2.5, 4.0)),
    BUILT: ((-1.0, -9.0), (0.0, 0.0)),
    BARE: ((-13.5, -22.0), (0.0, 0.0)),
    CROP_EARLY: ((-13.0, -22.5), (5.0, 8.0)),
    CROP_LATE: ((-13.0, -22.5), (5.0, 8.0)),
}


# --------------------------------------------------------------------------------------------- scene state


@dataclass
class Scene:
    """Everything static over the year, on the S2 (10 m) grid and the HR grid."""

    cfg: DemoConfig
    land: Landscape
    cls10: np.ndarray  # (n, n) uint8 class at S2 pixel centres (= truth)
    frac10: np.ndarray  # (7, n, n) float32 class fractions of the HR pixels inside each S2 pixel
    parcel10: np.ndarray  # (n, n) int32
    texture10: np.ndarray  # (n, n) float32 multiplicative brightness texture, ~1
    permanent_water10: np.ndarray
    flood10: np.ndarray  # bool, full flood extent on the flood date
    flood10_receding: np.ndarray
    cls_hr: np.ndarray  # (N, N) uint8
    parcel_hr: np.ndarray  # (N, N) int32
    hr_layers: HrLayers = field(repr=False)


def build_scene(cfg: DemoConfig) -> Scene:
    land = Landscape(cfg)
    u_hr, v_hr = land.grid(cfg.hr_res_m)
    parcel_hr = land.parcel_id(u_hr, v_hr)
    cls_hr = land.classes(u_hr, v_hr, parcel_hr)
    hr_layers = build_hr_layers(cfg, land, u_hr, v_hr, cls_hr, parcel_hr)
    del u_hr, v_hr
    r = cfg.hr_ratio
    n = cfg.s2_px
    cls10 = cls_hr[r // 2 :: r, r // 2 :: r].copy()  # class at each S2 pixel centre
    frac10 = np.stack([(cls_hr == c).reshape(n, r, n, r).mean(axis=(1, 3)) for c in range(len(DEMO_CLASSES))])
    u10, v10 = land.grid(10.0)
    parcel10 = land.parcel_id(u10, v10)
    rng = np.random.default_rng([cfg.seed, 2])
    texture10 = 1 + 0.05 * (2 * _smooth_noise(rng, (n, n), [1.0, 4.0]) - 1)
    perm = cls10 == WATER
    flood = land.flood(u10, v10, cls10, 1.0)
    receding = land.flood(u10, v10, cls10, 0.55)
    return Scene(
        cfg,
        land,
        cls10,
        frac10.astype(np.float32),
        parcel10,
        texture10.astype(np.float32),
        perm,
        flood,
        receding,
        cls_hr,
        parcel_hr,
        hr_layers,
    )


def flood_state(cfg: DemoConfig, day: date) -> str:
    """'peak' on the flood date and the day before, 'receding' for the week after, else 'none'."""
    dd = (day - cfg.flood_date()).days
    if -1 <= dd <= 2:
        return "peak"
    if 2 < dd <= 9:
        return "receding"
    return "none"


def surface_reflectance(scene: Scene, day: date, rng: np.random.Generator) -> np.ndarray:
    """Cloud-free surface reflectance x 1e4 at 10 m, (10, n, n) float32, mixing the classes in each pixel."""
    doy = day.timetuple().tm_yday
    land, p = scene.land, scene.parcel10
    n = scene.cfg.s2_px
    refl = np.zeros((10, n, n), np.float32)
    for c in range(len(DEMO_CLASSES)):
        w = scene.frac10[c]
        if not w.any():
            continue
        f = np.asarray(
            class_green_fraction(c, doy, land.parcel_shift[p], land.parcel_amp[p], land.parcel_mow[p]), np.float32
        )
        f = f[None] if f.ndim == 2 else f
        if c == WATER:
            spec = SPEC["water"][:, None, None] * np.ones((1, n, n), np.float32)
        elif c == BUILT:
            spec = (1 - f) * SPEC["urban"][:, None, None] + f * SPEC["veg"][:, None, None]
        elif c == BARE:
            spec = SPEC["sand"][:, None, None] * np.ones((1, n, n), np.float32)
        elif c == FOREST:
            spec = (1 - f) * SPEC["litter"][:, None, None] + f * SPEC["forest"][:, None, None]
        else:
            soil = SPEC["soil"][:, None, None] * land.parcel_soil[p][None]
            spec = (1 - f) * soil + f * SPEC["veg"][:, None, None]
        refl += w[None] * spec
    state = flood_state(scene.cfg, day)
    if state != "none":
        wet = scene.flood10 if state == "peak" else scene.flood10_receding
        refl[:, wet] = SPEC["turbid"][:, None]
    refl *= scene.texture10[None]
    refl *= rng.normal(1.0, 0.02)  # per-date illumination / atmosphere
    refl *= rng.normal(1.0, 0.015, refl.shape).astype(np.float32)  # sensor noise
    return refl


@dataclass
class S2Acquisition:
    day: date
    bands10: np.ndarray  # (10, n, n) float32 reflectance x 1e4 incl. clouds; 0 = nodata
    scl20: np.ndarray  # (n/2, n/2) uint8
    valid10: np.ndarray  # bool footprint
    cloud_cover: float  # percent of valid pixels that are cloud or cirrus
    footprint_fraction: float


def _cloud_fraction_for(rng: np.random.Generator, doy: int) -> float:
    winter = 0.5 + 0.5 * math.cos(2 * math.pi * (doy - 15) / 366)  # 1 in January
    u = rng.uniform()
    if u < 0.30 + 0.15 * (1 - winter):
        return 0.0
    if u < 0.55 + 0.1 * (1 - winter):
        return rng.uniform(0.02, 0.25)
    if u < 0.8:
        return rng.uniform(0.25, 0.7)
    return rng.uniform(0.7, 1.0)


def render_s2(scene: Scene, day: date, index: int) -> S2Acquisition:
    cfg = scene.cfg
    rng = np.random.default_rng([cfg.seed, 3, index])
    n = cfg.s2_px
    refl = surface_reflectance(scene, day, rng)
    clean = refl.copy()
    doy = day.timetuple().tm_yday
    target = _cloud_fraction_for(rng, doy)
    alpha = np.zeros((n, n), np.float32)
    if target > 0:
        field_ = _smooth_noise(rng, (n, n), [n / 10, n / 30, 2.0], [1.0, 0.5, 0.1])
        thr = np.quantile(field_, 1 - target)
        alpha = np.clip((field_ - thr) / 0.08, 0, 1) ** 0.8
    cirrus = np.zeros((n, n), np.float32)
    if rng.uniform() < 0.08:
        cirrus = 0.35 * _smooth_noise(rng, (n, n), [n / 5])
    # Shadow: the cloud layer displaced along the sun azimuth (sun in the south-east at 10:30).
    shift = (int(rng.integers(8, 18)), int(-rng.integers(8, 18)))
    shadow = np.roll(alpha, shift, axis=(0, 1))
    shadow_strength = np.clip(shadow, 0, 1) * (alpha < 0.05)
    refl = refl * (1 - 0.65 * shadow_strength[None])
    refl = (1 - cirrus[None]) * refl + cirrus[None] * SPEC["cirrus"][:, None, None]
    refl = (1 - alpha[None]) * refl + alpha[None] * SPEC["cloud"][:, None, None] * rng.normal(1, 0.03)
    # Swath edge: about one date in ten covers only part of the square.
    valid = np.ones((n, n), bool)
    if rng.uniform() < 0.1:
        jj, ii = np.meshgrid(np.arange(n), np.arange(n))
        cut = rng.uniform(0.3, 0.7) * n
        valid = (jj + 0.25 * ii) > cut if rng.uniform() < 0.5 else (jj + 0.25 * ii) < cut + 0.25 * n
    refl = np.clip(np.rint(refl), 1, 65535)
    refl[:, ~valid] = 0
    # SCL at 20 m, from the 20 m means of the same quantities (Sen2Cor runs at 20 m).
    m = n // 2
    a20 = alpha.reshape(m, 2, m, 2).mean(axis=(1, 3))
    c20 = cirrus.reshape(m, 2, m, 2).mean(axis=(1, 3))
    s20 = shadow_strength.reshape(m, 2, m, 2).mean(axis=(1, 3))
    v20 = valid.reshape(m, 2, m, 2).all(axis=(1, 3))
    cl20 = clean.reshape(10, m, 2, m, 2).mean(axis=(2, 4))
    ndvi = (cl20[6] - cl20[2]) / (cl20[6] + cl20[2] + 1e-6)
    state = flood_state(cfg, day)
    wet10 = scene.permanent_water10 | (
        (scene.flood10 if state == "peak" else scene.flood10_receding) if state != "none" else False
    )
    w20 = wet10.reshape(m, 2, m, 2).mean(axis=(1, 3)) >= 0.5
    scl = np.where(ndvi > 0.4, B.SCL_VEGETATION, B.SCL_NOT_VEGETATED).astype(np.uint8)
    scl[w20] = B.SCL_WATER
    scl[s20 > 0.3] = B.SCL_CLOUD_SHADOW
    scl[c20 > 0.12] = B.SCL_THIN_CIRRUS
    scl[a20 > 0.05] = B.SCL_CLOUD_MEDIUM
    scl[a20 > 0.5] = B.SCL_CLOUD_HIGH
    scl[~v20] = B.SCL_NO_DATA
    cloudy = np.isin(scl, (B.SCL_CLOUD_MEDIUM, B.SCL_CLOUD_HIGH, B.SCL_THIN_CIRRUS))
    cc = 100.0 * cloudy[v20].mean() if v20.any() else 100.0
    return S2Acquisition(day, refl, scl, valid, round(float(cc), 2), float(valid.mean()))


def render_s1(scene: Scene, day: date, index: int) -> np.ndarray:
    """(2, n, n) float32 gamma0 in linear power (VV, VH), with speckle."""
    cfg = scene.cfg
    rng = np.random.default_rng([cfg.seed, 4, index])
    n = cfg.s2_px
    doy = day.timetuple().tm_yday
    land, p = scene.land, scene.parcel10
    moisture = rng.normal(0, 1.0)  # dB, rain and soil moisture of the day
    db = np.zeros((2, n, n), np.float32)
    for c, (base, gain) in S1_DB.items():
        w = scene.frac10[c]
        if not w.any():
            continue
        f = class_green_fraction(c, doy, land.parcel_shift[p], land.parcel_amp[p], land.parcel_mow[p])
        for k in range(2):
            v = base[k] + gain[k] * f + (moisture if c not in (WATER, BUILT) else 0.0)
            if c == WATER:
                v = v + rng.normal(0, 1.5)  # wind roughening
            # Mix in linear power, as the radar does.
            db[k] += w * 10 ** (v / 10)
    state = flood_state(cfg, day)
    if state != "none":
        wet = scene.flood10 if state == "peak" else scene.flood10_receding
        db[0][wet] = 10 ** (-21.0 / 10)
        db[1][wet] = 10 ** (-28.0 / 10)
    # Static surface roughness texture (stronger than in optical: corner reflectors, furrows).
    lin = db * (scene.texture10[None] ** 3)
    looks = 4.4
    speckle = rng.gamma(looks, 1 / looks, size=lin.shape).astype(np.float32)
    return (lin * speckle).astype(np.float32)


@dataclass
class HrLayers:
    """Static textures on the HR grid, computed once and shared by every HR date."""

    fine: np.ndarray  # (N, N) float32 0..1, ~2 m noise: crowns, crop vigour
    tram: np.ndarray  # bool: tramlines every 24 m along the parcel axis
    margin: np.ndarray  # bool: 1.5 m grass strips between parcels
    roof_kind: np.ndarray  # int8 per pixel: -1 street, -2 building shadow, -3 road, 0..4 roof colour
    ripple_phase: np.ndarray  # float32 on water pixels (angle of the wave pattern)


def build_hr_layers(
    cfg: DemoConfig, land: Landscape, u: np.ndarray, v: np.ndarray, cls: np.ndarray, parcel: np.ndarray
) -> HrLayers:
    res = cfg.hr_res_m
    N = cls.shape[0]
    fine = _smooth_noise(np.random.default_rng([cfg.seed, 6]), (N, N), [max(2.0 / res, 0.7)])
    c, s = math.cos(land.parcel_angle), math.sin(land.parcel_angle)
    along = np.where(land.parcel_tram_dir[parcel] == 1, c * u + s * v, -s * u + c * v)
    tram = np.abs(((along / 24.0) % 1.0) - 0.5) < (0.9 / 24.0)
    fields = (cls == GRASS) | (cls == CROP_EARLY) | (cls == CROP_LATE)
    # A pixel whose parcel differs from a neighbour's within ~1.5 m lies on a field margin.
    k = max(1, int(round(1.5 / res)))
    boundary = np.zeros(cls.shape, bool)
    boundary[:, k:] |= parcel[:, k:] != parcel[:, :-k]
    boundary[k:, :] |= parcel[k:, :] != parcel[:-k, :]
    margin = fields & boundary
    # Town: a grid of building plots aligned with the main road; roof colour from the plot index.
    roof_kind = np.full(cls.shape, -1, np.int8)
    u, v = np.broadcast_to(u, cls.shape), np.broadcast_to(v, cls.shape)
    bm = cls == BUILT
    tu, tv = land.town_c
    ca, sa = math.cos(land.road_angle), math.sin(land.road_angle)
    x = (ca * (u[bm] - tu) + sa * (v[bm] - tv)) / land.block
    y = (-sa * (u[bm] - tu) + ca * (v[bm] - tv)) / land.block
    bx, by = np.floor(x), np.floor(y)
    fx, fy = x - bx, y - by
    building = (fx > 0.2) & (fx < 0.85) & (fy > 0.2) & (fy < 0.85)
    shadow = (fx > 0.2) & (fx < 0.85) & (fy >= 0.85) & (fy < 0.97)  # cast to the north
    kind = np.where(building, ((bx * 7919 + by * 104729).astype(np.int64) % 5), -1)
    kind = np.where(shadow, -2, kind)
    kind = np.where(land.road_distance(u[bm], v[bm]) < 6.0, -3, kind)
    roof_kind[bm] = kind
    wm = cls == WATER
    ripple_phase = (u[wm] / 1.7 + 0.6 * v[wm]).astype(np.float32)
    return HrLayers(fine, tram, margin, roof_kind, ripple_phase)


ROOF_COLOURS = np.array([[160, 72, 52], [150, 70, 55], [125, 125, 128], [185, 180, 170], [100, 100, 105]], np.float32)


def render_hr(scene: Scene, day: date, index: int) -> np.ndarray:
    """(3, N, N) uint8 RGB at ``hr_res_m``, with per-class texture."""
    cfg = scene.cfg
    rng = np.random.default_rng([cfg.seed, 5, index])
    land, hl = scene.land, scene.hr_layers
    cls, p = scene.cls_hr, scene.parcel_hr
    N = cls.shape[0]
    doy = day.timetuple().tm_yday
    f = green_fraction(cls, doy, p, land)
    grain = rng.normal(0, 1, (N, N)).astype(np.float32)
    rgb = np.zeros((3, N, N), np.float32)
    # Fields: green vs soil by phenology, tramlines on crops, grassy margins.
    veg = (cls == GRASS) | (cls == CROP_EARLY) | (cls == CROP_LATE)
    mix = f[veg][None]
    soil = np.array([150, 122, 95], np.float32)[:, None] * land.parcel_soil[p[veg]][None]
    base = (1 - mix) * soil + mix * np.array([62, 112, 44], np.float32)[:, None]
    base *= (1 - 0.18 * (hl.tram[veg] & (cls[veg] != GRASS)))[None] * (0.92 + 0.16 * hl.fine[veg])[None]
    rgb[:, veg] = base + 4 * grain[veg][None]
    rgb[:, hl.margin] = np.array([88, 110, 62], np.float32)[:, None] + 6 * grain[hl.margin][None]
    # Forest: crowns (bright) and gaps (shadow), green in summer, brown in winter.
    fm = cls == FOREST
    leaf = f[fm][None]
    crown = (1 - leaf) * np.array([95, 80, 60], np.float32)[:, None] + leaf * np.array([56, 96, 46], np.float32)[
        :, None
    ]
    rgb[:, fm] = crown * np.where(hl.fine[fm] > 0.5, 1.0, 0.55)[None] + 5 * grain[fm][None]
    # Town: roofs, streets, building shadows, roads.
    bm = cls == BUILT
    kind = hl.roof_kind[bm]
    street = np.array([92, 92, 96], np.float32)
    col = np.where(kind[None] >= 0, ROOF_COLOURS[np.clip(kind, 0, 4)].T, street[:, None])
    col = np.where(kind[None] == -2, street[:, None] * 0.55, col)
    col = np.where(kind[None] == -3, np.array([70, 70, 74], np.float32)[:, None], col)
    rgb[:, bm] = col + 5 * grain[bm][None]
    bare = cls == BARE
    rgb[:, bare] = np.array([182, 165, 135], np.float32)[:, None] + 9 * grain[bare][None]
    wm = cls == WATER
    ripple = 3 * np.sin(hl.ripple_phase + rng.uniform(0, 2 * np.pi))
    rgb[:, wm] = np.array([24, 40, 50], np.float32)[:, None] + ripple[None] + 3 * grain[wm][None]
    rgb *= rng.normal(1.0, 0.03)  # illumination of the day
    return np.clip(np.rint(rgb), 1, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- STAC


def _footprint(cfg: DemoConfig, valid: np.ndarray | None = None):
    x0, y1 = cfg.origin_xy
    L = cfg.extent_m
    geom = box(x0, y1 - L, x0 + L, y1)
    if valid is not None and not valid.all():
        import rasterio.features
        from shapely.geometry import shape
        from shapely.ops import unary_union

        shapes = [
            shape(g)
            for g, v in rasterio.features.shapes(valid.astype(np.uint8), transform=cfg.transform(10.0))
            if v == 1
        ]
        geom = unary_union(shapes).simplify(10.0)
    return to_lonlat(geom, cfg.epsg)


def region_bbox(cfg: DemoConfig) -> tuple[float, float, float, float]:
    """The demo square as (min lon, min lat, max lon, max lat) in WGS84."""
    return tuple(_footprint(cfg).bounds)


def _providers() -> list[pystac.Provider]:
    return [
        pystac.Provider(
            name=DEMO_PROVIDER_NAME,
            roles=[pystac.ProviderRole.PRODUCER, pystac.ProviderRole.HOST],
            description="Synthetic demo region generated by pipeline.demo (not real imagery).",
        )
    ]


def _new_item(cfg: DemoConfig, item_id: str, dt: datetime, geom, collection: str) -> pystac.Item:
    item = pystac.Item(
        id=item_id,
        geometry=mapping(geom),
        bbox=list(geom.bounds),
        datetime=dt,
        properties={},
        collection=collection,
    )
    item.common_metadata.providers = _providers()
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code = f"EPSG:{cfg.epsg}"
    return item


def _add_asset(
    item: pystac.Item,
    key: str,
    href: Path,
    title: str,
    shape: Sequence[int],
    transform: Affine,
    raster: list[RasterBand],
    eo_bands: list[Band] | None = None,
    roles=("data",),
) -> None:
    """Add a COG asset with its own proj:shape/transform (10 m and 20 m assets differ) and raster:bands."""
    asset = pystac.Asset(href=str(href.resolve()), media_type=pystac.MediaType.COG, title=title, roles=list(roles))
    item.add_asset(key, asset)
    ProjectionExtension.ext(asset).shape = list(shape)
    ProjectionExtension.ext(asset).transform = list(transform)[:6]
    RasterExtension.ext(asset, add_if_missing=True).bands = raster
    if eo_bands:
        EOExtension.ext(asset, add_if_missing=True).bands = eo_bands


def s2_eo_bands(band: str) -> list[Band]:
    """The ``eo:bands`` entry of one Sentinel-2 band asset, from :data:`pipeline.bands.S2_BAND_INFO`."""
    info = B.S2_BAND_INFO[band]
    return [
        Band.create(
            name=band,
            common_name=info.common_name,
            center_wavelength=info.center_wavelength_um,
            full_width_half_max=info.fwhm_um,
        )
    ]


def s2_item_id(day: date, index: int) -> str:
    sat = "S2A" if index % 2 == 0 else "S2B"
    return f"{sat}_MSIL2A_{day:%Y%m%d}T102021_R108_T32TMR_{day:%Y%m%d}T150000"


def write_s2_item(cfg: DemoConfig, acq: S2Acquisition, index: int, root: Path) -> pystac.Item:
    item_id = s2_item_id(acq.day, index)
    d = root / S2_COLLECTION / item_id
    n = cfg.s2_px
    dt = datetime.combine(acq.day, datetime.min.time(), timezone.utc).replace(hour=10, minute=20, second=21)
    item = _new_item(cfg, item_id, dt, _footprint(cfg, acq.valid10), S2_COLLECTION)
    item.common_metadata.platform = "Sentinel-2A" if index % 2 == 0 else "Sentinel-2B"
    item.common_metadata.constellation = "Sentinel 2"
    item.common_metadata.instruments = ["msi"]
    item.common_metadata.gsd = 10.0
    EOExtension.ext(item, add_if_missing=True).cloud_cover = acq.cloud_cover
    item.properties["s2:mgrs_tile"] = "32TMR"
    item.properties["s2:processing_baseline"] = "05.10"
    item.properties["s2:nodata_pixel_percentage"] = round(100 * (1 - acq.footprint_fraction), 2)
    for i, band in enumerate(B.S2_BANDS):
        info = B.S2_BAND_INFO[band]
        res = info.native_resolution_m
        data = acq.bands10[i]
        if res == 20:
            # Native 20 m: the mean of each 2x2 block, nodata where any part is nodata.
            blocks = data.reshape(n // 2, 2, n // 2, 2)
            nod = (blocks == 0).any(axis=(1, 3))
            data = np.rint(blocks.mean(axis=(1, 3)))
            data[nod] = 0
        arr = data.astype(np.uint16)
        path = write_cog(
            d / f"{band}.tif", arr, transform=cfg.transform(res), crs=cfg.epsg, nodata=0, band_names=[band]
        )
        raster = RasterBand.create(
            nodata=0, data_type=DataType.UINT16, spatial_resolution=res, scale=0.0001, offset=0.0
        )
        eo = s2_eo_bands(band)
        _add_asset(
            item,
            band,
            path,
            f"Band {band} - {res}m",
            arr.shape,
            cfg.transform(res),
            [raster],
            eo,
            roles=("data", "reflectance"),
        )
    path = write_cog(
        d / "SCL.tif",
        acq.scl20,
        transform=cfg.transform(20),
        crs=cfg.epsg,
        nodata=0,
        overview_resampling="nearest",
        band_names=["SCL"],
    )
    raster = RasterBand.create(nodata=0, data_type=DataType.UINT8, spatial_resolution=20)
    _add_asset(item, "SCL", path, "Scene classification map (SCL)", acq.scl20.shape, cfg.transform(20), [raster])
    return item


def write_s1_item(cfg: DemoConfig, day: date, index: int, data: np.ndarray, root: Path) -> pystac.Item:
    ascending = index % 2 == 1
    hour = (17, 25) if ascending else (5, 35)
    item_id = f"S1A_IW_GRDH_1SDV_{day:%Y%m%d}T{hour[0]:02d}{hour[1]:02d}00_rtc"
    d = root / S1_COLLECTION / item_id
    dt = datetime.combine(day, datetime.min.time(), timezone.utc).replace(hour=hour[0], minute=hour[1])
    item = _new_item(cfg, item_id, dt, _footprint(cfg), S1_COLLECTION)
    item.common_metadata.platform = "SENTINEL-1A"
    item.common_metadata.constellation = "Sentinel-1"
    item.common_metadata.instruments = ["c-sar"]
    sar = SarExtension.ext(item, add_if_missing=True)
    sar.apply(
        instrument_mode="IW",
        frequency_band=FrequencyBand.C,
        polarizations=[Polarization.VV, Polarization.VH],
        product_type="GRD",
        center_frequency=5.405,
        resolution_range=20.0,
        resolution_azimuth=22.0,
        pixel_spacing_range=10.0,
        pixel_spacing_azimuth=10.0,
        looks_range=5,
        looks_azimuth=1,
        looks_equivalent_number=4.4,
        observation_direction=None,
    )
    sat = SatExtension.ext(item, add_if_missing=True)
    sat.orbit_state = OrbitState.ASCENDING if ascending else OrbitState.DESCENDING
    sat.relative_orbit = 15 if ascending else 66
    for k, (band, key) in enumerate((("VV", "vv"), ("VH", "vh"))):
        path = write_cog(
            d / f"{key}.tif", data[k], transform=cfg.transform(10), crs=cfg.epsg, nodata=S1_NODATA, band_names=[band]
        )
        raster = RasterBand.create(nodata=S1_NODATA, data_type=DataType.FLOAT32, spatial_resolution=10.0)
        _add_asset(
            item,
            key,
            path,
            f"{band}: terrain-corrected gamma naught (linear power)",
            data[k].shape,
            cfg.transform(10),
            [raster],
        )
    return item


def write_hr_item(cfg: DemoConfig, day: date, index: int, rgb: np.ndarray, root: Path) -> pystac.Item:
    item_id = f"hr_rgb_{day:%Y%m%d}"
    d = root / HR_COLLECTION / item_id
    dt = datetime.combine(day, datetime.min.time(), timezone.utc).replace(hour=11)
    item = _new_item(cfg, item_id, dt, _footprint(cfg), HR_COLLECTION)
    item.common_metadata.gsd = cfg.hr_res_m
    item.common_metadata.platform = "aerial"
    item.common_metadata.instruments = ["rgb-camera"]
    path = write_cog(
        d / "image.tif",
        rgb,
        transform=cfg.transform(cfg.hr_res_m),
        crs=cfg.epsg,
        nodata=None,
        band_names=["red", "green", "blue"],
        blocksize=512,
    )
    raster = [RasterBand.create(data_type=DataType.UINT8, spatial_resolution=cfg.hr_res_m) for _ in range(3)]
    eo = [Band.create(name=n, common_name=n) for n in ("red", "green", "blue")]
    _add_asset(item, "image", path, "RGB image", rgb.shape[1:], cfg.transform(cfg.hr_res_m), raster, eo)
    return item


def write_truth(cfg: DemoConfig, scene: Scene, root: Path) -> dict[str, Path]:
    tdir = root / "truth"
    names = {str(c.value): c.name for c in DEMO_CLASSES}
    tags = {"class_names": json.dumps(names), "description": "demo region ground truth"}
    cmap = {c.value: hex_rgba(c.color) for c in DEMO_CLASSES}
    out = {
        "landcover_10m": write_cog(
            tdir / "landcover_10m.tif",
            scene.cls10,
            transform=cfg.transform(10),
            crs=cfg.epsg,
            nodata=NODATA_CLASS,
            colormap=cmap,
            tags=tags,
            overview_resampling="mode",
        ),
        "landcover_hr": write_cog(
            tdir / "landcover_hr.tif",
            scene.cls_hr,
            transform=cfg.transform(cfg.hr_res_m),
            crs=cfg.epsg,
            nodata=NODATA_CLASS,
            colormap=cmap,
            tags=tags,
            overview_resampling="mode",
            blocksize=512,
        ),
    }
    flood = np.full(scene.cls10.shape, FLOOD_DRY, np.uint8)
    flood[scene.flood10] = FLOOD_WATER
    flood[scene.permanent_water10] = FLOOD_PERMANENT
    fd = cfg.flood_date()
    fnames, fcolors = flood_legend()
    ftags = {"class_names": json.dumps({str(k): v for k, v in fnames.items()}), "event_date": fd.isoformat()}
    out["flood"] = write_cog(
        tdir / f"flood_{fd:%Y%m%d}.tif",
        flood,
        transform=cfg.transform(10),
        crs=cfg.epsg,
        nodata=NODATA_CLASS,
        colormap=fcolors,
        tags=ftags,
        overview_resampling="mode",
    )
    meta = {
        "classes": [asdict(c) for c in DEMO_CLASSES],
        "flood_classes": [asdict(c) for c in FLOOD_CLASSES],
        "flood_date": fd.isoformat(),
        "nodata": NODATA_CLASS,
        "config": {**asdict(cfg), "hr_res_m": cfg.hr_res_m, "s2_px": cfg.s2_px},
        "files": {k: v.name for k, v in out.items()},
    }
    (tdir / "truth.json").write_text(json.dumps(meta, indent=2))
    return out


def _collection(cfg: DemoConfig, cid: str, title: str, description: str, days: list[date], bbox) -> pystac.Collection:
    start = datetime.combine(days[0], datetime.min.time(), timezone.utc)
    end = datetime.combine(days[-1], datetime.max.time(), timezone.utc)
    return pystac.Collection(
        id=cid,
        title=title,
        description=description,
        extent=pystac.Extent(pystac.SpatialExtent([list(bbox)]), pystac.TemporalExtent([[start, end]])),
        license="CC0-1.0",
        providers=_providers(),
    )


_SCENE: Scene | None = None
_ROOT: Path | None = None


def _render_and_write(task: tuple[str, int, date]) -> dict:
    collection, i, day = task
    scene, root = _SCENE, _ROOT
    if collection == S2_COLLECTION:
        item = write_s2_item(scene.cfg, render_s2(scene, day, i), i, root)
    elif collection == S1_COLLECTION:
        item = write_s1_item(scene.cfg, day, i, render_s1(scene, day, i), root)
    else:
        item = write_hr_item(scene.cfg, day, i, render_hr(scene, day, i), root)
    return item.to_dict(include_self_link=False)


def generate(cfg: DemoConfig, out: str | Path, progress: bool = True, workers: int | None = None) -> Path:
    """Write the demo region under ``out``; returns the path of ``catalog.json``.

    ``workers``: processes rendering dates in parallel (default: the machine's cores, at most 4).
    """
    workers = workers or min(4, os.cpu_count() or 1)
    t0 = time.time()
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if progress:
            print(f"[demo {time.time() - t0:5.1f}s] {msg}", flush=True)

    say(
        f"landscape {cfg.extent_m / 1000:.2f} km square, S2 {cfg.s2_px} px, HR {cfg.s2_px * cfg.hr_ratio} px "
        f"at {cfg.hr_res_m} m, seed {cfg.seed}"
    )
    scene = build_scene(cfg)
    write_truth(cfg, scene, root)
    bbox = region_bbox(cfg)
    catalog = pystac.Catalog(
        id="skysense-demo-region",
        description=f"SkySense demo region: synthetic S2/S1/HR over {cfg.extent_m / 1000:.1f} km in EPSG:{cfg.epsg}, "
        f"seed {cfg.seed}. Ground truth in truth/.",
        title="SkySense demo region",
    )
    s2c = _collection(
        cfg, S2_COLLECTION, "Sentinel-2 L2A (demo)", "Synthetic Sentinel-2 L2A, PC asset keys.", cfg.s2_dates(), bbox
    )
    s1c = _collection(
        cfg,
        S1_COLLECTION,
        "Sentinel-1 RTC (demo)",
        "Synthetic Sentinel-1 RTC gamma0, linear power.",
        cfg.s1_dates(),
        bbox,
    )
    hr_days = [date.fromisoformat(d) for d in cfg.hr_dates]
    hrc = _collection(cfg, HR_COLLECTION, "High-resolution RGB (demo)", "Synthetic aerial RGB.", hr_days, bbox)
    for c in (s2c, s1c, hrc):
        catalog.add_child(c)
    tasks = [(HR_COLLECTION, i, d) for i, d in enumerate(hr_days)]
    tasks += [(S2_COLLECTION, i, d) for i, d in enumerate(cfg.s2_dates())]
    tasks += [(S1_COLLECTION, i, d) for i, d in enumerate(cfg.s1_dates())]
    collections = {S2_COLLECTION: s2c, S1_COLLECTION: s1c, HR_COLLECTION: hrc}
    global _SCENE, _ROOT
    _SCENE, _ROOT = scene, root
    workers = max(1, min(workers, len(tasks)))
    try:
        if workers == 1:
            results = map(_render_and_write, tasks)
        else:
            # fork: the workers inherit the scene instead of unpickling hundreds of MB each.
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            results = pool.map(_render_and_write, tasks, chunksize=2)
        done = 0
        for (cid, _, _), item_dict in zip(tasks, results, strict=True):
            collections[cid].add_item(pystac.Item.from_dict(item_dict))
            done += 1
            if done % 25 == 0 or done == len(tasks):
                say(f"{done}/{len(tasks)} items written")
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
        _SCENE = _ROOT = None
    say(
        f"{len(hr_days)} hr-rgb, {len(cfg.s2_dates())} sentinel-2, {len(cfg.s1_dates())} sentinel-1 items; "
        f"flood on {cfg.flood_date()}"
    )
    catalog.normalize_hrefs(str(root))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    say(f"catalog written: {root / 'catalog.json'}")
    return root / "catalog.json"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (catalog.json, collections, truth/)")
    p.add_argument("--size-km", type=float, default=DemoConfig.size_km, help="side of the square (km)")
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument(
        "--hr-ratio",
        type=int,
        default=DemoConfig.hr_ratio,
        help="HR pixels per 10 m S2 pixel (paper: 32; HR is 10/ratio m)",
    )
    args = p.parse_args(argv)
    if args.size_km <= 0 or args.size_km > 50:
        p.error("--size-km must be in (0, 50]")
    if args.hr_ratio < 1 or args.hr_ratio > 32:
        p.error("--hr-ratio must be in [1, 32]")
    cfg = DemoConfig(size_km=args.size_km, seed=args.seed, hr_ratio=args.hr_ratio)
    generate(cfg, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
