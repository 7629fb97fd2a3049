"""Cube assembly: the STAC items over one tile, co-registered onto the tile's grid as time series with masks.

For every tile (:mod:`pipeline.grid`), odc-stac loads each modality onto the tile's own pixel grid. Adjacent
tiles are read as a block (:func:`assemble_tiles`): each date of each band is read once over the block and
every tile takes its slice, with its own items and its own choice of dates, so that a tile's sample does not
depend on its neighbours (the source COG blocks that neighbouring tiles share are decoded once, not per tile).

- **Sentinel-2**: the 10 bands of :data:`pipeline.bands.S2_BANDS` at 10 m, **bilinear** (10 m bands on an
  aligned grid are read exactly; 20 m bands are interpolated), and SCL **nearest**. Dates (one per solar day,
  same-day items merged) are chosen from a cheap first pass over SCL at 20 m: the season is cut into
  ``t_s2`` equal periods and each period keeps its clearest date, then the clearest remaining dates fill the
  empty periods. Per-pixel mask: every band has data and SCL is not no-data, saturated, cloud, cloud shadow or
  cirrus (nodata alone when the catalog has no SCL). A date is valid when at least ``min_valid_fraction`` of
  the tile is. Reflectance is harmonised to ``DN + offset`` where the provider encodes an offset
  (``raster:bands`` offset/scale, or Sentinel-2 processing baseline >= 04.00: -1000).
- **Sentinel-1**: VV, VH **bilinear** in linear power, then converted to dB. RTC is loaded in map geometry by
  odc-stac; GRD in radar geometry is warped onto the tile grid through its ground control points (GDAL's GCP
  transformer; only the source window the tile needs is read). Up to ``t_s1`` dates spread over the season,
  preferring dates whose footprint covers the tile.
- **High resolution** R, G, B: **bilinear** onto the tile grid at ``10 / hr_ratio`` m, up to ``t_hr`` dates
  (best coverage, then the latest).

A modality with no items over the tile yields empty (padded) arrays flagged absent. Items that cannot be
read (missing band, missing or corrupt file) are skipped with a warning naming the item; the tile is written
from the rest.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta, timezone
from functools import cached_property
from typing import Any

import numpy as np
import pystac
import shapely.geometry

from pipeline import bands as B
from pipeline.grid import Tile, TileGrid
from pipeline.providers import ProviderError, ResolvedItem, resolve_item

log = logging.getLogger(__name__)

# The resampling rule per kind of data (stated once, used everywhere).
RESAMPLING = {"reflectance": "bilinear", "backscatter": "bilinear", "classes": "nearest"}
# S1 GRD amplitude DN -> sigma0: Sentinel-1 IPF IW GRD calibration constants are ~ 10^(55/20)..10^(57/20)
# (sigmaNought LUT); without the per-product annotation the nominal value is used (documented approximation).
GRD_AMPLITUDE_CAL_DB = 56.0


@dataclass(frozen=True)
class CubeConfig:
    grid: TileGrid = field(default_factory=TileGrid)
    t_s2: int = 20
    t_s1: int = 10
    t_hr: int = 1
    hr_ratio: int = 8
    min_valid_fraction: float = 0.05
    provider: str = "auto"

    def __post_init__(self) -> None:
        if min(self.t_s2, self.t_s1, self.t_hr) < 1 or self.hr_ratio < 1:
            raise ValueError("t_s2, t_s1, t_hr and hr_ratio must be >= 1")


@dataclass
class ModalityStack:
    """One modality of one tile: ``data`` (T, C, H, W), ``mask`` (T, H, W) uint8 (1 = valid pixel)."""

    name: str
    data: np.ndarray
    mask: np.ndarray
    dates: list[date | None]  # None for padded slots
    valid: np.ndarray  # (T,) bool: date holds usable data
    item_ids: list[list[str]]  # per date slot, the items merged into it
    present: bool  # any item of this modality over the tile
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. SCL (T, H, W)

    @classmethod
    def empty(cls, name: str, t: int, bands: int, n: int, dtype, fill, present: bool, **extra) -> ModalityStack:
        """``t`` padded date slots of ``bands`` x ``n`` x ``n`` pixels filled with ``fill``, all invalid."""
        return cls(
            name,
            np.full((t, bands, n, n), fill, dtype),
            np.zeros((t, n, n), np.uint8),
            [None] * t,
            np.zeros(t, bool),
            [[] for _ in range(t)],
            present,
            extra,
        )

    def put(
        self, k: int, day: date, data: np.ndarray, mask: np.ndarray, item_ids: list[str], min_valid_fraction: float
    ) -> None:
        """Fill date slot ``k``; the date is valid when enough of its pixels are."""
        self.data[k] = data
        self.mask[k] = mask
        self.dates[k] = day
        self.valid[k] = mask.mean() >= min_valid_fraction
        self.item_ids[k] = item_ids


@dataclass
class TileSample:
    tile: Tile
    s2: ModalityStack
    s1: ModalityStack
    hr: ModalityStack
    warnings: list[str]

    @cached_property
    def stats(self) -> dict[str, dict[str, list[float]]]:
        """Per band count / sum / sum of squares of valid core pixels, for cube-wide normalisation."""
        out = {}
        hr_ratio = self.hr.data.shape[-1] // self.tile.shape()[0]
        for stack, ratio in ((self.s2, 1), (self.s1, 1), (self.hr, hr_ratio)):
            rs, cs = self.tile.core_slice(ratio)
            m = stack.mask[:, rs, cs].astype(bool)
            d = stack.data[:, :, rs, cs].astype(np.float64)
            count, s, ss = [], [], []
            for c in range(d.shape[1]):
                v = d[:, c][m]
                count.append(float(v.size))
                s.append(float(v.sum()))
                ss.append(float((v * v).sum()))
            out[stack.name] = {"count": count, "sum": s, "sumsq": ss}
        return out


# ----------------------------------------------------------------------------------------------- selection


def solar_day(item: pystac.Item) -> date:
    """The local solar day of an acquisition: UTC time shifted by longitude / 15 hours, the rule of odc-stac's
    ``groupby="solar_day"``, so that the scenes of one overpass fall on one day."""
    dt = item.datetime or item.common_metadata.start_datetime
    lon = shapely.geometry.shape(item.geometry).centroid.x if item.geometry else 0.0
    return (dt.astimezone(timezone.utc) + timedelta(seconds=lon * 240)).date()


def select_dates(
    days: Sequence[date], score: Sequence[float], t_max: int, start: date, end: date, min_score: float
) -> list[int]:
    """Indices of up to ``t_max`` dates spread over [start, end]: the best-scoring date of each of ``t_max``
    equal periods, then the best remaining ones; dates scoring below ``min_score`` are never chosen.
    Returned in date order."""
    ok = [i for i in range(len(days)) if score[i] >= min_score]
    if not ok:
        return []
    span = max((end - start).days + 1, 1)
    chosen: list[int] = []
    for k in range(t_max):
        lo = start.toordinal() + span * k / t_max
        hi = start.toordinal() + span * (k + 1) / t_max
        in_bin = [i for i in ok if lo <= days[i].toordinal() < hi and i not in chosen]
        if in_bin:
            chosen.append(max(in_bin, key=lambda i: (score[i], -days[i].toordinal())))
    rest = sorted((i for i in ok if i not in chosen), key=lambda i: (-score[i], days[i].toordinal()))
    chosen += rest[: t_max - len(chosen)]
    return sorted(chosen, key=lambda i: days[i])


def spread_chooser(t_max: int, start: date, end: date, min_score: float):
    """``choose(days, scores) -> days``: :func:`select_dates` over [start, end], as dates."""

    def choose(ds: list[date], sc: list[float]) -> list[date]:
        return [ds[i] for i in select_dates(ds, sc, t_max, start, end, min_score)]

    return choose


def coverage(item: pystac.Item, tile: Tile) -> float:
    """Share of the tile (with halo) covered by the item's footprint."""
    if not item.geometry:
        return 0.0
    fp = tile.footprint_lonlat()
    return float(shapely.geometry.shape(item.geometry).intersection(fp).area / fp.area)


