"""Benchmark: the ingest job (``jobs/ingest.py`` on Ray) against plain ``odc.stac.load`` + ``Dataset.to_zarr``.

Prints one JSON object per line. For each AOI size, both pipelines run in the same invocation, one after the
other, each in its own subprocess over the same catalog, AOI and season (the whole year 2024):

- ``ingest``: ``jobs/ingest.py --ray-address local`` (its own, isolated local Ray) into a fresh cube.
  Tiles = done tiles in the cube index; MB = uncompressed bytes of every array of every tile group.
- ``baseline_odc_stac_to_zarr``: the same search (``pipeline.stac.search``), then per modality one
  ``odc.stac.load(items, bands, bbox=AOI, crs=AOI's UTM zone, resolution=10 (HR 10/hr_ratio),
  groupby="solar_day", resampling bilinear (SCL nearest), chunks={})`` and ``ds.to_zarr(out, group=modality,
  zarr_format=3, mode="w")``. MB = uncompressed bytes of the datasets written; its "tiles" are the ingest's
  tile count for the AOI, so that tiles/s compare.

Seconds are the wall time of each subprocess (interpreter start, imports and, for the ingest, Ray start-up
included). Peak memory is the peak over time (sampled every 0.2 s from /proc) of the summed RSS of the
subprocess and every process it started (the driver and, for the ingest, Ray's GCS, raylet, agents and
workers); Ray processes that are not descendants of the driver are found by an environment marker and
counted too (with a local Ray every daemon and worker is a descendant of the driver while the job runs; only
workers orphaned while Ray shuts down show up outside the tree). Ray's session files go to the run's temp
directory (RAY_TMPDIR), which is removed at the end, and no process of a run is left running. RSS counts
shared pages (libraries, the plasma store) once per process, so the summed PSS is reported as well.
Targets: ingest / baseline >= 1.0, and ingest peak memory independent of the AOI size.

    python bench/ingest.py [--catalog CATALOG] [--sizes-km 1.5 3.0] [--region-km 3.2] [--tile-px 128]
                           [--halo-px 16] [--block-tiles N]

Without ``--catalog`` a demo region of ``--region-km`` is generated first (not timed); the AOIs are squares
centred in it. With ``--catalog`` the AOIs are centred on ``--center LON LAT`` (default: the centre of the
static catalog's collection extents).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

YEAR = 2024
START, END = f"{YEAR}-01-01", f"{YEAR}-12-31"
MARKER_ENV = "SKYSENSE_BENCH_INGEST_RUN"
NOTE = (
    "the two pipelines do different work: the ingest writes whole tiles with halo (the tiles cover more than "
    "the AOI), keeps 20 S2 / 10 S1 / 1 HR dates per tile (chosen after a 20 m SCL pass over every S2 date, read "
    "once per block of tiles) and "
    "computes masks and statistics; the baseline loads every date of every modality over the AOI bbox only, "
    "unmasked. tiles/s therefore compares time per AOI; mb_per_s (bytes written per second) is the fairer "
    "of the two ratios"
)


# ------------------------------------------------------------------------------------------- /proc sampling

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time in clock ticks since boot) for every process visible in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                s = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = s[s.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may contain spaces
        out[int(name)] = (int(rest[1]), int(rest[19]))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _has_marker(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARKER_ENV}={marker}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _kind(cmd: str) -> str:
    """What a Ray process is, from its command line (workers and agents retitle themselves ``ray::...``)."""
    if cmd.startswith("ray::"):
        title = cmd[5:].split(" ")[0]
        return {"DashboardAgent": "dashboard_agent", "RuntimeEnvAgent": "runtime_env_agent"}.get(title, "worker")
    first = cmd.split(" ")[0]
    if first.endswith("gcs_server"):
        return "gcs_server"
    if first.endswith("raylet"):
        return "raylet"
    if "default_worker.py" in cmd:
        return "worker"
    for key, name in (
        ("dashboard/agent.py", "dashboard_agent"),
        ("runtime_env/agent", "runtime_env_agent"),
        ("dashboard/dashboard.py", "dashboard"),
        ("log_monitor.py", "log_monitor"),
        ("autoscaler/_private/monitor.py", "autoscaler_monitor"),
    ):
        if key in cmd:
            return name
    return "other"


class TreeMonitor(threading.Thread):
    """Samples the summed RSS / PSS of ``root`` and its descendants (plus marked processes outside the tree)."""

    def __init__(self, root: int, marker: str, before: set[tuple[int, int]], interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.marker, self.before, self.interval = root, marker, before, interval
        self._halt = threading.Event()
        self._ours: dict[tuple[int, int], bool] = {}
        self.seen: dict[tuple[int, int], str] = {}  # every process of the run: (pid, start) -> kind
        self.outside: set[tuple[int, int]] = set()  # marked processes that were not descendants of root
        self.other_cmds: dict[tuple[int, int], str] = {}  # processes not recognised as Ray's
        self.samples = 0
        self.peak = {"rss": 0, "pss": 0, "driver_rss": 0, "ray_rss": 0, "processes": 0}
        self.at_peak: dict[str, float] = {}
        self.root_start = None

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        table = _proc_table()
        if self.root not in table:
            return
        if self.root_start is None:
            self.root_start = table[self.root][1]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        desc, stack = set(), [self.root]
        while stack:
            for c in children.get(stack.pop(), ()):
                if c not in desc:
                    desc.add(c)
                    stack.append(c)
        members = {self.root} | desc
        for pid, (_, start) in table.items():
            key = (pid, start)
            if pid in members or key in self.before or start < self.root_start:
                continue
            if key not in self._ours:
                self._ours[key] = _has_marker(pid, self.marker)
            if self._ours[key]:
                members.add(pid)
                self.outside.add(key)
        rss = pss = driver = 0
        kinds: dict[str, float] = {}
        for pid in members:
            r = _rss(pid)
            key = (pid, table[pid][1])
            if key not in self.seen:
                self.seen[key] = "driver" if pid == self.root else _kind(_cmdline(pid))
            kind = self.seen[key]
            if kind in ("worker", "other"):  # a worker's title changes (ray::IDLE -> ray::task)
                cmd = _cmdline(pid)
                if cmd:  # empty while a process exits: keep what it was
                    kind = self.seen[key] = "driver" if pid == self.root else _kind(cmd)
                    if kind == "other":
                        self.other_cmds[key] = cmd[:120]
            rss += r
            pss += _pss(pid)
            if pid == self.root:
                driver = r
            kinds[kind] = kinds.get(kind, 0) + r
        self.samples += 1
        p = self.peak
        p["driver_rss"] = max(p["driver_rss"], driver)
        p["ray_rss"] = max(p["ray_rss"], rss - driver)
        p["pss"] = max(p["pss"], pss)
        p["processes"] = max(p["processes"], len(members))
        if rss > p["rss"]:
            p["rss"] = rss
            self.at_peak = {"processes": len(members), **{k: round(v / MB, 1) for k, v in sorted(kinds.items())}}


def _alive(key: tuple[int, int]) -> bool:
    try:
        with open(f"/proc/{key[0]}/stat", "rb") as f:
            s = f.read().decode(errors="replace")
        rest = s[s.rindex(")") + 2 :].split()
        return int(rest[19]) == key[1] and rest[0] != "Z"
    except OSError:
        return False


def _leftovers(mon: TreeMonitor, marker: str) -> set[tuple[int, int]]:
    """Processes of the run still alive: every one seen during the run, plus any that carries the marker."""
    left = {k for k in mon.seen if _alive(k)}
    for pid, (_, start) in _proc_table().items():
        if (pid, start) not in mon.before and pid != os.getpid() and _has_marker(pid, marker):
            left.add((pid, start))
    return left


def _reap(mon: TreeMonitor, marker: str, grace: float = 10.0) -> list[str]:
    """Wait for the run's processes to exit; kill (by pid, TERM then KILL) those that remain. Returns the kinds
    of the processes that had to be killed."""
    deadline = time.time() + grace
    left = _leftovers(mon, marker)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = _leftovers(mon, marker)
    killed = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for key in left:
            if _alive(key):
                try:
                    os.kill(key[0], sig)
                except ProcessLookupError:
                    pass
        if sig == signal.SIGTERM and left:
            killed = [f"{mon.seen.get(k, _kind(_cmdline(k[0])))}:{k[0]}" for k in left]
            time.sleep(3)
        left = {k for k in left if _alive(k)}
    return killed


def measure(cmd: list[str], env_extra: dict[str, str], log: Path, timeout: float) -> dict:
    """Run ``cmd``; wall time, exit code and the memory of its process tree."""
    marker = uuid.uuid4().hex
    env = {**os.environ, **env_extra, MARKER_ENV: marker, "PYTHONUNBUFFERED": "1"}
    before = {(pid, start) for pid, (_, start) in _proc_table().items()}
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        mon = TreeMonitor(proc.pid, marker, before)
        mon.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        seconds = time.perf_counter() - t0
        mon.stop()
    killed = _reap(mon, marker)
    p = mon.peak
    ray_kinds = {k for k in mon.seen.values() if k != "driver"}
    return {
        "exit_code": rc,
        "seconds": seconds,
        "peak_rss_mb": round(p["rss"] / MB, 1),
        "peak_rss_mb_driver": round(p["driver_rss"] / MB, 1),
        "peak_rss_mb_ray_processes": round(p["ray_rss"] / MB, 1),
        "peak_pss_mb": round(p["pss"] / MB, 1),
        "rss_mb_at_peak_by_process": mon.at_peak,
        "processes_started": len(mon.seen),
        "ray_process_kinds": sorted(ray_kinds),
        "ray_processes_outside_driver_tree": sorted(mon.seen.get(k, "?") for k in mon.outside),
        "other_processes": sorted(set(mon.other_cmds.values())),
        "memory_samples": mon.samples,
        "leftover_processes_killed": killed,
        "log_tail": log.read_text(errors="replace")[-1500:] if rc != 0 else None,
    }


# ----------------------------------------------------------------------------------------------- AOIs


def aoi_bbox(center_lonlat: tuple[float, float], size_km: float) -> tuple[list[float], int]:
    """A square of ``size_km`` centred on ``center_lonlat`` in its UTM zone, as a lon/lat bbox (and the EPSG)."""
    from pyproj import Transformer

    from pipeline.grid import utm_epsg, utm_zone

    lon, lat = center_lonlat
    epsg = utm_epsg(utm_zone(lon), lat < 0)
    fwd = Transformer.from_crs(4326, epsg, always_xy=True)
    inv = Transformer.from_crs(epsg, 4326, always_xy=True)
    cx, cy = fwd.transform(lon, lat)
    h = size_km * 500.0
    xs, ys = inv.transform([cx - h, cx + h, cx + h, cx - h], [cy - h, cy - h, cy + h, cy + h])
    return [round(min(xs), 6), round(min(ys), 6), round(max(xs), 6), round(max(ys), 6)], epsg


def catalog_center(catalog: str) -> tuple[float, float]:
    """Centre of the intersection of a static catalog's collection extents."""
    import pystac

    from pipeline.stac import open_source

    src = open_source(catalog)
    if not hasattr(src, "root"):
        raise SystemExit("--center LON LAT is needed for a STAC API")
    boxes = [c.extent.spatial.bboxes[0] for c in src.root.get_all_collections() if isinstance(c, pystac.Collection)]
    if not boxes:
        raise SystemExit(f"{catalog}: no collection extents; give --center LON LAT")
    x0, y0 = max(b[0] for b in boxes), max(b[1] for b in boxes)
    x1, y1 = min(b[2] for b in boxes), min(b[3] for b in boxes)
    return (x0 + x1) / 2, (y0 + y1) / 2


