"""The flood product's classes and its transparent baseline: a per-tile Otsu threshold on Sentinel-1 VV.

Classes (uint8, nodata 255): 0 dry, 1 flood water (water on the event date that the pre-event baseline does not
have), 2 permanent water (water on the event date and in the baseline). The demo region's flood truth uses the
same legend (``pipeline.demo`` imports it from here).

The Otsu baseline (:func:`otsu_flood`) works on one tile sample of a cube whose Sentinel-1 series ends at the
event (``pipeline.refresh`` ingests ``[as_of - baseline_days, as_of]``):

1. event = the tile's latest valid S1 date; baseline = the valid dates before it;
2. speckle: VV in linear power averaged over a 3 x 3 box (multi-looking, ``scipy.ndimage.uniform_filter``), then
   dB; the baseline is the per-pixel median of its dates;
3. one threshold per tile: Otsu (``skimage.filters.threshold_otsu``) on the event and baseline VV pooled. Open
   water is far darker than land in VV (about -20 dB and below against -15 dB and above), so a tile with water is
   bimodal; in a tile without water Otsu splits two land classes and lands above ``OTSU_MAX_DB``; then the
   fixed ``FALLBACK_DB`` is used instead (recorded per tile as ``threshold_source``);
4. water = VV < threshold; flood = water on the event and not in the baseline; permanent = water in both.
   Pixels without a valid event observation, or without any baseline observation, are nodata.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

FLOOD_DRY, FLOOD_WATER, FLOOD_PERMANENT = 0, 1, 2
NODATA = 255


@dataclass(frozen=True)
class FloodClass:
    value: int
    name: str
    color: str  # hex RGB
    description: str


FLOOD_CLASSES: tuple[FloodClass, ...] = (
    FloodClass(FLOOD_DRY, "dry", "#f0ebd2", "not water"),
    FloodClass(FLOOD_WATER, "flood_water", "#1f4ed8", "water on the event date only"),
    FloodClass(FLOOD_PERMANENT, "permanent_water", "#0b2a6b", "river and lake"),
)

# dB bounds of a credible open-water threshold in VV (calm water is -18 to -25 dB, bare soil rarely under -15 dB)
OTSU_MAX_DB = -14.0
OTSU_MIN_DB = -26.0
FALLBACK_DB = -18.0  # the usual fixed VV water threshold, used when a tile shows no water mode


def flood_legend() -> tuple[dict[int, str], dict[int, tuple[int, int, int, int]]]:
    """({value: name}, {value: RGBA}) of :data:`FLOOD_CLASSES`."""
    from pipeline.cog import hex_rgba

    return {c.value: c.name for c in FLOOD_CLASSES}, {c.value: hex_rgba(c.color) for c in FLOOD_CLASSES}


def multilook_db(vv_db: np.ndarray, size: int = 3) -> np.ndarray:
    """(..., y, x) VV in dB -> the same averaged over ``size`` x ``size`` pixels in linear power, in dB; NaN where
    the input is NaN (the mean is over the valid neighbours only)."""
    from scipy.ndimage import uniform_filter

    ok = np.isfinite(vv_db)
    lin = np.where(ok, 10.0 ** (np.where(ok, vv_db, 0.0) / 10.0), 0.0)
    axes = (vv_db.ndim - 2, vv_db.ndim - 1)
    s = uniform_filter(lin, size=size, axes=axes, mode="nearest")
    n = uniform_filter(ok.astype(np.float64), size=size, axes=axes, mode="nearest")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 10.0 * np.log10(s / n)
    return np.where(ok, out, np.nan).astype(np.float32)


def water_threshold(values_db: np.ndarray) -> tuple[float, str]:
    """(threshold dB, "otsu" | "fallback") for the finite values of ``values_db``."""
    from skimage.filters import threshold_otsu

    v = values_db[np.isfinite(values_db)]
    if v.size < 16 or np.ptp(v) < 1e-3:
        return FALLBACK_DB, "fallback"
    t = float(threshold_otsu(v))
    if OTSU_MIN_DB <= t <= OTSU_MAX_DB:
        return t, "otsu"
    return FALLBACK_DB, "fallback"


@dataclass
class OtsuResult:
    classes: np.ndarray  # (y, x) uint8, the legend above, NODATA 255
    threshold_db: float
    threshold_source: str  # "otsu" | "fallback"
    event_date: str | None
    baseline_dates: list[str]


def otsu_flood(vv_db: np.ndarray, mask: np.ndarray, valid: np.ndarray, dates: list[str]) -> OtsuResult:
    """The flood classes of one tile sample.

    vv_db: (T, y, x) float32 VV backscatter in dB (NaN nodata); mask: (T, y, x) bool valid pixels; valid: (T,)
    bool dates holding data (False for padding); dates: T ISO dates (padding: anything). Dates in time order."""
    vv = np.where(mask, vv_db, np.nan).astype(np.float32)
    usable = [t for t in range(vv.shape[0]) if valid[t] and mask[t].any()]
    out = np.full(vv.shape[1:], NODATA, np.uint8)
    if not usable:
        return OtsuResult(out, float("nan"), "none", None, [])
    ev, base = usable[-1], usable[:-1]
    event = multilook_db(vv[ev])
    if base:
        with warnings.catch_warnings():  # all-NaN pixels stay NaN (nodata), no need to say so
            warnings.simplefilter("ignore", RuntimeWarning)
            baseline = np.nanmedian(multilook_db(vv[base]), axis=0)
    else:
        baseline = np.full_like(event, np.nan)
    thr, source = water_threshold(np.concatenate([event.ravel(), baseline.ravel()]))
    known = np.isfinite(event) & np.isfinite(baseline)
    wet_now, wet_before = event < thr, baseline < thr
    out[known] = FLOOD_DRY
    out[known & wet_now & ~wet_before] = FLOOD_WATER
    out[known & wet_now & wet_before] = FLOOD_PERMANENT
    return OtsuResult(out, thr, source, str(dates[ev]), [str(dates[t]) for t in base])