def _coverage_by_day(tile: Tile, days: Mapping[date, Sequence]) -> dict[date, float]:
    """Per day, the best share of ``tile`` one of its items covers."""
    return {d: max(coverage(c.item, tile) for c in cs) for d, cs in days.items()}


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class _Candidate:
    item: pystac.Item
    resolved: ResolvedItem
    order: int  # position in the block's item list: same-day items are fused in this order


def resolve_items(
    items: Sequence[pystac.Item], provider: str
) -> tuple[dict[str, list[_Candidate]], dict[int, str]]:
    """Items grouped by modality, and per item that does not map onto the canonical bands (skipped) a
    warning, by its index in ``items``."""
    out: dict[str, list[_Candidate]] = defaultdict(list)
    skipped: dict[int, str] = {}
    for i, it in enumerate(items):
        try:
            r = resolve_item(it, provider)
        except ProviderError as e:
            skipped[i] = f"skipped item: {e}"
            continue
        out[r.modality].append(_Candidate(_loadable(it), r, i))
    return out, skipped


def _loadable(item: pystac.Item) -> pystac.Item:
    """``item``, or a copy whose ``eo:bands`` / ``bands`` entries all have a ``name``: odc-stac (through pystac's
    eo extension) refuses a band without one, which users' catalogs write (the generic profile finds bands by
    common name or wavelength instead). The name given is the asset key and band number; bands are read by
    asset key and index (``_odc_band_name``), never by these names."""
    def nameless(a) -> bool:
        return any("name" not in b for b in (a.extra_fields.get("eo:bands") or a.extra_fields.get("bands") or []))

    if not any(nameless(a) for a in item.assets.values()):
        return item
    item = item.clone()
    for key, a in item.assets.items():
        for field_name in ("eo:bands", "bands"):
            listed = a.extra_fields.get(field_name)
            if listed:
                a.extra_fields[field_name] = [{"name": f"{key}_{i + 1}", **b} for i, b in enumerate(listed)]
    return item


