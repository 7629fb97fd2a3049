"""Scheduled refreshes of the crop and flood products: each run redoes only the tiles that new acquisitions touch.

    result = run_refresh(RefreshConfig(product="flood", catalog="out/demo/region/catalog.json",
                                       aoi="9.00,45.10,9.06,45.14", state="state/", as_of=date(2024, 10, 22)))

The state directory holds everything, one directory per product::

    STATE/<product>/
      .lock                            fcntl lock held for the whole run (the holder's pid and start in it)
      latest -> <as-of>/<model-version>   symlink, replaced atomically (os.replace of a new link)
      latest.json                      {"version", "path", "as_of", "model_version", "item"}: the same, for readers
                                       without symlinks (object stores); replaced atomically
      collection.json                  static STAC collection linking every version's item (pipeline.publish)
      <as-of>/<model-version>/         one version, never modified once it exists:
        <product>.tif, .png            the product COG (uint8, nodata 255, colour table, class names) + quicklook
        <product>.json                 its STAC item (classification + processing extensions, provenance)
        otsu.tif                       flood with a model: the Otsu baseline product beside it
        confidence.tif                 with a model: uint8 percent of the top class (pipeline.calibration)
        <product>.parquet              the product's polygons, GeoParquet (flood: the water classes only;
                                       crop: every class; pipeline.vectors), minimum mapping unit from the config
        confidence_tiles/<tile_id>.tif the confidence tile cores (with a model), linked like the tiles
        report.html                    quicklook with legend, class areas, provenance (pipeline.report)
        tiles/<tile_id>.tif            the tile cores it was mosaicked from (hard links to earlier versions'
                                       files for the tiles nothing new touched)
        version.json                   the version's record: inputs, model, counts, the digest of its inputs;
                                       small whatever the tile count
        tiles.parquet                  one row per tile (``pipeline.tile_table``): tile, seen (the item ids over
                                       it), status, made_by (the version that made its prediction), affected,
                                       reused, reason / stale, the flood method's per-tile figures
        published.json                 the STAC API URLs it was published to
      .work/<as-of>_<model-version>_<digest>/   the run in progress: cube.zarr (only the affected tiles), the
                                       predictions, the staged version; removed after the commit

A run: read ``latest`` (the last run's state) -> search the catalog for the product's window ([season start,
as-of] for crop, [as-of - baseline days, as-of] for flood) -> per tile, the items whose footprint meets it ->
the tiles where an item appears that the last version did not see are *affected* (all of them when the model,
the grid or the AOI changed, or there is no earlier version) -> ingest only those (``pipeline.ingest``,
``tile_filter``) -> predict them (crop: the fine-tuned head through ``pipeline.inference``; flood: the per-tile
Otsu baseline of ``pipeline.flood`` and, with a checkpoint, the model) -> stage the version: new tiles plus the
earlier version's files for the rest -> mosaic, quicklook, STAC item -> ``os.rename`` of the staged directory
into place (the commit) -> move ``latest`` -> rewrite ``collection.json`` -> POST the item to ``--publish``.

Guarantees: nothing new -> no version, exit 0 ("up to date"). Runs of one product are serialised by the lock
(``wait_s`` seconds of waiting, then "busy"). A run killed anywhere before the commit leaves the previous version
and ``latest`` as they were, and its work directory (same inputs -> same directory) lets the next run resume
(ingest and inference skip finished tiles). Killed after the commit but before ``latest`` moved: the next run
finds the version with the same inputs digest and only moves ``latest``. The bookkeeping after the commit
(``collection.json``, publishing) is redone by every run until it has happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import shapely.geometry

from pipeline import storage, zarr_cube
from pipeline.cube import CubeConfig
from pipeline.flood import FLOOD_PERMANENT, FLOOD_WATER, NODATA, flood_legend, otsu_flood
from pipeline.grid import TileGrid, parse_aoi, parse_tile_id, tiles_for_aoi
from pipeline.jsonfiles import CorruptRecordError, read_json
from pipeline.labels import CONFIDENCE_NODATA
from pipeline.locks import Busy, RunLock
from pipeline.tile_table import MEDIA_TYPE as TABLE_MEDIA_TYPE
from pipeline.tile_table import read_records, write_records

PRODUCTS = ("crop", "flood")
FORMAT = "skysense-refresh/1"
LATEST, LATEST_JSON, VERSION_JSON, PUBLISHED_JSON, COLLECTION_JSON, TILES_TABLE = (
    "latest", "latest.json", "version.json", "published.json", "collection.json", "tiles.parquet")
RUN_FACTS = ("affected", "reused")  # per-tile columns true of one run only: not carried over to the next version
LOCK, WORK = ".lock", ".work"
OTSU_VERSION = "otsu1"  # bump when pipeline.flood's method changes: every tile is redone under the new name
DESCRIPTIONS = {
    "crop": "Crop-type map from the season-to-date Sentinel-2 / Sentinel-1 series (SkySense temporal fusion + a "
            "fine-tuned head), refreshed as acquisitions arrive",
    "flood": "Flood extent on the latest Sentinel-1 date against a pre-event baseline: 0 dry, 1 flood water, "
             "2 permanent water, 255 nodata",
}


class RefreshBusy(Busy):
    """Another run of the same product holds the lock."""


def default_cube() -> CubeConfig:
    """The refresh cube: the ingest defaults, except 8 S2 and 8 S1 dates (the flood baseline needs every S1 date
    of its window, so that the latest one is in the cube)."""
    return CubeConfig(t_s2=8, t_s1=8)


@dataclass
class RefreshConfig:
    """One refresh run (``jobs/refresh.py`` flags in brackets).

    product [--product] crop | flood; catalog [--catalog] static catalog path or STAC API URL; aoi [--aoi] a
    GeoJSON file or "minlon,minlat,maxlon,maxlat"; state [--state] the state directory; publish [--publish] a
    STAC API URL with the Transactions extension; as_of [--as-of] the last day of data used (default: today,
    UTC); checkpoint [--checkpoint] crop: a fine-tune run directory or head (required); flood: a head, or an
    encoder with ``support`` (few-shot); without it the flood product is the Otsu baseline alone; support
    [--support] few-shot support (``pipeline.inference.parse_support``; its tiles are ingested too);
    season_start [--season-start] crop (default 1 January of the as-of year); baseline_days [--baseline-days]
    flood: the days before as-of whose S1 dates form the baseline; cube [--tile-px --halo-px --t-s2 --t-s1
    --t-hr --hr-ratio]; window / overlap / batch_size / gpu / num_actors: the model's inference; crs [--crs]
    the product CRS (default the AOI's UTM zone); wait_s [--wait] seconds to wait for the lock; keep_work
    [--keep-work]; ray_address [--ray-address]."""

    product: str
    catalog: str
    aoi: str
    state: str
    publish: str | None = None
    as_of: date | None = None
    checkpoint: str | None = None
    support: str | None = None
    season_start: date | None = None
    baseline_days: int = 36
    cube: CubeConfig = field(default_factory=default_cube)
    collections: list[str] | None = None
    window: int | None = None
    overlap: int | None = None
    batch_size: int = 4
    gpu: bool = False
    num_actors: int | None = None
    crs: str | None = None
    wait_s: float = 0.0
    allow_hrefs: tuple[str, ...] = ()  # [--allow-href] directories / URL prefixes the catalog may point to
    keep_work: bool = False
    ray_address: str | None = None
    min_mapping_unit_m2: float = 0.0  # [--min-mapping-unit] of the product's polygons


@dataclass
class RefreshResult:
    status: str  # "published" | "up-to-date" | "recovered" | "busy" | "failed"
    product: str
    as_of: str
    version: str | None = None  # "<as-of>/<model-version>" of latest after the run
    path: str | None = None
    previous: str | None = None
    affected: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    published: dict[str, str] = field(default_factory=dict)  # URL -> "created" | "replaced" | error
    warnings: dict[str, str] = field(default_factory=dict)  # tile -> what to look at
    seconds: float = 0.0
    message: str = ""

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["affected"], d["reused"] = len(self.affected), len(self.reused)
        d["seconds"] = round(self.seconds, 2)
        return d


# ------------------------------------------------------------------------------------------------------------------
# small pieces
# ------------------------------------------------------------------------------------------------------------------
def product_window(cfg: RefreshConfig, as_of: date) -> tuple[date, date]:
    """[start, end] of the acquisitions a version of the product uses."""
    if cfg.product == "crop":
        return (cfg.season_start or date(as_of.year, 1, 1)), as_of
    return as_of - timedelta(days=cfg.baseline_days), as_of


def model_version(cfg: RefreshConfig) -> tuple[str, dict[str, Any]]:
    """A short, file-name-safe name of what makes the predictions, and its description for the provenance.

    crop: ``<preset>-head-<sha256[:10]>``; flood: ``otsu1`` (no checkpoint), ``<preset>-head-<sha>`` or
    ``<preset>-fewshot-<sha of encoder + support>``. A new name means every tile is redone."""
    if cfg.checkpoint is None:
        return OTSU_VERSION, {"method": "otsu", "version": OTSU_VERSION}
    from pipeline.finetune import file_sha256
    from pipeline.inference import encoder_config, resolve_checkpoint

    task = "fewshot" if cfg.support else "landcover"
    encoder, head = resolve_checkpoint(cfg.checkpoint, task)
    preset = encoder_config(encoder)[0].name
    if head is not None:
        sha = file_sha256(head.path)
        return f"{preset}-head-{sha[:10]}", {"method": "head", "task": task, "head": head.path, "head_sha256": sha,
                                             "checkpoint": encoder, "preset": preset}
    sha = file_sha256(encoder)
    support = Path(cfg.support).read_text() if Path(cfg.support).is_file() else cfg.support
    digest = hashlib.sha256((sha + support).encode()).hexdigest()
    return f"{preset}-fewshot-{digest[:10]}", {"method": "fewshot", "task": task, "checkpoint": encoder,
                                                "checkpoint_sha256": sha, "support": cfg.support, "preset": preset}


def s1_collections() -> set[str]:
    """Every collection id a provider profile maps to Sentinel-1 (``pipeline.providers``)."""
    from pipeline.bands import S1
    from pipeline.providers import PROFILES

    return {c for p in PROFILES.values() for c, cp in p.collections.items() if cp.modality == S1}


def _newest_day(items, seen: dict[str, list[str]], collections: Sequence[str]) -> dict[str, str]:
    """Per tile, the newest solar day (ISO) of the items of ``collections`` seen over it."""
    from pipeline.cube import solar_day

    day = {it.id: solar_day(it).isoformat() for it in items if it.collection_id in collections}
    return {t: max((day[i] for i in ids if i in day), default=None) for t, ids in seen.items()}


def _atomic_json(path: Path, doc: Any) -> None:
    storage.write_bytes(path, (json.dumps(doc, indent=2, default=str) + "\n").encode())  # temp file + os.replace


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # versions share unchanged tiles; files are never modified in place, so this is safe
    except OSError:
        shutil.copy2(src, dst)


class ProductLock(RunLock):
    """The lock of one product's runs, ``STATE/<product>/.lock`` (``pipeline.locks``)."""

    def __init__(self, path: Path, wait_s: float = 0.0):
        super().__init__(path, wait_s, "refresh", RefreshBusy)


def read_latest(prod_dir: Path) -> dict[str, Any] | None:
    """The ``version.json`` of the version ``latest.json`` points to (None before the first version)."""
    p = prod_dir / LATEST_JSON
    if not p.exists():
        return None
    fix = "restore it from the version directories (each holds its version.json) or move it away to start over"
    ptr = read_json(p, "the refresh pointer", fix)
    if "version" not in ptr:
        raise CorruptRecordError(f"the refresh pointer {p} names no version; {fix}")
    return read_version(prod_dir / ptr["version"], fix)


def read_version(vdir: Path, fix: str = "restore the version directory or move it away") -> dict[str, Any]:
    """A version's record (``version.json``) with ``"tiles"``: ``{tile_id: record}`` from its ``tiles.parquet``
    (or, for versions written before the table, from the record itself), without the per-run columns."""
    doc = read_json(vdir / VERSION_JSON, "the version record", fix)
    if doc.get("tiles_table"):
        doc["tiles"] = read_records(vdir / doc["tiles_table"], "the version's tile table", fix)
        for rec in doc["tiles"].values():
            for k in RUN_FACTS:
                rec.pop(k, None)
    return doc


def write_tile_state(vdir: Path, tiles: dict[str, dict], affected: Sequence[str], reused: Sequence[str]) -> Path:
    """A version's per-tile state as ``vdir/tiles.parquet``: ``tiles`` ({tile_id: record}) with the run's
    ``affected`` and ``reused`` flags as columns; returns its path."""
    affected_set, reused_set = set(affected), set(reused)
    return write_records(vdir / TILES_TABLE, {t: {**rec, "affected": t in affected_set, "reused": t in reused_set}
                                              for t, rec in tiles.items()})


def _set_latest(prod_dir: Path, version: dict[str, Any]) -> None:
    rel = version["version"]
    _atomic_json(prod_dir / LATEST_JSON, {"version": rel, "path": str(prod_dir / rel), "as_of": version["as_of"],
                                          "model_version": version["model_version"], "item": version["item"]})
    tmp = prod_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    os.replace(tmp, prod_dir / LATEST)


def _versions(prod_dir: Path) -> list[Path]:
    """Every committed version directory (``<as-of>/<model-version>`` holding a version.json), oldest first."""
    return sorted(p.parent for p in prod_dir.glob(f"*/*/{VERSION_JSON}") if not p.parent.parent.name.startswith("."))


# ------------------------------------------------------------------------------------------------------------------
# per-tile Otsu (a Ray task)
# ------------------------------------------------------------------------------------------------------------------
def otsu_tile(cube: str, tile_id: str, out: str) -> dict[str, Any]:
    """The Otsu flood classes of one cube tile, its core written to ``out`` (GeoTIFF, atomically)."""
    from affine import Affine

    from pipeline.inference import write_tile
    from pipeline.labels import tile_georef

    t0 = time.perf_counter()
    try:
        ds = zarr_cube.open_tile(cube, tile_id)
        vv = ds["s1"].sel(band_s1="VV").values
        mask = ds["s1_mask"].values.astype(bool)
        valid = ds["s1_valid"].values.astype(bool)
        dates = [str(np.datetime_as_string(d, unit="D")) for d in ds["time_s1"].values]
        res = otsu_flood(vv, mask, valid, dates)
        grid = zarr_cube.cube_config(zarr_cube.open_cube(cube)).grid
        ys, xs = parse_tile_id(tile_id, grid).core_slice()
        geo = tile_georef(cube, tile_id)
        names, colors = flood_legend()
        write_tile(out, res.classes[ys, xs][None], epsg=geo.epsg, transform=geo.transform * Affine.translation(
            xs.start, ys.start), nodata=NODATA, colormap=colors,
            tags={"tile_id": tile_id, "class_names": json.dumps({str(k): v for k, v in names.items()}),
                  "otsu_threshold_db": f"{res.threshold_db:.2f}", "threshold_source": res.threshold_source})
        if res.event_date is None:
            return {"status": "failed", "reason": "no valid Sentinel-1 date in the window"}
        return {"status": "done", "threshold_db": round(res.threshold_db, 2), "threshold_source": res.threshold_source,
                "event_date": res.event_date, "baseline_dates": res.baseline_dates,
                "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # one tile's failure is recorded, the others go on
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}


def run_otsu(cube: str, tiles: Sequence[str], out_dir: Path, say, cpus: float = 0.5) -> dict[str, dict]:
    """:func:`otsu_tile` over ``tiles`` as Ray tasks (at most 2 per CPU in flight); {tile: record}."""
    import ray

    task = ray.remote(num_cpus=cpus, max_retries=2)(otsu_tile)
    cap = max(2, int(2 * ray.cluster_resources().get("CPU", 2) / cpus))
    queue, pending, out = deque(tiles), {}, {}
    while queue or pending:
        while queue and len(pending) < cap:
            t = queue.popleft()
            pending[task.remote(cube, t, str(out_dir / "tiles" / f"{t}.tif"))] = t
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            t = pending.pop(ref)
            try:
                out[t] = ray.get(ref)
            except Exception as e:
                out[t] = {"status": "failed", "reason": f"task lost: {type(e).__name__}: {e}"}
            say(f"[refresh] otsu {t}: {out[t]['status']} ({len(out)}/{len(tiles)})")
    return out


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------
def run_refresh(cfg: RefreshConfig, progress: Callable[[str], None] | None = print) -> RefreshResult:
    """One refresh (module docstring). Raises ``ValueError`` (bad input) and ``pipeline.stac.StacSearchError``
    (catalog) before anything is written; a busy lock is a result (status "busy"), not an exception."""
    say = progress or (lambda _s: None)
    t0 = time.perf_counter()
    if cfg.product not in PRODUCTS:
        raise ValueError(f"--product must be one of {', '.join(PRODUCTS)}, not {cfg.product!r}")
    if cfg.product == "crop" and cfg.checkpoint is None:
        raise ValueError("--product crop needs --checkpoint (a fine-tune run directory or its head.safetensors)")
    if cfg.support and cfg.checkpoint is None:
        raise ValueError("--support needs --checkpoint (the encoder the few-shot predictor runs)")
    if cfg.baseline_days < 1:
        raise ValueError(f"--baseline-days must be >= 1, got {cfg.baseline_days}")
    as_of = cfg.as_of or datetime.now(timezone.utc).date()
    aoi = parse_aoi(cfg.aoi)
    mversion, mdesc = model_version(cfg)  # checks the checkpoint
    prod_dir = Path(cfg.state).resolve() / cfg.product
    prod_dir.mkdir(parents=True, exist_ok=True)
    try:
        with ProductLock(prod_dir / LOCK, cfg.wait_s):
            result = _refresh_locked(cfg, prod_dir, as_of, aoi, mversion, mdesc, say)
    except RefreshBusy as e:
        result = RefreshResult("busy", cfg.product, as_of.isoformat(), message=f"{e}: this run does nothing")
        say(f"[refresh] {result.message}")
    result.seconds = time.perf_counter() - t0
    return result


def _refresh_locked(cfg: RefreshConfig, prod_dir: Path, as_of: date, aoi, mversion: str, mdesc: dict,
                    say) -> RefreshResult:
    from pipeline.ingest import assign_items, default_collections, init_ray, run_ingest
    from pipeline.stac import open_source, search

    prev = read_latest(prod_dir)
    if prev and date.fromisoformat(prev["as_of"]) > as_of:
        raise ValueError(f"--as-of {as_of} is before the latest version's {prev['as_of']} ({prev['version']})")
    start, end = product_window(cfg, as_of)
    ccfg = cfg.cube
    tiles = tiles_for_aoi(aoi, ccfg.grid)
    if not tiles:
        raise ValueError(f"the AOI {cfg.aoi} covers no tile")
    if cfg.support:  # support tiles of the refresh's own cube are ingested with the AOI's: they must lie in it
        from pipeline.inference import parse_support

        own = prod_dir / "refresh-cube"  # a stand-in for the run's cube: entries without "cube" name it
        ids = {t.id for t in tiles}
        outside = [e.tile for e in parse_support(cfg.support, own, cfg.allow_hrefs) if Path(e.cube) == own.resolve()
                   and e.tile not in ids]
        if outside:
            raise ValueError(f"--support tile(s) {', '.join(outside)} lie outside the --aoi {cfg.aoi} (its tiles: "
                             f"{', '.join(sorted(ids)[:4])}{' ...' if len(ids) > 4 else ''}): support tiles are "
                             "ingested with the AOI's tiles, so they must be among them")
    source = open_source(cfg.catalog, provider=ccfg.provider, allow=cfg.allow_hrefs)
    cols = list(cfg.collections) if cfg.collections else default_collections(source)
    items = search(source, collections=cols, intersects=shapely.geometry.mapping(aoi),
                   datetime=f"{start.isoformat()}/{end.isoformat()}", allow_empty=True)
    seen = {t: sorted(items[i].id for i in idx) for t, idx in assign_items(tiles, items).items()}
    tile_ids = [t.id for t in tiles]
    result = RefreshResult("failed", cfg.product, as_of.isoformat(), previous=prev["version"] if prev else None)

    inputs = {"product": cfg.product, "model_version": mversion, "cube": zarr_cube.config_to_json(ccfg),
              "aoi": shapely.geometry.mapping(aoi), "window": [start.isoformat(), end.isoformat()],
              "collections": cols, "seen": seen}
    inputs = json.loads(json.dumps(inputs, default=str))  # the form version.json gives back (lists, not tuples)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    same_setup = prev is not None and all(prev.get(k) == inputs[k] for k in ("model_version", "cube", "aoi"))
    if same_setup:
        affected = [t for t in tile_ids if prev["tiles"].get(t, {}).get("status") != "done"
                    or set(seen[t]) - set(prev["tiles"][t]["seen"])]
    else:
        affected = list(tile_ids)
        if prev:
            say(f"[refresh] the model, grid or AOI changed since {prev['version']}: every tile is redone")
    say(f"[refresh] {cfg.product} as of {as_of}: {len(items)} items over {start}/{end}, {len(tile_ids)} tiles, "
        f"{len(affected)} affected" + (f" (latest: {prev['version']})" if prev else " (first version)"))

    if prev and not affected:
        result.status, result.version, result.path = "up-to-date", prev["version"], str(prod_dir / prev["version"])
        result.message = f"nothing new since {prev['version']} (as of {prev['as_of']}): no new version"
        say(f"[refresh] {result.message}")
        result.published = _bookkeeping(cfg, prod_dir, say)
        return result
    if not items:
        raise ValueError(f"no items in {cfg.catalog} over the AOI in {start}/{end}: nothing to make a first version of")

    # a version with these inputs may exist already (a run killed between its commit and moving `latest`)
    rel = f"{as_of.isoformat()}/{mversion}"
    k = 2
    while (prod_dir / rel / VERSION_JSON).exists():
        existing = json.loads((prod_dir / rel / VERSION_JSON).read_text())
        if existing.get("inputs_digest") == digest:
            _set_latest(prod_dir, existing)
            result.status, result.version, result.path = "recovered", rel, str(prod_dir / rel)
            result.message = f"{rel} was committed by an earlier run that stopped before moving latest: latest moved"
            say(f"[refresh] {result.message}")
            result.published = _bookkeeping(cfg, prod_dir, say)
            return result
        rel = f"{as_of.isoformat()}/{mversion}-r{k}"  # late items for an as-of date already published
        k += 1

    work = prod_dir / WORK / f"{as_of.isoformat()}_{mversion}_{digest[:12]}"
    stage = work / "version"
    if stage.exists():
        shutil.rmtree(stage)  # staging is cheap to redo; the cube and predictions are what a resume keeps
    work.mkdir(parents=True, exist_ok=True)
    cube = work / "cube.zarr"

    support_tiles: set[str] = set()
    if cfg.support:
        from pipeline.inference import parse_support

        support_tiles = {e.tile for e in parse_support(cfg.support, cube, cfg.allow_hrefs)
                         if Path(e.cube) == cube.resolve()}
    need = set(affected) | support_tiles
    init_ray(cfg.ray_address)
    say(f"[refresh] ingesting {len(need)} tile(s) into {cube}")
    report = run_ingest(cfg.catalog, aoi, start, end, cube, ccfg, collections=cols, allow_hrefs=cfg.allow_hrefs,
                        ray_address=cfg.ray_address,
                        tile_filter=lambda t: t.id in need, progress=say)
    ingested = [t for t in affected if zarr_cube.is_done(cube, t)]
    new_files: dict[str, Path] = {}
    conf_files: dict[str, Path] = {}  # the model's confidence tiles (the Otsu baseline has none)
    baseline_files: dict[str, Path] = {}
    failed: dict[str, str] = {t: f"ingest: {report.failed.get(t, 'not written')}" for t in affected
                              if t not in ingested}
    tile_records: dict[str, dict] = {}

    if cfg.product == "flood":
        otsu_dir = work / "otsu"
        todo = [t for t in ingested if not (otsu_dir / "tiles" / f"{t}.tif").exists()]
        recs = run_otsu(str(cube), todo, otsu_dir, say) if todo else {}
        newest_s1 = _newest_day(items, seen, s1_collections())
        for t in ingested:
            r = recs.get(t, {"status": "done"})
            if r["status"] == "done":
                baseline_files[t] = otsu_dir / "tiles" / f"{t}.tif"
                tile_records[t] = {k: v for k, v in r.items() if k != "status"}
                newest = newest_s1.get(t)
                if r.get("event_date") and newest and r["event_date"] < newest:
                    result.warnings[t] = (f"the newest Sentinel-1 acquisition over it ({newest}) is not in the cube "
                                          f"(event date {r['event_date']}): raise --t-s1 to the S1 dates of "
                                          f"--baseline-days")
                    tile_records[t]["warning"] = result.warnings[t]
                    say(f"[refresh] warning: {t}: {result.warnings[t]}")
            elif cfg.checkpoint is None:
                failed[t] = f"otsu: {r['reason']}"
        if cfg.checkpoint is None:
            new_files = dict(baseline_files)
    if cfg.checkpoint is not None:
        from pipeline.inference import CONFIDENCE_FILE, InferenceConfig, run_inference, tile_path

        todo = [t for t in ingested if t not in failed]
        if todo:
            res = run_inference(InferenceConfig(
                cube=str(cube), checkpoint=cfg.checkpoint, task=mdesc["task"], out=str(work / "model.tif"),
                support=cfg.support, allow_hrefs=cfg.allow_hrefs, window=cfg.window, overlap=cfg.overlap,
                batch_size=cfg.batch_size, gpu=cfg.gpu,
                work_dir=str(work), name="model", ray_address=cfg.ray_address, num_actors=cfg.num_actors,
                tiles=todo, make_product=False, overwrite=True,
            ), progress=say)
            for t in todo:
                if t in res.done:
                    new_files[t] = tile_path(work / "model", t)
                    conf_files[t] = tile_path(work / "model", t, CONFIDENCE_FILE)
                else:
                    failed[t] = f"model: {res.failed.get(t, 'not predicted')}"

    # stage the version: this run's tiles, the earlier version's for the rest (and for tiles that failed now)
    reused: list[str] = []
    tiles_doc: dict[str, dict] = {}
    for t in tile_ids:
        rec: dict[str, Any] = {"seen": seen[t]}
        if t in new_files:
            _link_or_copy(new_files[t], stage / "tiles" / f"{t}.tif")
            if t in conf_files and Path(conf_files[t]).exists():
                _link_or_copy(conf_files[t], stage / "confidence_tiles" / f"{t}.tif")
            if t in baseline_files and cfg.checkpoint is not None:
                _link_or_copy(baseline_files[t], stage / "otsu_tiles" / f"{t}.tif")
            rec.update(status="done", made_by=rel, **tile_records.get(t, {}))
        elif prev and prev["tiles"].get(t, {}).get("status") == "done" and same_setup:
            src = prod_dir / prev["version"] / "tiles" / f"{t}.tif"
            _link_or_copy(src, stage / "tiles" / f"{t}.tif")
            if (prod_dir / prev["version"] / "confidence_tiles" / f"{t}.tif").exists():
                _link_or_copy(prod_dir / prev["version"] / "confidence_tiles" / f"{t}.tif",
                              stage / "confidence_tiles" / f"{t}.tif")
            if (prod_dir / prev["version"] / "otsu_tiles" / f"{t}.tif").exists():
                _link_or_copy(prod_dir / prev["version"] / "otsu_tiles" / f"{t}.tif", stage / "otsu_tiles" / f"{t}.tif")
            prev_rec = prev["tiles"][t]
            rec.update({k: v for k, v in prev_rec.items() if k != "seen"})
            if t in failed:  # new data over it could not be used: keep the old prediction, say so
                rec.update(stale=failed[t])
                rec["seen"] = prev_rec["seen"]  # so the next run tries the new items again
            reused.append(t)
        else:
            rec.update(status="failed", reason=failed.get(t, "no prediction"))
        tiles_doc[t] = rec
    done_tiles = [t for t in tile_ids if tiles_doc[t]["status"] == "done"]
    result.affected, result.reused = affected, reused
    result.failed = dict(failed)
    if not done_tiles:
        result.message = f"no tile could be predicted: {next(iter(failed.values()), '')}"
        say(f"[refresh] {result.message}; the previous version stays latest")
        return result

    write_tile_state(stage, tiles_doc, affected, reused)
    item_path = _make_version(cfg, prod_dir, stage, rel, as_of, start, end, mversion, mdesc, done_tiles, tiles_doc,
                              prev, cube, aoi, say)
    version = {"format": FORMAT, "product": cfg.product, "version": rel, "as_of": as_of.isoformat(),
               "model_version": mversion, "model": mdesc, "inputs_digest": digest,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "previous": result.previous,
               "item": f"{rel}/{item_path.name}", "tiles_table": TILES_TABLE,
               "counts": {"tiles": len(tile_ids), "done": len(done_tiles), "affected": len(affected),
                          "reused": len(reused), "failed": len(failed)},
               **{k: inputs[k] for k in ("cube", "aoi", "window", "collections")}}
    _atomic_json(stage / VERSION_JSON, version)
    (prod_dir / as_of.isoformat()).mkdir(exist_ok=True)
    os.rename(stage, prod_dir / rel)  # the commit: the version appears whole or not at all
    _set_latest(prod_dir, version)
    say(f"[refresh] committed {rel}: {len(affected)} tile(s) refreshed, {len(reused)} reused, {len(failed)} failed; "
        f"latest -> {rel}")
    result.status, result.version, result.path = "published", rel, str(prod_dir / rel)
    result.published = _bookkeeping(cfg, prod_dir, say)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _make_version(cfg: RefreshConfig, prod_dir: Path, stage: Path, rel: str, as_of: date, start: date, end: date,
                  mversion: str, mdesc: dict, done_tiles: list[str], tiles_doc: dict, prev: dict | None, cube: Path,
                  aoi, say) -> Path:
    """Mosaic the staged tiles into the product COG (+ the Otsu baseline COG for flood with a model), quicklook and
    STAC item; returns the item's path."""
    from pipeline.inference import default_product_crs
    from pipeline.mosaic import mosaic_tiles, product_blocksize, quicklook_png
    from pipeline.product_item import product_item, write_item

    names, colors = _legend(cfg, mdesc, cube)
    crs = (f"EPSG:{cfg.crs}" if str(cfg.crs).isdigit() else cfg.crs) if cfg.crs else default_product_crs(
        {"aoi": shapely.geometry.mapping(aoi)})
    blocksize = product_blocksize(cfg.cube.grid.tile_px, len(done_tiles))
    tags = {"product": cfg.product, "as_of": as_of.isoformat(), "model_version": mversion}
    cog = mosaic_tiles([stage / "tiles" / f"{t}.tif" for t in done_tiles], stage / f"{cfg.product}.tif",
                       dst_crs=crs, nodata=NODATA, blocksize=blocksize, colormap=colors or None,
                       class_names=names or None, tags=tags, overwrite=True, progress=say)
    png = quicklook_png(cog, stage / f"{cfg.product}.png")
    extra_cogs = {}
    # the model's confidence: every tile a model predicted has one; tiles reused from a version made before
    # confidence files existed have none and are nodata in it (the report says how many), on the map's own grid
    conf_tiles = [p for t in done_tiles if (p := stage / "confidence_tiles" / f"{t}.tif").exists()]
    notes = []
    if conf_tiles:
        import rasterio

        with rasterio.open(cog) as src:
            grid_of_map = {"bounds": tuple(src.bounds), "resolution": src.res[0]}
        extra_cogs["confidence"] = mosaic_tiles(
            conf_tiles, stage / "confidence.tif", dst_crs=crs, nodata=CONFIDENCE_NODATA, blocksize=blocksize,
            overview_resampling="average", band_names=["confidence_percent"], tags=tags, overwrite=True,
            progress=say, **grid_of_map)
        if len(conf_tiles) < len(done_tiles):
            notes.append(f"{len(done_tiles) - len(conf_tiles)} of {len(done_tiles)} tiles have no confidence (made "
                         "before confidence files existed): nodata in confidence.tif")
    otsu_tiles = sorted((stage / "otsu_tiles").glob("*.tif")) if (stage / "otsu_tiles").exists() else []
    if otsu_tiles:
        fnames, fcolors = flood_legend()
        extra_cogs["otsu"] = mosaic_tiles(otsu_tiles, stage / "otsu.tif", dst_crs=crs, nodata=NODATA,
                                          blocksize=blocksize, colormap=fcolors, class_names=fnames,
                                          tags={**tags, "model_version": OTSU_VERSION}, overwrite=True, progress=say)
    input_items = sorted({i for t in done_tiles for i in tiles_doc[t]["seen"]})
    provenance = {
        "product": cfg.product, "as_of": as_of.isoformat(), "model_version": mversion, **mdesc,
        "previous_version": prev["version"] if prev else None, "tiles_done": len(done_tiles),
        # counts: the tiles themselves are rows of the "tiles" asset (10^5 ids would swell every item)
        "tiles_refreshed": sum(tiles_doc[t].get("made_by") == rel for t in done_tiles),
        "tiles_failed": sum(r["status"] != "done" for r in tiles_doc.values()),
        "input_items": input_items, "cube": str(cube), "dates": {"start": start.isoformat(), "end": end.isoformat()},
        "lineage": f"pipeline.refresh: {cfg.product} tiles touched by new acquisitions re-ingested and re-predicted "
                   f"({mdesc['method']}), the others reused from the previous version, mosaicked with pipeline.mosaic",
    }
    item_id = f"{cfg.product}-{rel.replace('/', '-')}"
    collection_id = f"skysense-{cfg.product}"
    item = product_item(cog, item_id=item_id, start=datetime.combine(start, datetime.min.time()),
                        end=datetime.combine(end, datetime.max.time().replace(microsecond=0)),
                        class_names=names or None, colormap=colors or None, provenance=provenance, quicklook=png,
                        collection=collection_id, collection_href=os.path.relpath(prod_dir / COLLECTION_JSON,
                                                                                  prod_dir / rel),
                        properties={"version": rel})
    import pystac

    from pipeline.product_item import add_raster_asset
    from pipeline.vectors import polygonise

    if "otsu" in extra_cogs:
        item.add_asset("otsu", pystac.Asset(str(Path(extra_cogs["otsu"]).resolve()), media_type=pystac.MediaType.COG,
                                            roles=["data", "baseline"], title="Otsu VV-threshold baseline"))
    if "confidence" in extra_cogs:
        add_raster_asset(item, "confidence", extra_cogs["confidence"], roles=["data", "confidence"],
                         title="confidence of the class map: percent of the top class", unit="percent")
    keep = [FLOOD_WATER, FLOOD_PERMANENT] if cfg.product == "flood" else None
    vec = polygonise(cog, stage / f"{cfg.product}.parquet", class_names=names or None, classes=keep,
                     min_mapping_unit_m2=cfg.min_mapping_unit_m2)
    say(f"[refresh] polygons: {vec.features} features ({'water classes' if keep else 'every class'}, minimum "
        f"mapping unit {cfg.min_mapping_unit_m2:g} m²) in {vec.path.name}")
    item.add_asset("vectors", pystac.Asset(
        str(vec.path.resolve()), media_type="application/vnd.apache.parquet", roles=["data", "vector"],
        title=f"{'water extent' if keep else 'class'} polygons (GeoParquet; minimum mapping unit "
              f"{cfg.min_mapping_unit_m2:g} m²)"))
    item.add_asset("tiles", pystac.Asset(str((stage / TILES_TABLE).resolve()), media_type=TABLE_MEDIA_TYPE,
                                         roles=["metadata"], title="Per-tile state: seen items, status, version"))
    report = _version_report(cfg, stage, cog, png, names, colors, item, provenance, vec, notes)
    item.add_asset("report", pystac.Asset(str(report.resolve()), media_type=pystac.MediaType.HTML,
                                          roles=["overview", "metadata"], title="version report"))
    return write_item(item, stage / f"{cfg.product}.json")


def _version_report(cfg: RefreshConfig, stage: Path, cog: Path, png: Path, names: dict, colors: dict, item,
                    provenance: dict, vec, notes: list[str]) -> Path:
    """``report.html`` of a version (``pipeline.report``): quicklook and legend, class areas, what made it."""
    from pipeline.inference import class_areas_km2
    from pipeline.report import RunReport, write_report

    prov = {k: provenance[k] for k in ("product", "as_of", "model_version", "method", "previous_version",
                                       "tiles_done", "tiles_refreshed", "tiles_failed", "dates", "input_items")
            if k in provenance}
    rep = RunReport(
        title=f"SkySense {cfg.product} refresh as of {provenance['as_of']} ({provenance['model_version']})",
        quicklook=png, legend=[(names.get(k, str(k)), tuple(colors[k])) for k in sorted(colors)],
        class_areas_km2=class_areas_km2(cog, names), provenance=prov,
        bounds_lonlat=tuple(item.bbox) if item.bbox else None,
        notes=[*notes, f"polygons: {vec.features} in {vec.path.name}"])
    return write_report(rep, stage, name="report.html")


def _legend(cfg: RefreshConfig, mdesc: dict, cube: Path) -> tuple[dict[int, str], dict[int, tuple]]:
    """({value: name}, {value: RGBA}) of the product: the flood legend (Otsu), the head's classes, or the few-shot
    support labels' legend."""
    if mdesc["method"] == "otsu":
        return flood_legend()
    if mdesc["method"] == "head":
        from pipeline.inference import resolve_checkpoint

        head = resolve_checkpoint(cfg.checkpoint, "landcover")[1]
        n = head.num_classes
        return ({k: v for k, v in head.class_names.items() if k < n}, {k: v for k, v in head.colormap.items() if k < n})
    from pipeline.finetune import label_legend
    from pipeline.inference import parse_support

    return label_legend(parse_support(cfg.support, cube, cfg.allow_hrefs)[0].labels)


def _bookkeeping(cfg: RefreshConfig, prod_dir: Path, say) -> dict[str, str]:
    """After a commit (and on every later run until done): rewrite the static collection, publish the latest
    version's item to ``cfg.publish`` unless its published.json says it was. Returns {url: outcome}."""
    import pystac

    from pipeline.publish import PublishError, publish_item, write_static_collection

    versions = _versions(prod_dir)
    items = []
    for v in versions:
        doc = json.loads((v / VERSION_JSON).read_text())
        items.append(prod_dir / doc["item"])
    cid = f"skysense-{cfg.product}"
    write_static_collection(prod_dir / COLLECTION_JSON, cid, f"SkySense {cfg.product} product", DESCRIPTIONS[
        cfg.product], items)
    out: dict[str, str] = {}
    if not cfg.publish:
        return out
    latest = read_latest(prod_dir)
    if latest is None:
        return out
    vdir = prod_dir / latest["version"]
    pub_path = vdir / PUBLISHED_JSON
    published = json.loads(pub_path.read_text()) if pub_path.exists() else {}
    if cfg.publish in published:
        return {cfg.publish: "already published"}
    item = pystac.Item.from_file(str(prod_dir / latest["item"]))
    item.make_asset_hrefs_absolute()
    doc = item.to_dict(include_self_link=False, transform_hrefs=False)
    doc["links"] = [ln for ln in doc.get("links", []) if ln.get("rel") not in ("collection", "parent", "root")]
    col = pystac.Collection.from_file(str(prod_dir / COLLECTION_JSON)).to_dict(include_self_link=False,
                                                                             transform_hrefs=False)
    col["links"] = []
    try:
        outcome = publish_item(cfg.publish, doc, col)
    except PublishError as e:
        say(f"[refresh] publishing {latest['version']} failed (the next run retries): {e}")
        return {cfg.publish: f"error: {e}"}
    published[cfg.publish] = {"outcome": outcome, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # published.json is the one file written into a committed version: bookkeeping, not product content
    _atomic_json(pub_path, published)
    say(f"[refresh] {latest['version']} {outcome} at {cfg.publish}")
    return {cfg.publish: outcome}


def cube_config_from_flags(tile_px: int | None, halo_px: int | None, t_s2: int | None, t_s1: int | None,
                           t_hr: int | None, hr_ratio: int | None) -> CubeConfig:
    """:func:`default_cube` overridden by the flags given."""
    d = default_cube()
    grid = TileGrid(tile_px or d.grid.tile_px, d.grid.halo_px if halo_px is None else halo_px)
    return CubeConfig(grid=grid, t_s2=t_s2 or d.t_s2, t_s1=t_s1 or d.t_s1, t_hr=t_hr or d.t_hr,
                      hr_ratio=hr_ratio or d.hr_ratio)