def warm_cache(catalog: str, bbox: list[float]) -> None:
    """Read every local asset file of the AOI once, so that neither run pays for a cold page cache."""
    from pipeline.stac import search

    for it in search(catalog, bbox=bbox, datetime=f"{START}/{END}", allow_empty=True):
        for a in it.assets.values():
            p = Path(a.href[7:] if a.href.startswith("file://") else a.href)
            if p.is_file():
                with open(p, "rb") as f:
                    while f.read(1 << 22):
                        pass


# ----------------------------------------------------------------------------------------- measurements


def cube_counts(cube: Path) -> tuple[int, int, int]:
    """(done tiles, planned tiles, uncompressed bytes of every array of every done tile group)."""
    from pipeline import zarr_cube

    root = zarr_cube.open_cube(cube)
    status = root["index/status"][:]
    done = [t for t, s in zip(zarr_cube.tile_ids(root), status, strict=True) if s == zarr_cube.DONE]
    nbytes = 0
    for tid in done:
        g = root[zarr_cube.tile_group(tid)]
        nbytes += sum(a.nbytes for _, a in g.arrays())
    return len(done), len(status), nbytes


def zarr_nbytes(store: Path) -> int:
    import zarr

    root = zarr.open_group(str(store), mode="r", zarr_format=3)
    return sum(a.nbytes for _, a in root.arrays()) + sum(a.nbytes for _, g in root.groups() for _, a in g.arrays())