def _by_day(cands: Sequence[_Candidate]) -> dict[date, list[_Candidate]]:
    days: dict[date, list[_Candidate]] = defaultdict(list)
    for c in cands:
        days[solar_day(c.item)].append(c)
    return dict(sorted(days.items()))


def _merge_days(days_per_tile: Sequence[Mapping[date, list[_Candidate]]], wanted=None) -> dict[date, list[_Candidate]]:
    """The block's items per day (``wanted`` days only, when given): the union of its tiles' same-day
    candidates, in item order, each item once."""
    out: dict[date, dict[int, _Candidate]] = defaultdict(dict)
    for days in days_per_tile:
        for d, cs in days.items():
            if wanted is None or d in wanted:
                for c in cs:
                    out[d][c.order] = c
    return {d: [cs[o] for o in sorted(cs)] for d, cs in sorted(out.items())}


def _odc_band_name(ref) -> str:
    return ref.asset_key if ref.band_index == 1 and "." not in ref.asset_key else f"{ref.asset_key}.{ref.band_index}"


def _odc_load(items: list[pystac.Item], bands: list[str], geobox, resampling, dtype=None):
    import odc.stac

    return odc.stac.load(
        items,
        bands=bands,
        geobox=geobox,
        groupby="solar_day",
        resampling=resampling,
        dtype=dtype,
        chunks=None,
        fail_on_error=True,
        progress=None,
    )


def union_geobox(geoboxes: Sequence):
    """The smallest GeoBox on the pixel grid of ``geoboxes`` (one CRS, one resolution, pixel edges on one
    lattice) that contains every one of them."""
    from affine import Affine
    from odc.geo.geobox import GeoBox

    g0 = geoboxes[0]
    if len(geoboxes) == 1:
        return g0
    res = g0.resolution.x
    x0 = min(g.transform.c for g in geoboxes)
    y1 = max(g.transform.f for g in geoboxes)
    x1 = max(g.transform.c + g.shape.x * res for g in geoboxes)
    y0 = min(g.transform.f - g.shape.y * res for g in geoboxes)
    return GeoBox((round((y1 - y0) / res), round((x1 - x0) / res)), Affine(res, 0.0, x0, 0.0, -res, y1), g0.crs)


def geobox_cut(big, small) -> tuple[slice, slice]:
    """(rows, cols) of ``small`` inside ``big``, two GeoBoxes on one pixel grid."""
    res = big.resolution.x
    c = (small.transform.c - big.transform.c) / res
    r = (big.transform.f - small.transform.f) / res
    ci, ri = round(c), round(r)
    if abs(c - ci) > 1e-6 or abs(r - ri) > 1e-6 or ci < 0 or ri < 0:
        raise ValueError(f"{small} does not lie on the pixel grid of {big}")
    return slice(ri, ri + small.shape.y), slice(ci, ci + small.shape.x)


