"""Ingest orchestration: a STAC search over an AOI and a season becomes a Zarr v3 cube, one Ray task per block
of adjacent tiles.

The driver searches once, plans the tiles (:mod:`pipeline.grid`), assigns each tile the items whose footprint
intersects it (an STRtree query per tile: linear in tiles, not tiles x items), creates or reopens the cube,
skips tiles whose done marker is set, groups the others into blocks of up to ``block_tiles`` x ``block_tiles``
(each band and date is read once per block: :func:`pipeline.cube.assemble_tiles`) and runs the blocks as Ray
tasks with fractional CPUs, keeping a bounded number in flight. A tile that fails is recorded with its reason;
the others are still written. At the end the index status, the cube-wide normalisation statistics (from every
done tile, including those of earlier runs) and ``manifest.json`` (counts) with ``manifest.parquet`` (one row
per tile) are written.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import shapely
import shapely.geometry

from pipeline import storage, zarr_cube
from pipeline.cube import CubeConfig, TileSample, assemble_tile, assemble_tiles, blocks_of
from pipeline.grid import Tile, footprints_lonlat, tiles_for_aoi
from pipeline.hrefs import HrefPolicy, HrefRefused
from pipeline.locks import Busy, run_lock
from pipeline.providers import GENERIC_PROVIDER_NAME, PROFILES, ProviderError, resolve_item
from pipeline.stac import StacSource, open_source, search

log = logging.getLogger(__name__)


@dataclass
class TileOutcome:
    tile_id: str
    ok: bool
    seconds: float
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    stats: dict | None = None


@dataclass
class IngestReport:
    cube: str
    tiles: int
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]
    warnings: dict[str, list[str]]
    seconds: float
    items: int
    valid_pixels: int = -1  # valid core pixel-dates over every done tile and modality (-1: not counted)

    @property
    def empty(self) -> bool:
        """Done tiles, but not one valid pixel on any date of any modality: a cube no stage can use."""
        return self.valid_pixels == 0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.empty

    def summary(self) -> str:
        lines = [
            f"cube {self.cube}: {self.tiles} tiles, {len(self.done)} written, {len(self.skipped)} already done, "
            f"{len(self.failed)} failed, {self.items} items, {self.seconds:.1f} s"
        ]
        if self.empty:
            lines.append("  NO VALID DATE in any tile: every date of every modality was rejected (see the warnings "
                         "below and in manifest.parquet: unreadable bands, masks, nodata, dates outside the season)")
        for tid, reason in sorted(self.failed.items()):
            lines.append(f"  FAILED {tid}: {reason.splitlines()[0][:300]}")
        n_warn = sum(len(v) for v in self.warnings.values())
        if n_warn:
            lines.append(f"  {n_warn} warnings in {len(self.warnings)} tiles (see manifest.parquet), e.g.:")
            for tid, ws in list(self.warnings.items())[:3]:
                lines.append(f"    {tid}: {ws[0][:300]}")
        return "\n".join(lines)


def _failed(tile_id: str, seconds: float, e: Exception) -> TileOutcome:
    reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
    return TileOutcome(tile_id, False, seconds, reason=reason)


def _write(cube: str, sample: TileSample, cfg: CubeConfig, seconds_before: float) -> TileOutcome:
    """Write one assembled tile; never raises. Its seconds: ``seconds_before`` (its assembly) plus the write."""
    t0 = time.perf_counter()
    try:
        zarr_cube.write_tile(cube, sample, cfg)
        return TileOutcome(sample.tile.id, True, seconds_before + time.perf_counter() - t0,
                           warnings=sample.warnings, stats=sample.stats)
    except Exception as e:  # a tile's failure must not take the run down
        return _failed(sample.tile.id, seconds_before + time.perf_counter() - t0, e)


def ingest_tile(
    cube: str, tile: Tile, items: Sequence[Mapping], cfg: CubeConfig, start: date, end: date
) -> TileOutcome:
    """Assemble and write one tile; never raises (the reason goes into the outcome)."""
    t0 = time.perf_counter()
    try:
        sample = assemble_tile(tile, items, cfg, start, end)
    except Exception as e:  # a tile's failure must not take the run down
        return _failed(tile.id, time.perf_counter() - t0, e)
    return _write(cube, sample, cfg, time.perf_counter() - t0)


def ingest_block(
    cube: str, tiles: Sequence[Tile], items: Sequence[Mapping], item_lists: Sequence[Sequence[int]],
    cfg: CubeConfig, start: date, end: date,
) -> list[TileOutcome]:
    """Assemble a block of adjacent tiles with one read per band and date (``pipeline.cube.assemble_tiles``;
    tile ``k`` from ``items[i] for i in item_lists[k]``) and write each tile; never raises. When the block
    cannot be assembled, its tiles are done one by one, so that one bad tile does not fail its neighbours.
    A tile's seconds are its share of the block's assembly plus its own write."""
    if len(tiles) == 1:
        return [ingest_tile(cube, tiles[0], [items[i] for i in item_lists[0]], cfg, start, end)]
    t0 = time.perf_counter()
    try:
        samples = assemble_tiles(tiles, items, item_lists, cfg, start, end)
    except Exception:
        return [ingest_tile(cube, t, [items[i] for i in lst], cfg, start, end)
                for t, lst in zip(tiles, item_lists, strict=True)]
    share = (time.perf_counter() - t0) / len(tiles)
    return [_write(cube, sample, cfg, share) for sample in samples]


# Largest read one ingest task may hold, for choosing the block side [ours].
BLOCK_READ_BUDGET_BYTES = 1 << 30


def block_side(cfg: CubeConfig, requested: int) -> int:
    """The block side (tiles) for ``requested``, reduced until a block's reads fit
    :data:`BLOCK_READ_BUDGET_BYTES`: S2 (11 bands of uint16 at 10 m) and HR (3 bands of uint8 at
    ``10 / hr_ratio`` m) over the block, for twice the dates a tile keeps (neighbouring tiles choose
    different dates, and the block reads their union) [ours: a 2 x 2 block of the demo region read 22
    Sentinel-2 dates for tiles of 20]."""
    side = max(int(requested), 1)
    n = cfg.grid.size_px

    def nbytes(s: int) -> int:
        px = (s * n) ** 2
        return px * (11 * 2 * cfg.t_s2 * 2 + cfg.hr_ratio**2 * 3 * cfg.t_hr * 2)

    while side > 1 and nbytes(side) > BLOCK_READ_BUDGET_BYTES:
        side -= 1
    return side


def default_collections(source: StacSource) -> list[str]:
    """The source's collections that some provider profile maps onto the canonical bands; every collection when
    none is (a user's own catalog: the ``generic`` profile reads its items, ``check_items`` says what it found)."""
    known = {c for p in PROFILES.values() for c in p.collections}
    ids = source.collection_ids()
    return [c for c in ids if c in known] or list(ids)


MODALITY_NAMES = {"s2": "Sentinel-2", "s1": "Sentinel-1", "hr": "high-resolution RGB"}


def check_items(items: Sequence[pystac.Item], cfg: CubeConfig, say: Callable[[str], None],
                policy: HrefPolicy | None = None) -> dict[str, int]:
    """Resolve every found item onto the canonical bands before any tile is touched: the usable items per
    modality. Warns about items read with the ``generic`` profile and about requested modalities no item
    serves; raises ``ValueError`` naming the items and what was looked for when no item serves any requested
    modality (the cube would hold no valid date), and :class:`pipeline.hrefs.HrefRefused` naming the first
    band hrefs outside ``policy``."""
    usable: dict[str, int] = {}
    problems: list[str] = []
    generic: list[str] = []
    refused: list[str] = []
    for it in items:
        try:
            r = resolve_item(it, cfg.provider)
        except ProviderError as e:
            problems.append(str(e))
            continue
        if policy is not None:
            for ref in [*r.bands.values(), *r.masks.values()]:
                try:
                    policy.check(ref.href, f"item {it.id!r} band {ref.band}")
                except HrefRefused as e:
                    refused.append(str(e))
            if refused:
                continue
        usable[r.modality] = usable.get(r.modality, 0) + 1
        if r.provider == GENERIC_PROVIDER_NAME:
            generic.append(it.id)
    if refused:
        raise HrefRefused(f"{len(refused)} band href(s) refused: {refused[0]}"
                          + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""))
    if generic:
        say(f"[ingest] warning: {len(generic)} item(s) match no provider profile (no provider link or 'providers' "
            f"metadata) and are read with the 'generic' profile, bands found from their own metadata: "
            f"{', '.join(generic[:3])}{' ...' if len(generic) > 3 else ''}")
    wanted = [m for m, t in (("s2", cfg.t_s2), ("s1", cfg.t_s1), ("hr", cfg.t_hr)) if t > 0]
    if items and not any(usable.get(m) for m in wanted):
        detail = "; ".join(problems[:3]) + (f"; ... ({len(problems)} items)" if len(problems) > 3 else "")
        raise ValueError(
            f"none of the {len(items)} items found yields the bands of a requested modality "
            f"({', '.join(MODALITY_NAMES[m] for m in wanted)}): {detail or 'they are all of other modalities'}")
    for m in wanted:
        if not usable.get(m):
            say(f"[ingest] warning: no item yields {MODALITY_NAMES[m]} bands: its dates in the cube stay empty")
    if problems:
        say(f"[ingest] warning: {len(problems)} item(s) skipped: {problems[0]}")
    return usable