def run_ingest(args, catalog: str, bbox: list[float], work: Path, size: float) -> dict:
    cube = work / f"cube-{size}.zarr"
    cmd = [
        sys.executable, str(ROOT / "jobs" / "ingest.py"), "--catalog", catalog, "--bbox", *map(str, bbox),
        "--start", START, "--end", END, "--out", str(cube), "--tile-px", str(args.tile_px),
        "--halo-px", str(args.halo_px), "--hr-ratio", str(args.hr_ratio), "--ray-address", "local",
        *(["--block-tiles", str(args.block_tiles)] if args.block_tiles else []),
    ]  # fmt: skip
    env = {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(work / "ray")}
    env_drop = ("RAY_ADDRESS",)
    log = work / f"ingest-{size}.log"
    saved = {k: os.environ.pop(k) for k in env_drop if k in os.environ}
    try:
        m = measure(cmd, env, log, args.timeout)
    finally:
        os.environ.update(saved)
    text = log.read_text(errors="replace")
    hit = re.search(r"\[ingest\] (\d+) items", text)
    items = int(hit.group(1)) if hit else None
    tiles = planned = nbytes = 0
    phases = {}
    if (cube / "zarr.json").exists():
        tiles, planned, nbytes = cube_counts(cube)
        mf = cube / "manifest.json"
        if mf.exists():
            run = json.loads(mf.read_text())["this_run"]
            import pyarrow.parquet as pq  # the per-tile rows of the run (pipeline.tile_table)

            rows = pq.read_table(cube / "manifest.parquet", columns=["seconds"]).column("seconds").to_pylist()
            ts = [t for t in rows if t is not None]
            phases = {
                "run_ingest_seconds": run["seconds"],
                "startup_seconds": round(m["seconds"] - run["seconds"], 2),
                "tile_task_seconds_sum": round(sum(ts), 2),
                "tile_task_seconds_mean": round(sum(ts) / max(len(ts), 1), 2),
                "tile_task_seconds_max": round(max(ts, default=0), 2),
                "block_side": run.get("block_side"),  # tiles per block side the run read with
            }
    shutil.rmtree(cube, ignore_errors=True)
    return {"tiles": tiles, "tiles_planned": planned, "items": items, "nbytes": nbytes, **m, **phases}