@dataclass(frozen=True)
class _OdcReader:
    """Reads any set of days for every tile of a block with ONE odc-stac call over the block (odc-stac groups
    the items by solar day itself; a call per day costs ~10 ms of set-up each, which dominated a tile with 70+
    candidate dates, and a call per tile decodes the COG blocks that neighbouring tiles share again and again).
    Each tile takes its pixels from the block's arrays by slicing: the tiles lie on one pixel grid and an
    odc-stac read on that grid does not depend on the extent read (``tests/test_ingest.py`` checks a blocked
    cube against one read tile by tile).

    ``names(cands)``: the odc band names for a day's items. Returns ``{day: [{name: (H, W)} per geobox]}``.
    """

    names: Callable[[list[_Candidate]], list[str]]
    geoboxes: tuple  # one per tile, on one pixel grid
    resampling: object
    dtype: str | None = None

    def __call__(self, days: dict[date, list[_Candidate]]) -> dict[date, list[dict[str, np.ndarray]]]:
        tile_crs = _crs_key(str(self.geoboxes[0].crs))
        # Items in another CRS than the tile are warped directly by GDAL, tile by tile (see _warp_day); the
        # rest in one call.
        cross = {d: cs for d, cs in days.items() if any(_item_crs(c.item) not in (None, tile_crs) for c in cs)}
        out = {d: [self._warp_day(cs, gb) for gb in self.geoboxes] for d, cs in cross.items()}
        same = {d: cs for d, cs in days.items() if d not in cross}
        return {**out, **(self._odc(same) if same else {})}

    def _resampling_of(self, name: str) -> str:
        if isinstance(self.resampling, Mapping):
            return self.resampling.get(name, self.resampling.get("*", "nearest"))
        return self.resampling

    def _warp_day(self, cands: list[_Candidate], gb) -> dict[str, np.ndarray]:
        """One day's bands warped onto the geobox by a direct GDAL warp per item and band over the whole tile
        (same-day items: the first valid value wins, as odc-stac fuses them). odc-loader 0.6.5 warps a
        cross-CRS source over a sub-window of the tile and, on the cross-zone BigEarthNet tile, lands up to
        0.26 of the local source range from exact bilinear, beyond GDAL's 1/8-pixel approximation (0.25);
        the direct warp stays within 0.16 (tests/test_ingest_real.py). Tile by tile, because GDAL's
        approximate transformer depends on the extent warped."""
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.warp import reproject

        out: dict[str, np.ndarray] = {}
        for name in self.names(cands):
            merged, missing = None, None
            for c in cands:
                ref = _ref_for(c.resolved, name)
                with rasterio.open(ref.href) as src:
                    nodata = src.nodata
                    dtype = self.dtype or src.dtypes[ref.band_index - 1]
                    fill = nodata if nodata is not None else 0
                    arr = np.full(tuple(gb.shape), fill, dtype)
                    reproject(
                        rasterio.band(src, ref.band_index),
                        arr,
                        dst_transform=gb.transform,
                        dst_crs=str(gb.crs),
                        src_nodata=nodata,
                        dst_nodata=fill,
                        resampling=Resampling[self._resampling_of(name)],
                    )
                empty = np.isnan(arr) if isinstance(fill, float) and np.isnan(fill) else arr == fill
                if merged is None:
                    merged, missing = arr, empty
                else:
                    merged = np.where(missing, arr, merged)
                    missing &= empty
            out[name] = merged
        return out

    def _odc(self, days: dict[date, list[_Candidate]]) -> dict[date, list[dict[str, np.ndarray]]]:
        days = dict(sorted(days.items()))  # odc-stac returns the groups in time order
        keys = {tuple(self.names(cs)) for cs in days.values()}
        if len(keys) != 1:
            raise ValueError("the days' items use different asset keys")
        names = list(keys.pop())
        items = [c.item for cs in days.values() for c in cs]
        block = union_geobox(self.geoboxes)
        ds = _odc_load(items, names, block, self.resampling, self.dtype)
        if ds.sizes["time"] != len(days):
            raise ValueError(f"odc-stac grouped {len(items)} items into {ds.sizes['time']} days, not {len(days)}")
        arrays = {n: ds[n].values for n in names}
        cuts = [geobox_cut(block, gb) for gb in self.geoboxes]
        return {d: [{n: arrays[n][i][cut] for n in names} for cut in cuts] for i, d in enumerate(days)}


def _crs_key(crs: str | int | None) -> str | None:
    if crs is None:
        return None
    text = str(crs).upper()
    return text if text.startswith("EPSG:") else f"EPSG:{text}" if text.isdigit() else text


def _item_crs(item: pystac.Item) -> str | None:
    """The item's CRS from the projection extension (v2 ``proj:code`` or v1 ``proj:epsg``), if it says."""
    p = item.properties
    if p.get("proj:code"):
        return _crs_key(p["proj:code"])
    if p.get("proj:epsg"):
        return _crs_key(p["proj:epsg"])
    for a in item.assets.values():
        code = a.extra_fields.get("proj:code") or a.extra_fields.get("proj:epsg")
        if code:
            return _crs_key(code)
    return None


def _ref_for(resolved: ResolvedItem, odc_name: str):
    for ref in (*resolved.bands.values(), *resolved.masks.values()):
        if _odc_band_name(ref) == odc_name:
            return ref
    raise KeyError(f"item {resolved.item_id!r}: no band {odc_name!r}")


def _load_days(days: dict[date, list[_Candidate]], reader, what: str) -> tuple[dict[date, Any], dict[date, str]]:
    """Load ``days`` with ``reader(days) -> {day: result}``: all at once, and if that fails, day by day, so that
    a day whose items cannot be read is skipped. Returns the results and, per skipped day, a warning naming
    the items and the error."""
    if len(days) > 1:
        try:
            return reader(days), {}
        except Exception:  # find the bad day(s) below
            pass
    out, failed = {}, {}
    for day, cands in days.items():
        try:
            out.update(reader({day: cands}))
        except Exception as e:  # rasterio / GDAL raise many types for corrupt or missing files
            ids = ", ".join(c.item.id for c in cands)
            failed[day] = f"skipped {what} {day} (items {ids}): {type(e).__name__}: {str(e)[:300]}"
    return out, failed