def assign_items(tiles: Sequence[Tile], items: Sequence[pystac.Item]) -> dict[str, list[int]]:
    """For every tile, the indices of the items whose footprint intersects it (with halo)."""
    if not tiles:
        return {}
    tree = shapely.STRtree([shapely.geometry.shape(it.geometry) for it in items])
    pairs = tree.query(footprints_lonlat(tiles), predicate="intersects")  # (2, k): tile index, item index
    pairs = pairs[:, np.lexsort((pairs[1], pairs[0]))]
    per_tile = np.split(pairs[1], np.searchsorted(pairs[0], np.arange(1, len(tiles))))
    return {t.id: [int(i) for i in found] for t, found in zip(tiles, per_tile, strict=True)}


def resolve_ray_address(address: str | None) -> str:
    """The cluster a job uses: the given address, else RAY_ADDRESS (``ray job submit`` sets it), else a fresh
    local Ray ("local"). Ray's own discovery of "the last `ray start` cluster" is used only when asked for
    with "auto": a stale record of a stopped cluster must not hang a job on one machine."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


# A local Ray started by a job lives as long as the job, on a machine that may have 2 cores. By default the raylet
# kills a worker idle for 1 s beyond a soft limit of one per CPU and prestarts one per CPU for the first driver;
# each (re)start imports Ray Data, pyarrow and pandas, ~1.5 CPU-s. A pipeline whose read or write stage runs a
# few milliseconds per tile between longer model steps then restarts its workers over and over: 12 tiles of
# inference on 2 cores spent 10 CPU-s on it, a third of the run (bench/infer.py). Kept alive, the workers start
# once.
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000, "prestart_worker_first_driver": False}


RAY_CONNECT_TIMEOUT_S = 10.0  # [ours] an unreachable cluster is reported after this, instead of minutes of retries


class RayUnreachable(ValueError):
    """The Ray cluster address does not answer."""


def check_ray_address(addr: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to a ``host:port`` or ``ray://host:port`` cluster address within ``timeout`` seconds, or
    :class:`RayUnreachable` naming it (``ray.init`` itself retries for minutes)."""
    import socket
    from urllib.parse import urlsplit

    if addr in ("local", "auto"):
        return
    hostport = addr.split("://", 1)[1] if "://" in addr else addr
    parts = urlsplit(f"//{hostport}")
    if parts.scheme or parts.hostname is None or parts.port is None:
        raise RayUnreachable(f"--ray-address {addr!r} is not HOST:PORT, ray://HOST:PORT, 'auto' or 'local'")
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
    except OSError as e:
        raise RayUnreachable(f"the Ray cluster at {addr!r} does not answer ({e}) within {timeout:g} s: check "
                             "--ray-address or RAY_ADDRESS") from None
    _check_speaks_grpc(addr, hostport, timeout)  # as given: an IPv6 literal keeps its brackets