def run_baseline(args, catalog: str, bbox: list[float], work: Path, size: float, tiles: int) -> dict:
    out = work / f"baseline-{size}.zarr"
    result = work / f"baseline-{size}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--baseline-worker", "--catalog", catalog,
        "--bbox", *map(str, bbox), "--hr-ratio", str(args.hr_ratio), "--out", str(out), "--result", str(result),
    ]  # fmt: skip
    m = measure(cmd, {}, work / f"baseline-{size}.log", args.timeout)
    r = json.loads(result.read_text()) if result.exists() else {}
    on_disk = zarr_nbytes(out) if (out / "zarr.json").exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    return {
        "tiles": tiles,
        "items": r.get("items"),
        "nbytes": r.get("nbytes", 0),
        "nbytes_in_store": on_disk,
        **m,
        "modalities": r.get("modalities"),
        "search_seconds": r.get("search_seconds"),
    }


def baseline_worker(args) -> int:
    """Plain library usage: search, then odc.stac.load + to_zarr per modality (no tiling, no date choice)."""
    import warnings

    import odc.stac
    import shapely.geometry

    from pipeline.grid import load_aoi, utm_epsg, utm_zone
    from pipeline.ingest import default_collections
    from pipeline.providers import ProviderError, resolve_item
    from pipeline.stac import open_source, search

    warnings.filterwarnings("ignore")  # zarr v3 consolidated-metadata notices
    t0 = time.perf_counter()
    aoi = load_aoi(bbox=args.bbox)
    src = open_source(args.catalog)
    items = search(
        src, collections=default_collections(src), intersects=shapely.geometry.mapping(aoi), datetime=f"{START}/{END}"
    )
    lon, lat = aoi.centroid.x, aoi.centroid.y
    epsg = utm_epsg(utm_zone(lon), lat < 0)
    groups: dict[str, list] = {}
    names: dict[str, list[str]] = {}
    for it in items:
        try:
            r = resolve_item(it)
        except ProviderError:
            continue
        groups.setdefault(r.modality, []).append(it)
        if r.modality not in names:
            refs = [*r.bands.values(), *r.masks.values()]
            multi = {x.asset_key for x in refs if x.band_index > 1}  # multi-band assets: odc names KEY.INDEX
            names[r.modality] = [f"{x.asset_key}.{x.band_index}" if x.asset_key in multi else x.asset_key for x in refs]
            # the demo: S2 B02..B12 + SCL; S1 vv, vh; HR image.1 image.2 image.3
    search_s = time.perf_counter() - t0
    odc.stac.configure_rio(cloud_defaults=True)
    report = {"items": len(items), "search_seconds": round(search_s, 2), "modalities": {}, "nbytes": 0}
    for modality, its in groups.items():
        t1 = time.perf_counter()
        ds = odc.stac.load(
            its,
            bands=names[modality],
            bbox=tuple(args.bbox),
            crs=f"EPSG:{epsg}",
            resolution=10.0 / args.hr_ratio if modality == "hr" else 10.0,
            groupby="solar_day",
            resampling={"*": "bilinear", "SCL": "nearest"},
            chunks={},
        )
        ds.to_zarr(str(args.out), group=modality, zarr_format=3, mode="w")
        report["modalities"][modality] = {
            "items": len(its),
            "dates": int(ds.sizes["time"]),
            "yx": [int(ds.sizes["y"]), int(ds.sizes["x"])],
            "bands": names[modality],
            "mb": round(ds.nbytes / MB, 1),
            "seconds": round(time.perf_counter() - t1, 2),
        }
        report["nbytes"] += int(ds.nbytes)
    Path(args.result).write_text(json.dumps(report))
    return 0