def _choose_and_load(
    days_per_tile: Sequence[dict[date, list[_Candidate]]],
    scores_per_tile: Sequence[dict[date, float]],
    choose: Callable[[list[date], list[float]], list[date]],
    loader,
    warnings_per_tile: Sequence[list[str]],
    what: str,
) -> list[dict[date, Any]]:
    """Choose each tile's dates, load the union of them once for the block, and when a chosen date cannot be
    read, choose again without it, so that a bad item costs its own date only. ``loader(days) -> {day: [result
    per tile]}``. Returns per tile its loaded dates, in date order; a tile is warned of each date it chose that
    could not be read."""
    n = len(days_per_tile)
    excluded: set[date] = set()
    loaded: dict[date, list] = {}
    failures: dict[date, str] = {}
    asked: list[set[date]] = [set() for _ in range(n)]
    while True:
        chosen = []
        for k in range(n):
            avail = [d for d in scores_per_tile[k] if d not in excluded]
            chosen.append(choose(avail, [scores_per_tile[k][d] for d in avail]))
            asked[k].update(chosen[k])
        new = {d for ds in chosen for d in ds} - loaded.keys()
        got, failed = _load_days(_merge_days(days_per_tile, new), loader, what)
        loaded.update(got)
        failures.update(failed)
        if not failed:
            break
        excluded |= set(failed)
    for k in range(n):
        warnings_per_tile[k].extend(msg for d, msg in failures.items() if d in asked[k])
    return [{d: loaded[d][k] for d in sorted(chosen[k])} for k in range(n)]


def _raster_band(item: pystac.Item, asset_key: str) -> dict:
    """The first ``raster:bands`` entry of an asset ({} when the asset or the field is missing)."""
    asset = item.assets.get(asset_key)
    return (asset.extra_fields.get("raster:bands") or [{}])[0] if asset else {}


def s2_dn_offset(item: pystac.Item, asset_key: str) -> int:
    """Offset to add to Sentinel-2 DN to get reflectance x 1e4 (baseline >= 04.00 products add 1000)."""
    rb = _raster_band(item, asset_key)
    if "offset" in rb and rb.get("scale"):
        return int(round(float(rb["offset"]) / float(rb["scale"])))
    baseline = item.properties.get("s2:processing_baseline")
    if baseline is not None:
        try:
            return -1000 if float(baseline) >= 4.0 else 0
        except ValueError:
            pass
    return 0


def assemble_s2(
    tiles: Sequence[Tile], cands: Sequence[list[_Candidate]], cfg: CubeConfig, start: date, end: date,
    warnings: Sequence[list[str]],
) -> list[ModalityStack]:
    """The Sentinel-2 stack of each of ``tiles`` (one block) from its candidates ``cands[k]``."""
    n = tiles[0].shape()[0]
    T = cfg.t_s2
    stacks = [
        ModalityStack.empty(B.S2, T, len(B.S2_BANDS), n, np.uint16, 0, bool(cs), scl=np.zeros((T, n, n), np.uint8))
        for cs in cands
    ]
    active = [k for k, cs in enumerate(cands) if cs]
    # A block reads SCL for all its tiles or for none: tiles of catalogs with and without SCL go apart.
    with_scl = {k: all(B.S2_SCL in c.resolved.masks for c in cands[k]) for k in active}
    for has_scl in (True, False):
        part = [k for k in active if with_scl[k] == has_scl]
        if part:
            _fill_s2([tiles[k] for k in part], [cands[k] for k in part], has_scl, cfg, start, end,
                     [warnings[k] for k in part], [stacks[k] for k in part])
    return stacks