def _check_speaks_grpc(addr: str, hostport: str, timeout: float) -> None:
    """Something that accepts TCP but is not a Ray cluster (a web server, a proxy, a wrong port) makes
    ``ray.init`` retry for a minute before it fails: one gRPC call to the GCS (ray://: the Ray Client server),
    with a deadline, tells in milliseconds. Any gRPC answer, even an error status (unauthenticated, not
    implemented), is a gRPC server and passes; a transport failure (not HTTP/2) or silence does not. Skipped
    with TLS (``RAY_USE_TLS``), which this plain channel cannot speak."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    try:
        import grpc
    except ImportError:  # ray[default] brings grpcio; without it ray.init decides
        return
    # no HTTP proxy: Ray's own channels ignore http_proxy too (ray_constants.GLOBAL_GRPC_OPTIONS)
    channel = grpc.insecure_channel(hostport, options=[("grpc.enable_http_proxy", 0)])
    try:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        call(b"", timeout=timeout)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise RayUnreachable(f"{addr!r} accepts connections but does not answer as a Ray cluster within "
                                 f"{timeout:g} s: check --ray-address or RAY_ADDRESS") from None
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            raise RayUnreachable(f"{addr!r} answers but is not a Ray cluster (it does not speak gRPC: a web "
                                 "server, a proxy, another service?): check --ray-address or RAY_ADDRESS") from None
    finally:
        channel.close()


def init_ray(address: str | None, log_to_driver: bool = True) -> None:
    """Connect to (or start) Ray once per process. ``log_to_driver=False``: the workers' output stays in
    their log files instead of this process's stdout (benchmarks that print JSON lines)."""
    import ray

    if ray.is_initialized():
        # already connected (a caller's session): an explicit address that is not Ray is still an error to report
        if address not in (None, "auto", "local") and address != ray.get_runtime_context().gcs_address:
            addr = resolve_ray_address(address)
            if not addr.startswith(("http://", "https://")):
                check_ray_address(addr)
        return
    addr = resolve_ray_address(address)
    if addr.startswith(("http://", "https://")):
        raise RayUnreachable(f"--ray-address {addr!r} is a dashboard / Jobs API URL: submit with `ray job submit "
                             f"--address {addr}`, or pass the cluster's HOST:PORT here")
    check_ray_address(addr)
    extra = {"include_dashboard": False, "_system_config": LOCAL_RAY_SYSTEM_CONFIG} if addr == "local" else {}
    # The job's Python loggers (driver, tasks, actors) report errors only: Ray Train's detached
    # PlacementGroupCleaner warns every few seconds that the State API (a dashboard service, off on a local Ray)
    # does not answer, dozens of lines per run that buried the per-step and per-tile progress, which the
    # pipeline prints. SKYSENSE_RAY_LOG_LEVEL=WARNING (or INFO) brings Ray's messages back.
    level = os.environ.get("SKYSENSE_RAY_LOG_LEVEL", "ERROR").upper()
    ray.init(address=addr, log_to_driver=log_to_driver, logging_level=logging.WARNING,
             logging_config=ray.LoggingConfig(log_level=level), **extra)