# ------------------------------------------------------------------------------------------------ main


def _row(bench: str, size: float, r: dict) -> dict:
    s = r["seconds"]
    mb = r["nbytes"] / MB
    row = {
        "bench": bench,
        "aoi_km": size,
        "tiles": r["tiles"],
        "items": r["items"],
        "seconds": round(s, 2),
        "tiles_per_s": round(r["tiles"] / s, 3),
        "mb": round(mb, 1),
        "mb_per_s": round(mb / s, 2),
    }
    row.update({k: v for k, v in r.items() if k not in ("tiles", "items", "seconds", "nbytes") and v is not None})
    if "nbytes_in_store" in row:
        row["mb_in_store"] = round(row.pop("nbytes_in_store") / MB, 1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", help="static catalog.json or STAC API (default: generate a demo region)")
    p.add_argument("--center", nargs=2, type=float, metavar=("LON", "LAT"), help="AOI centre (with --catalog)")
    p.add_argument("--sizes-km", nargs="+", type=float, default=[1.5, 3.0], help="AOI square sides")
    p.add_argument("--region-km", type=float, default=3.2, help="side of the generated demo region")
    p.add_argument("--tile-px", type=int, default=128)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--hr-ratio", type=int, default=8)
    p.add_argument("--block-tiles", type=int, help="passed to jobs/ingest.py (default: the job's)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bbox", nargs=4, type=float, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline_worker:
        return baseline_worker(args)

    from pipeline.grid import TileGrid, load_aoi, tiles_for_aoi

    sizes = sorted(args.sizes_km)
    work = Path(tempfile.mkdtemp(prefix="bi-"))  # short: Ray's socket paths live under it (RAY_TMPDIR)
    try:
        if args.catalog:
            catalog = args.catalog
            center = tuple(args.center) if args.center else catalog_center(catalog)
        else:
            from pipeline.demo import DemoConfig, generate, region_bbox

            cfg = DemoConfig(size_km=args.region_km, seed=0, hr_ratio=args.hr_ratio)
            catalog = str(generate(cfg, work / "region", progress=False))
            b = region_bbox(cfg)
            center = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
            if max(sizes) > args.region_km:
                print(f"warning: AOI {max(sizes)} km is larger than the region ({args.region_km} km)", file=sys.stderr)
        grid = TileGrid(args.tile_px, args.halo_px)
        bboxes = {s: aoi_bbox(center, s)[0] for s in sizes}
        warm_cache(catalog, bboxes[sizes[-1]])
        results: dict[float, dict[str, dict]] = {}
        for s in sizes:
            bbox = bboxes[s]
            n_tiles = len(tiles_for_aoi(load_aoi(bbox=bbox), grid))
            ing = _row("ingest", s, run_ingest(args, catalog, bbox, work, s))
            ing["aoi_bbox"] = bbox
            print(json.dumps(ing), flush=True)
            base = _row("baseline_odc_stac_to_zarr", s, run_baseline(args, catalog, bbox, work, s, n_tiles))
            base["aoi_bbox"] = bbox
            print(json.dumps(base), flush=True)
            results[s] = {"ingest": ing, "baseline": base}

        def ratio(a, b):
            return round(a / b, 3) if b else None

        for s in sizes:
            ing, base = results[s]["ingest"], results[s]["baseline"]
            rt, rm = ratio(ing["tiles_per_s"], base["tiles_per_s"]), ratio(ing["mb_per_s"], base["mb_per_s"])
            ok = ing["exit_code"] == 0 and base["exit_code"] == 0
            print(
                json.dumps(
                    {
                        "bench": "ingest_vs_baseline",
                        "aoi_km": s,
                        "ratio_tiles_per_s": rt,
                        "ratio_mb_per_s": rm,
                        "target": ">= 1.0",
                        "meets_target": bool(ok and rt is not None and rm is not None and rt >= 1.0 and rm >= 1.0),
                        "meets_target_tiles_per_s": bool(ok and rt is not None and rt >= 1.0),
                        "meets_target_mb_per_s": bool(ok and rm is not None and rm >= 1.0),
                        "note": NOTE,
                    }
                ),
                flush=True,
            )
        small, large = sizes[0], sizes[-1]
        peak = {str(s): results[s]["ingest"]["peak_rss_mb"] for s in sizes}
        print(
            json.dumps(
                {
                    "bench": "ingest_peak_memory_vs_aoi",
                    "peak_rss_mb": peak,
                    "peak_pss_mb": {str(s): results[s]["ingest"]["peak_pss_mb"] for s in sizes},
                    "tiles": {str(s): results[s]["ingest"]["tiles"] for s in sizes},
                    "ratio_large_vs_small": ratio(peak[str(large)], peak[str(small)]),
                    "ratio_pss_large_vs_small": ratio(
                        results[large]["ingest"]["peak_pss_mb"], results[small]["ingest"]["peak_pss_mb"]
                    ),
                    "baseline_peak_rss_mb": {str(s): results[s]["baseline"]["peak_rss_mb"] for s in sizes},
                    "baseline_ratio_large_vs_small": ratio(
                        results[large]["baseline"]["peak_rss_mb"], results[small]["baseline"]["peak_rss_mb"]
                    ),
                    "aoi_area_ratio": round((large / small) ** 2, 2),
                    "target": "ingest peak memory independent of the AOI size (ratio ~ 1.0)",
                }
            ),
            flush=True,
        )
        return 0 if all(r[k]["exit_code"] == 0 for r in results.values() for k in r) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