def _fill_s2(
    tiles: Sequence[Tile], cands: Sequence[list[_Candidate]], has_scl: bool, cfg: CubeConfig, start: date, end: date,
    warnings: Sequence[list[str]], stacks: Sequence[ModalityStack],
) -> None:
    """Fill the S2 ``stacks`` of ``tiles`` (all with candidates, all with SCL or all without)."""
    T = cfg.t_s2
    days = [_by_day(cs) for cs in cands]
    # Pass 1: a clear-sky score per day from SCL (or data coverage) at 20 m, every day read once for the block.
    from odc.geo.geobox import GeoBox

    gb20 = tuple(GeoBox.from_bbox(t.bounds(), f"EPSG:{t.epsg}", resolution=20.0) for t in tiles)
    probe = B.S2_SCL if has_scl else "B8A"

    def probe_names(cs):
        return [_odc_band_name(cs[0].resolved.masks[probe] if has_scl else cs[0].resolved.bands[probe])]

    def probe_score(arrs) -> float:
        (a,) = arrs.values()
        return float((~np.isin(a, B.SCL_INVALID) if has_scl else a > 0).mean())

    load_probe = _OdcReader(probe_names, gb20, RESAMPLING["classes"])
    probes, failed = _load_days(_merge_days(days), load_probe, "sentinel-2 date")
    scores = [{d: probe_score(probes[d][k]) for d in days[k] if d in probes} for k in range(len(tiles))]
    for k in range(len(tiles)):
        warnings[k].extend(msg for d, msg in failed.items() if d in days[k])

    choose = spread_chooser(T, start, end, cfg.min_valid_fraction)
    keep = []
    for k in range(len(tiles)):
        if choose(list(scores[k]), list(scores[k].values())):
            keep.append(k)
        else:
            warnings[k].append(
                f"sentinel-2: no date with at least {cfg.min_valid_fraction:.0%} clear pixels "
                f"among {len(days[k])} dates; S2 flagged invalid"
            )
    if not keep:
        return

    def band_names(cs):
        refs = cs[0].resolved
        names = [_odc_band_name(refs.bands[b]) for b in B.S2_BANDS]
        return names + [_odc_band_name(refs.masks[B.S2_SCL])] if has_scl else names

    # Resampling per band: reflectance bilinear, SCL nearest (odc-stac's default "*" key covers the bands).
    scl_name = _odc_band_name(cands[keep[0]][0].resolved.masks[B.S2_SCL]) if has_scl else None
    resampling = {"*": RESAMPLING["reflectance"], **({scl_name: RESAMPLING["classes"]} if scl_name else {})}
    load_bands = _OdcReader(band_names, tuple(tiles[k].geobox() for k in keep), resampling)

    loaded = _choose_and_load([days[k] for k in keep], [scores[k] for k in keep], choose, load_bands,
                              [warnings[k] for k in keep], "sentinel-2 date")
    for k, got in zip(keep, loaded, strict=True):
        stack = stacks[k]
        for slot, (day, arrs) in enumerate(got.items()):
            cs = days[k][day]
            names = band_names(cs)
            offset = s2_dn_offset(cs[0].item, cs[0].resolved.bands["B04"].asset_key)
            data = np.stack([arrs[nm] for nm in names[: len(B.S2_BANDS)]]).astype(np.int32)
            nodata = (data == 0).any(axis=0)
            if offset:
                data = np.clip(data + offset, 1, 65535)
            data[:, nodata] = 0
            mask = ~nodata
            if has_scl:
                scl = arrs[names[-1]]
                stack.extra["scl"][slot] = scl
                mask &= ~np.isin(scl, B.SCL_INVALID)
            stack.put(slot, day, data.astype(np.uint16), mask, [c.item.id for c in cs], cfg.min_valid_fraction)


def _to_db(values: np.ndarray, kind: str, nodata: float | None, warn: Callable[[str], None] | None = None,
           what: str = "") -> np.ndarray:
    """Backscatter in dB from ``kind`` values (``db``, ``linear_power``, ``amplitude_dn``), NaN where invalid.
    Linear power and amplitude are never negative: values that mostly are must already be dB (a user's catalog
    that does not say so), and are taken as dB with a warning instead of being discarded."""
    v = values.astype(np.float64)
    bad = ~np.isfinite(v)
    if nodata is not None and not math.isnan(nodata):
        bad |= v == nodata
    if kind != "db":
        ok = v[~bad]
        if ok.size and (ok < 0).mean() > 0.5:
            if warn is not None:
                warn(f"{what}: {(ok < 0).mean():.0%} of the values are negative, which {kind} never is: read as dB")
            kind = "db"
    if kind == "db":
        out = v
    elif kind == "linear_power":
        bad |= v <= 0
        out = 10 * np.log10(np.where(bad, 1.0, v))
    elif kind == "amplitude_dn":
        bad |= v <= 0
        out = 20 * np.log10(np.where(bad, 1.0, v)) - GRD_AMPLITUDE_CAL_DB
    else:
        raise ValueError(f"unknown S1 value type {kind!r}")
    out[bad] = np.nan
    return out.astype(np.float32)


def _warp_gcps(href: str, band_index: int, tile: Tile) -> np.ndarray:
    """A radar-geometry raster (georeferenced only by ground control points) warped bilinearly onto the tile
    grid: the source window the tile needs is found by inverting the GCP transform (rasterio's
    GCPTransformer), only that window is read, and GDAL warps it with the GCPs shifted into the window.
    Returns float32 with NaN where the raster has no data."""
    import rasterio
    from rasterio.control import GroundControlPoint
    from rasterio.enums import Resampling
    from rasterio.transform import GCPTransformer
    from rasterio.warp import reproject
    from rasterio.windows import Window

    out = np.full(tile.shape(), np.nan, np.float32)
    with rasterio.open(href) as src:
        gcps, gcp_crs = src.gcps
        if not gcps:
            raise ValueError(f"{href}: radar-geometry raster without ground control points")
        # The tile outline (densified) in the GCPs' CRS -> source rows/cols -> the window to read.
        outline = shapely.segmentize(shapely.geometry.box(*tile.bounds()), tile.grid.tile_m / 8)
        xs, ys = np.asarray(outline.exterior.coords).T
        from pyproj import Transformer

        gx, gy = Transformer.from_crs(tile.epsg, gcp_crs, always_xy=True).transform(xs, ys)
        rows, cols = GCPTransformer(gcps).rowcol(gx, gy, op=float)
        margin = 3
        r0, r1 = max(int(np.floor(np.min(rows))) - margin, 0), min(int(np.ceil(np.max(rows))) + margin, src.height)
        c0, c1 = max(int(np.floor(np.min(cols))) - margin, 0), min(int(np.ceil(np.max(cols))) + margin, src.width)
        if r0 >= r1 or c0 >= c1:
            return out  # the tile lies outside this scene
        data = src.read(band_index, window=Window(c0, r0, c1 - c0, r1 - r0)).astype(np.float32)
        nodata = src.nodata if src.nodata is not None else 0.0
        shifted = [GroundControlPoint(row=g.row - r0, col=g.col - c0, x=g.x, y=g.y, z=g.z) for g in gcps]
        reproject(
            data,
            out,
            gcps=shifted,
            src_crs=gcp_crs,
            src_nodata=nodata,
            dst_transform=tile.transform(),
            dst_crs=f"EPSG:{tile.epsg}",
            dst_nodata=np.nan,
            resampling=Resampling.bilinear,
        )
    return out