def run_ingest(
    catalog: str,
    aoi,
    start: date,
    end: date,
    out: str | Path,
    cfg: CubeConfig | None = None,
    *,
    collections: Sequence[str] | None = None,
    ray_address: str | None = None,
    cpus_per_tile: float = 0.9,
    max_in_flight: int | None = None,
    block_tiles: int = 4,
    progress: Callable[[str], None] | None = print,
    tile_filter: Callable[[Tile], bool] | None = None,
    overwrite: bool = False,
    wait_s: float = 0.0,
    allow_hrefs: Sequence[str] = (),
) -> IngestReport:
    """Build (or complete) the cube at ``out`` for ``aoi`` (a shapely geometry in lon/lat) and [start, end].

    Raises :class:`pipeline.stac.StacSearchError` (no items, unknown collection ...), ``ValueError`` (bad
    AOI) and :class:`pipeline.zarr_cube.CubeError` (an existing cube made with other settings, or an ``out``
    that is a file or a directory that is not a cube, unless ``overwrite``) before any tile is touched.
    ``tile_filter`` restricts the run to some of the planned tiles (tests, refreshes). One ingest at a time
    writes a cube: another waits up to ``wait_s`` s for the lock (``.OUT.lock`` beside it: a file lock, or for an
    ``s3://`` cube a lease object, ``pipeline.locks``), then raises :class:`IngestBusy`. The catalog's
    links and the items' band hrefs must stay within ``pipeline.hrefs.HrefPolicy.for_catalog(catalog,
    allow_hrefs)`` (``HrefRefused``, a ``ValueError``, before any tile).
    """
    cfg = cfg or CubeConfig()
    out = storage.location(out)
    zarr_cube.check_out(out, overwrite)
    parent, _, name = out.rpartition("/")  # out: an absolute path or a URL (storage.location)
    if not storage.is_remote(out):
        Path(parent).mkdir(parents=True, exist_ok=True)
    with run_lock(f"{parent}/.{name}.lock", wait_s, "ingest into this cube", IngestBusy):
        return _run_ingest(catalog, aoi, start, end, out, cfg, collections=collections, ray_address=ray_address,
                           cpus_per_tile=cpus_per_tile, max_in_flight=max_in_flight, block_tiles=block_tiles,
                           progress=progress,
                           tile_filter=tile_filter, overwrite=overwrite, allow_hrefs=allow_hrefs)