def assemble_s1(
    tiles: Sequence[Tile], cands: Sequence[list[_Candidate]], cfg: CubeConfig, start: date, end: date,
    warnings: Sequence[list[str]],
) -> list[ModalityStack]:
    """The Sentinel-1 stack (dB) of each of ``tiles`` (one block) from its candidates ``cands[k]``."""
    n = tiles[0].shape()[0]
    T = cfg.t_s1
    stacks = [ModalityStack.empty(B.S1, T, len(B.S1_BANDS), n, np.float32, np.nan, bool(cs)) for cs in cands]
    active = [k for k, cs in enumerate(cands) if cs]
    if not active:
        return stacks
    days = [_by_day(cands[k]) for k in active]
    cover = [_coverage_by_day(tiles[k], ds) for k, ds in zip(active, days, strict=True)]
    choose = spread_chooser(T, start, end, cfg.min_valid_fraction)
    radar_warnings: dict[tuple[date, int], list[str]] = defaultdict(list)  # per (day, tile): told if it keeps the day

    def warp_radar(cs, tile, warn):
        out = {}
        for b in B.S1_BANDS:
            merged = np.full(tile.shape(), np.nan, np.float32)
            for c in cs:  # same-day scenes: first valid value wins, as odc-stac's groupby does
                ref = c.resolved.bands[b]
                v = _to_db(_warp_gcps(ref.href, ref.band_index, tile), c.resolved.s1_values, None, warn,
                           f"{b} of {c.item.id}")
                merged = np.where(np.isnan(merged), v, merged)
            out[b] = merged
        return out

    def names(cs):
        return [_odc_band_name(cs[0].resolved.bands[b]) for b in B.S1_BANDS]

    map_reader = _OdcReader(names, tuple(tiles[k].geobox() for k in active), RESAMPLING["backscatter"],
                            dtype="float32")

    def load(days_: dict[date, list[_Candidate]]) -> dict[date, list[dict]]:
        radar = {d: cs for d, cs in days_.items() if cs[0].resolved.profile.geometry == "radar"}
        mapped = {d: cs for d, cs in days_.items() if d not in radar}
        # radar geometry is warped tile by tile through its GCPs, already in dB
        out = {d: [{"db": warp_radar(cs, tiles[k], radar_warnings[d, k].append)} for k in active]
               for d, cs in radar.items()}
        return {**out, **(map_reader(mapped) if mapped else {})}

    loaded = _choose_and_load(days, cover, choose, load, [warnings[k] for k in active], "sentinel-1 date")
    for k, ds, got in zip(active, days, loaded, strict=True):
        for slot, (day, arrs) in enumerate(got.items()):
            warnings[k].extend(dict.fromkeys(radar_warnings.get((day, k), ())))  # a retried day warns once
            cs = ds[day]
            if "db" in arrs:
                db = arrs["db"]
            else:
                r = cs[0].resolved
                db = {
                    b: _to_db(arrs[nm], r.s1_values, _raster_band(cs[0].item, r.bands[b].asset_key).get("nodata"),
                              warnings[k].append, f"{b} of {cs[0].item.id}")
                    for b, nm in zip(B.S1_BANDS, names(cs), strict=True)
                }
            data = np.stack([db[b] for b in B.S1_BANDS])
            mask = np.isfinite(data).all(axis=0)
            stacks[k].put(slot, day, data, mask, [c.item.id for c in cs], cfg.min_valid_fraction)
    return stacks


def assemble_hr(
    tiles: Sequence[Tile], cands: Sequence[list[_Candidate]], cfg: CubeConfig, warnings: Sequence[list[str]]
) -> list[ModalityStack]:
    """The high-resolution stack of each of ``tiles`` (one block) from its candidates ``cands[k]``."""
    r = cfg.hr_ratio
    n = tiles[0].shape(r)[0]
    T = cfg.t_hr
    stacks = [ModalityStack.empty(B.HR, T, len(B.HR_BANDS), n, np.uint8, 0, bool(cs)) for cs in cands]
    active = [k for k, cs in enumerate(cands) if cs]
    if not active:
        return stacks
    days = [_by_day(cands[k]) for k in active]
    cover = [_coverage_by_day(tiles[k], ds) for k, ds in zip(active, days, strict=True)]

    def choose(ds: list[date], sc: list[float]) -> list[date]:
        ok = [(d, v) for d, v in zip(ds, sc, strict=True) if v >= cfg.min_valid_fraction]
        return [d for d, _ in sorted(ok, key=lambda dv: (-dv[1], -dv[0].toordinal()))[:T]]

    def names(cs):
        return [_odc_band_name(cs[0].resolved.bands[b]) for b in B.HR_BANDS]

    load = _OdcReader(names, tuple(tiles[k].geobox(r) for k in active), RESAMPLING["reflectance"], dtype="uint8")

    loaded = _choose_and_load(days, cover, choose, load, [warnings[k] for k in active], "high-resolution date")
    for k, ds, got in zip(active, days, loaded, strict=True):
        for slot, (day, arrs) in enumerate(got.items()):
            cs = ds[day]
            data = np.stack([arrs[nm] for nm in names(cs)])
            mask = (data > 0).any(axis=0)
            stacks[k].put(slot, day, data, mask, [c.item.id for c in cs], cfg.min_valid_fraction)
    return stacks


def assemble_tiles(
    tiles: Sequence[Tile], items: Sequence[pystac.Item | Mapping], item_lists: Sequence[Sequence[int]],
    cfg: CubeConfig, start: date, end: date,
) -> list[TileSample]:
    """Load every modality of each of ``tiles``, adjacent tiles of one UTM zone read as one block (see
    :func:`blocks_of`), tile ``k`` from ``items[i] for i in item_lists[k]`` (pystac Items or item dicts).
    Each tile's sample equals what it would get alone: its own items, its own date choice."""
    import odc.stac

    if len({t.epsg for t in tiles}) != 1:
        raise ValueError("a block's tiles must lie in one UTM zone")
    odc.stac.configure_rio(cloud_defaults=True)  # per process: each Ray worker sets its own GDAL config
    # dicts are ours (sent to this task): no defensive deep copy of every item (it was ~10 % of a tile)
    items = [it if isinstance(it, pystac.Item) else pystac.Item.from_dict(dict(it), preserve_dict=False)
             for it in items]
    by, skipped = resolve_items(items, cfg.provider)
    # a skipped item is reported to the tiles it was meant for
    warnings = [[skipped[i] for i in lst if i in skipped] for lst in item_lists]
    cands: dict[str, list[list[_Candidate]]] = {}
    for modality in (B.S2, B.S1, B.HR):
        of = by.get(modality, [])
        cands[modality] = [[c for c in of if c.order in wanted] for wanted in map(set, item_lists)]
    s2 = assemble_s2(tiles, cands[B.S2], cfg, start, end, warnings)
    s1 = assemble_s1(tiles, cands[B.S1], cfg, start, end, warnings)
    hr = assemble_hr(tiles, cands[B.HR], cfg, warnings)
    return [TileSample(t, s2[k], s1[k], hr[k], warnings[k]) for k, t in enumerate(tiles)]


def assemble_tile(
    tile: Tile, items: Sequence[pystac.Item | Mapping], cfg: CubeConfig, start: date, end: date
) -> TileSample:
    """Load every modality of ``tile`` from ``items`` (pystac Items or item dicts)."""
    return assemble_tiles([tile], items, [range(len(items))], cfg, start, end)[0]


def blocks_of(tiles: Sequence[Tile], side: int) -> list[list[Tile]]:
    """``tiles`` grouped into blocks of up to ``side`` x ``side`` adjacent tiles of one UTM zone (in tile id
    order), the unit one ingest task reads: each date of each band is read once for the block instead of once
    per tile. Memory per task grows with ``side``**2 (a block of 2 x 2 tiles of 160 px with 40 dates of 11
    bands: ~70 MB of reads)."""
    if side < 1:
        raise ValueError(f"block side must be >= 1, got {side}")
    groups: dict[tuple, list[Tile]] = defaultdict(list)
    # counted from the run's first column and row of each zone, so that a square AOI of n x n tiles makes
    # full blocks (a tile's sample does not depend on the block it is read in)
    first: dict[tuple, tuple[int, int]] = {}
    for t in tiles:
        c, r = first.get((t.zone, t.south), (t.col, t.row))
        first[(t.zone, t.south)] = (min(c, t.col), min(r, t.row))
    for t in tiles:
        c0, r0 = first[(t.zone, t.south)]
        groups[(t.zone, t.south, (t.col - c0) // side, (t.row - r0) // side)].append(t)
    return [sorted(g, key=lambda t: t.id) for _, g in sorted(groups.items(), key=lambda kv: kv[1][0].id)]