class IngestBusy(Busy):
    """Another ingest writes the same cube."""


def _run_ingest(catalog, aoi, start, end, out, cfg, *, collections, ray_address, cpus_per_tile, max_in_flight,
                block_tiles, progress, tile_filter, overwrite, allow_hrefs) -> IngestReport:
    import ray

    t0 = time.perf_counter()
    say = progress or (lambda s: None)
    source = open_source(catalog, provider=cfg.provider, allow=allow_hrefs)
    cols = list(collections) if collections else default_collections(source)
    if not cols:
        raise ValueError(
            f"{catalog} has no collection that a provider profile maps "
            f"(its collections: {', '.join(source.collection_ids())})"
        )
    window = f"{start.isoformat()}/{end.isoformat()}"
    items = search(source, collections=cols, intersects=shapely.geometry.mapping(aoi), datetime=window)
    check_items(items, cfg, say, HrefPolicy.for_catalog(catalog, allow_hrefs))
    all_tiles = tiles_for_aoi(aoi, cfg.grid)
    tiles = [t for t in all_tiles if tile_filter(t)] if tile_filter is not None else all_tiles
    say(
        f"[ingest] {len(items)} items in {', '.join(cols)} over {window}; {len(tiles)} tiles of "
        f"{cfg.grid.tile_px}+2x{cfg.grid.halo_px} px"
    )
    search_meta = {
        "catalog": catalog,
        "collections": cols,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "aoi": shapely.geometry.mapping(aoi),
    }
    fresh = not storage.exists(storage.join(out, "zarr.json"))
    zarr_cube.create_or_open(out, cfg, all_tiles, search_meta, overwrite=overwrite)

    if fresh:  # a cube made just now has no done tile: no marker to read (10^5 tiles: 9 s saved)
        done_flags = [False] * len(tiles)
    else:
        with ThreadPoolExecutor(8) as pool:
            done_flags = list(pool.map(lambda t: zarr_cube.is_done(out, t.id), tiles))
    todo = [t for t, d in zip(tiles, done_flags, strict=True) if not d]
    skipped = [t.id for t, d in zip(tiles, done_flags, strict=True) if d]
    if skipped:
        say(f"[ingest] {len(skipped)} tiles already done, {len(todo)} to do")
    assignment = assign_items(todo, items)
    item_dicts = [it.to_dict(include_self_link=False, transform_hrefs=False) for it in items]

    outcomes: list[TileOutcome] = []
    side = 0  # the block side this run read with (0: nothing to read)
    if todo:
        init_ray(ray_address)
        task = ray.remote(num_cpus=cpus_per_tile, max_retries=2)(ingest_block)
        cfg_ref = ray.put(cfg)
        slots = max(1, int(ray.cluster_resources().get("CPU", 2) / cpus_per_tile))
        cap = max_in_flight or max(2, 2 * slots)
        side = block_side(cfg, block_tiles)
        blocks = blocks_of(todo, side)
        while side > 1 and len(blocks) < 2 * slots:  # a small run: two blocks per core at least
            side -= 1
            blocks = blocks_of(todo, side)
        pending: dict[Any, list[str]] = {}
        # largest blocks first, so that the small ones at the AOI's edges fill in at the end;
        # popleft: O(1), where list.pop(0) is O(n)
        queue = deque(sorted(blocks, key=len, reverse=True))
        last = time.perf_counter()
        while queue or pending:
            while queue and len(pending) < cap:
                block = queue.popleft()
                # the block's items once; each tile names its own by index into them
                used = sorted({i for t in block for i in assignment[t.id]})
                at = {i: j for j, i in enumerate(used)}
                lists = [[at[i] for i in assignment[t.id]] for t in block]
                ref = task.remote(out, block, [item_dicts[i] for i in used], lists, cfg_ref, start, end)
                pending[ref] = [t.id for t in block]
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                ids = pending.pop(ref)
                try:
                    outcomes.extend(ray.get(ref))
                except Exception as e:  # the worker died more often than max_retries
                    outcomes.extend(TileOutcome(tid, False, 0.0, reason=f"task lost: {type(e).__name__}: {e}")
                                    for tid in ids)
            now = time.perf_counter()
            if now - last > 5 or not (queue or pending):
                n_ok = sum(o.ok for o in outcomes)
                rate = len(outcomes) / max(now - t0, 1e-9)
                say(
                    f"[ingest] {len(outcomes)}/{len(todo)} tiles ({n_ok} ok, {len(outcomes) - n_ok} failed), "
                    f"{rate:.2f} tiles/s"
                )
                last = now

    # Statistics over every done tile of the cube (this run's and earlier ones').
    status = {}
    partials = []
    by_id = {o.tile_id: o for o in outcomes}
    for t in all_tiles:
        o = by_id.get(t.id)
        if o is not None:
            status[t.id] = zarr_cube.DONE if o.ok else zarr_cube.FAILED
            if o.ok:
                partials.append(o.stats)
        elif (attrs := zarr_cube.tile_attrs(out, t.id)).get(zarr_cube.DONE_ATTR):
            status[t.id] = zarr_cube.DONE
            partials.append(attrs.get("stats"))
    report = IngestReport(
        cube=out,
        tiles=len(tiles),
        done=[o.tile_id for o in outcomes if o.ok],
        skipped=skipped,
        failed={o.tile_id: o.reason or "" for o in outcomes if not o.ok},
        warnings={o.tile_id: o.warnings for o in outcomes if o.warnings},
        seconds=time.perf_counter() - t0,
        items=len(items),
        valid_pixels=int(sum(sum(s.get("count", [])) for p in partials if p for s in p.values())) if partials else -1,
    )
    manifest = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "search": {k: v for k, v in search_meta.items() if k != "aoi"},
        "tiles_planned": len(all_tiles),
        "counts": {"done": sum(s == zarr_cube.DONE for s in status.values()), "failed": len(report.failed),
                   "with_warnings": len(report.warnings)},
        "this_run": {"written": len(report.done), "skipped_done": len(skipped), "seconds": round(report.seconds, 2),
                     "block_side": side},
    }
    # one row per planned tile: what a scheduler or a user filters on (``pipeline.tile_table``)
    names = {zarr_cube.PLANNED: "planned", zarr_cube.DONE: "done", zarr_cube.FAILED: "failed"}
    skipped_set = set(skipped)
    rows = {}
    for t in all_tiles:
        o = by_id.get(t.id)
        this_run = ("written" if o.ok else "failed") if o else "skipped_done" if t.id in skipped_set else None
        rows[t.id] = {"status": names[status.get(t.id, zarr_cube.PLANNED)], "reason": report.failed.get(t.id),
                      "warnings": report.warnings.get(t.id), "this_run": this_run,
                      "seconds": round(o.seconds, 2) if o else None}
    zarr_cube.finalize(out, status, zarr_cube.reduce_stats(p for p in partials if p), manifest, rows)
    say("[ingest] " + report.summary())
    return report


def cube_summary(cube: str | Path) -> str:
    """A few lines describing a cube: tiles, dates per modality, statistics."""
    root = zarr_cube.open_cube(cube)
    cfg = zarr_cube.cube_config(root)
    status = root["index/status"][:]
    lines = [
        f"cube {cube}",
        f"  tiles: {len(status)} planned, {(status == zarr_cube.DONE).sum()} done, "
        f"{(status == zarr_cube.FAILED).sum()} failed; tile {cfg.grid.tile_px}+2x{cfg.grid.halo_px} px, "
        f"HR ratio {cfg.hr_ratio}",
    ]
    done = [t for t, s in zip(zarr_cube.tile_ids(root), status, strict=True) if s == zarr_cube.DONE]
    if done:
        # the arrays straight from zarr: opening the tile as an xarray Dataset cost ~0.7 s at the end of every run
        tid = done[len(done) // 2]
        g = root[zarr_cube.tile_group(tid)]
        lines.append(
            f"  tile {tid} (EPSG:{g.attrs['epsg']}): "
            + ", ".join(f"{m} {int(g[f'{m}_valid'][:].sum())}/{g[m].shape[0]} valid dates" for m in ("s2", "s1", "hr"))
        )
        for name in ("s2", "s1", "hr"):
            lines.append(f"    {name:<3} {tuple(g[name].shape)} {g[name].dtype}")
    stats = dict(root.attrs.get("stats", {}))
    for m, s in stats.items():
        lines.append(f"  {m} mean " + " ".join(f"{v:.1f}" for v in s["mean"]))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(cube_summary(sys.argv[1]))
