"""Benchmark: ``pipeline.mosaic.mosaic_tiles`` against ``gdalbuildvrt`` + ``gdal_translate -of COG``.

Prints one JSON object per line, one per output size. The tiles are synthetic class predictions: ``--tile-px``
square uint8 GeoTIFFs (tiled 256, deflate, nodata 255) on the 10 m lattice of UTM zone 32N, as the inference
writes tile cores: 7 classes, the argmax of smooth random fields (blobs a few km across) plus pixel noise
(ragged class borders), about 1 % nodata. They are written once into ``--workdir`` (default
``/tmp/skysense-bench-mosaic``) for the largest size and reused by later runs; an output of ``S`` x ``S``
pixels mosaics the top-left ``(S / tile_px)^2`` tiles.

For each size, in this order, each in its own subprocess over the same tile list, each writing a COG with the
same creation options (``pipeline.cog.cog_options`` for uint8: deflate, predictor 2, 512 px blocks, mode
overviews, BigTIFF if safer, ``NUM_THREADS=--threads``):

- ``ours``: ``mosaic_tiles(tiles, out, num_threads=--threads)`` in a fresh Python (interpreter start and
  imports included, about 0.5 s).
- ``baseline``: ``sh -c "gdalbuildvrt -input_file_list ... && gdal_translate -of COG -co ... "`` with the
  system's GDAL command-line tools (Debian ``gdal-bin``; ``GDAL_CACHEMAX`` left at GDAL's default, 5 % of RAM).
  When they are missing the line says so (``baseline.error``) and has no ratios.
- ``baseline_same_gdal``: the system ``gdalbuildvrt``, then the VRT copied to a COG by rasterio's bundled GDAL
  (``rasterio.shutil.copy(driver="COG")``), so that the time ratio is also seen without the difference in
  GDAL versions (the CLI's GDAL is often older than rasterio's wheel).

Seconds: wall time of the subprocess; ``cpu_seconds``: its user + system CPU time (the steadier number on a
shared machine). Peak memory (``peak_rss_mb``): GNU time's ``%M`` (``/usr/bin/time``, Debian package ``time``),
the largest RSS of the command and of the children it waited for (gdalbuildvrt and gdal_translate for the
baseline). Not ``ru_maxrss`` from ``os.wait4`` of a child of this script: Linux carries the parent's own peak
RSS into a child's ``ru_maxrss`` across fork/vfork and exec, so every tool would report at least this script's
peak. Without ``/usr/bin/time`` that is what is reported (``rss_method: wait4``, an upper bound).
``pixels_equal``: the two COGs compared strip by strip after the runs (full resolution, GDAL cache capped so
that this script stays small). With ``--repeat N`` each tool runs N times,
interleaved, and the line reports the fastest run and the largest peak.
Targets: ``time_ratio`` (ours / baseline seconds) <= 1.2, and ``ours.peak_rss_mb`` flat across sizes.

At the largest size, ``parts``: the same tiles as a product in parts (``pipeline.mosaic.mosaic_parts``,
``--part-px`` default half the size: 4 part COGs and a VRT) written by ``--parts-workers`` Ray tasks at once
(default 2), against ``ours`` (one COG, one process): ``speedup_vs_one_cog`` over the wall time (Ray's start-up
included), ``speedup_mosaic_only`` without it, and ``pixels_equal_one_cog`` (the VRT read as one raster). Its
``peak_rss_mb`` is the driver's only (Ray's workers are not its waited-for children).

    python bench/mosaic.py [--sizes 10000 20000 40000] [--tile-px 1000] [--workdir DIR] [--threads 1]
                           [--repeat 1] [--parts-workers 2] [--part-px SIZE/2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from affine import Affine  # noqa: E402

from pipeline.cog import cog_options  # noqa: E402

EPSG = 32632
COL0, ROW0 = 40, 530  # tile lattice origin: easting 400 km, northing 5300 km (~47.8 N, 7.7 E) at 1000 px tiles
N_CLASSES = 7
CLASS_NAMES = ["water", "forest", "grass", "crop", "built", "bare", "wetland"]
SEED = 0


# ------------------------------------------------------------------------------------------------- tiles


def _fields(rng: np.random.Generator, tile_px: int):
    """Per class three separable sinusoid products with periods of 0.3-4 km (10 m pixels): smooth blobs."""
    lo, hi = 2 * np.pi / 400, 2 * np.pi / 30
    shape = (N_CLASSES, 3)
    return dict(
        a=rng.uniform(lo, hi, shape),
        b=rng.uniform(lo, hi, shape),
        p=rng.uniform(0, 2 * np.pi, shape),
        q=rng.uniform(0, 2 * np.pi, shape),
        noise=(rng.standard_normal((N_CLASSES, tile_px, tile_px)) * 0.35).astype(np.float32),
    )


def _tile_classes(f: dict, i: int, j: int, tile_px: int) -> np.ndarray:
    """uint8 classes of the tile in row ``i``, column ``j`` (from the top-left) of the benchmark lattice."""
    # Global pixel coordinates in units of 100 m, so the fields continue across tile borders.
    x = (j * tile_px + np.arange(tile_px, dtype=np.float32)) / 10
    y = (i * tile_px + np.arange(tile_px, dtype=np.float32)) / 10
    v = np.zeros((N_CLASSES, tile_px, tile_px), np.float32)
    for k in range(N_CLASSES):
        for m in range(3):
            v[k] += np.outer(np.sin(f["b"][k, m] * y + f["q"][k, m]), np.sin(f["a"][k, m] * x + f["p"][k, m]))
    v += np.roll(f["noise"], (i * 37 + j * 11) % tile_px, axis=2)  # ragged borders, different per tile
    cls = v.argmax(0).astype(np.uint8)
    cls[v[0] > 2.3] = 255  # a little nodata (clouds nobody could see through)
    return cls


def make_tiles(workdir: Path, n: int, tile_px: int) -> list[list[Path]]:
    """The ``n`` x ``n`` tile lattice under ``workdir/tiles_{tile_px}`` (rows from the top), written once."""
    tdir = workdir / f"tiles_{tile_px}"
    tdir.mkdir(parents=True, exist_ok=True)
    tile_m = tile_px * 10.0
    f = None
    grid: list[list[Path]] = []
    t0 = time.perf_counter()
    made = 0
    for i in range(n):
        row: list[Path] = []
        for j in range(n):
            col, trow = COL0 + j, ROW0 + n - 1 - i
            path = tdir / f"32N_{col:04d}_{trow:04d}.tif"
            row.append(path)
            if path.exists():
                continue
            f = f or _fields(np.random.default_rng(SEED), tile_px)
            tr = Affine(10.0, 0.0, col * tile_m, 0.0, -10.0, (trow + 1) * tile_m)
            tmp = path.with_suffix(".tmp")
            with rasterio.open(
                tmp,
                "w",
                driver="GTiff",
                width=tile_px,
                height=tile_px,
                count=1,
                dtype="uint8",
                crs=f"EPSG:{EPSG}",
                transform=tr,
                nodata=255,
                tiled=True,
                blockxsize=256,
                blockysize=256,
                compress="deflate",
            ) as dst:
                dst.write(_tile_classes(f, i, j, tile_px), 1)
            os.replace(tmp, path)
            made += 1
        grid.append(row)
    if made:
        print(f"wrote {made} tiles in {time.perf_counter() - t0:.0f} s to {tdir}", file=sys.stderr, flush=True)
    return grid


# ------------------------------------------------------------------------------------------ measurement


GNU_TIME = Path("/usr/bin/time")


def measure(cmd: list[str], log: Path, timeout: float) -> dict:
    """Wall and CPU seconds and peak RSS (MB) of ``cmd`` and the children it waited for."""
    rss_file = log.with_suffix(".maxrss")
    rss_file.unlink(missing_ok=True)
    if GNU_TIME.exists():
        cmd = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *cmd]
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        rss_kb, method = int(rss_file.read_text().split()[-1]), "gnu_time"
    except (OSError, ValueError, IndexError):
        rss_kb, method = ru.ru_maxrss, "wait4"  # KB on Linux; includes this script's peak (see the docstring)
    out = dict(
        seconds=round(seconds, 2),
        cpu_seconds=round(ru.ru_utime + ru.ru_stime, 2),
        peak_rss_mb=round(rss_kb / 1024, 1),
        rss_method=method,
        rc=proc.returncode,
    )
    if proc.returncode != 0:
        out["error"] = log.read_text()[-2000:]
    return out


def co_args(threads: str) -> list[str]:
    """The mosaic's COG creation options as ``gdal_translate -co`` arguments."""
    opts = cog_options("uint8", blocksize=512, overview_resampling="mode", num_threads=threads)
    return [a for k, v in opts.items() for a in ("-co", f"{k.upper()}={str(v).upper()}")]


def run_ours(list_file: Path, out: Path, threads: str, log: Path, timeout: float) -> dict:
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from pipeline.mosaic import mosaic_tiles;"
        "tiles = Path(sys.argv[2]).read_text().split();"
        "mosaic_tiles(tiles, sys.argv[3], overwrite=True, num_threads=sys.argv[4], class_names=sys.argv[5:],"
        " progress=print)"
    )
    return measure(
        [sys.executable, "-c", code, str(ROOT), str(list_file), str(out), threads, *CLASS_NAMES], log, timeout
    )


def run_baseline(list_file: Path, vrt: Path, out: Path, threads: str, log: Path, timeout: float) -> dict:
    sh = (
        f"gdalbuildvrt -q -overwrite -input_file_list '{list_file}' '{vrt}' && "
        f"gdal_translate -q -of COG {' '.join(co_args(threads))} '{vrt}' '{out}'"
    )
    out.unlink(missing_ok=True)
    return measure(["sh", "-c", sh], log, timeout)


def run_same_gdal(list_file: Path, vrt: Path, out: Path, threads: str, log: Path, timeout: float) -> dict:
    opts = cog_options("uint8", blocksize=512, overview_resampling="mode", num_threads=threads)
    code = (
        "import sys, json, subprocess, rasterio.shutil;"
        "subprocess.run(['gdalbuildvrt', '-q', '-overwrite', '-input_file_list', sys.argv[1], sys.argv[2]],"
        " check=True);"
        "rasterio.shutil.copy(sys.argv[2], sys.argv[3], driver='COG', **json.loads(sys.argv[4]))"
    )
    out.unlink(missing_ok=True)
    return measure([sys.executable, "-c", code, str(list_file), str(vrt), str(out), json.dumps(opts)], log, timeout)


def run_parts(list_file: Path, vrt: Path, part_px: int, workers: int, threads: str, log: Path,
              timeout: float) -> dict:
    """``mosaic_parts`` (the product past ``part_px``: part COGs + a VRT) with its parts as Ray tasks on a local
    Ray of ``workers`` CPUs, one CPU per task, as ``pipeline.inference`` runs them. The child prints its own split
    of the wall time: Ray's start-up and the mosaic."""
    code = (
        "import sys, json, time, os; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "os.environ.setdefault('RAY_AUTH_MODE', 'disabled');"
        "t = time.perf_counter(); import ray; ray.init(num_cpus=int(sys.argv[5]), include_dashboard=False,"
        " log_to_driver=False); t_ray = time.perf_counter() - t;"
        "from pipeline.mosaic import mosaic_parts;"
        "task = ray.remote(num_cpus=1, max_retries=0);"
        "run = lambda fn, args: ray.get([task(fn).remote(a) for a in args]);"
        "tiles = Path(sys.argv[2]).read_text().split(); t = time.perf_counter();"
        "vrt, parts = mosaic_parts(tiles, sys.argv[3], int(sys.argv[4]), map_fn=run, overwrite=True,"
        " num_threads=sys.argv[6], class_names=sys.argv[7:]);"
        "print(json.dumps({'ray_start_s': round(t_ray, 2), 'mosaic_s': round(time.perf_counter() - t, 2),"
        " 'parts': len(parts)}), flush=True); ray.shutdown()"
    )
    r = measure([sys.executable, "-c", code, str(ROOT), str(list_file), str(vrt), str(part_px), str(workers), threads,
                 *CLASS_NAMES], log, timeout)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    if r.get("rc") == 0 and lines:
        r.update(json.loads(lines[-1]))
    return r


def pixels_equal(a: Path, b: Path, rows: int = 1024) -> bool:
    """Full-resolution equality of two rasters, a strip of ``rows`` rows at a time (flat memory)."""
    from rasterio.windows import Window

    with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(a) as ra, rasterio.open(b) as rb:
        if (ra.shape, ra.transform, ra.crs, ra.count) != (rb.shape, rb.transform, rb.crs, rb.count):
            return False
        for r0 in range(0, ra.height, rows):
            w = Window(0, r0, ra.width, min(rows, ra.height - r0))
            if not np.array_equal(ra.read(window=w), rb.read(window=w)):
                return False
    return True


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _best(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("rc") == 0]
    if not ok:
        return runs[-1]
    best = dict(min(ok, key=lambda r: r["seconds"]))
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    if len(runs) > 1:
        best["all_seconds"] = [r["seconds"] for r in runs]
    return best


def _gdal_cli_version() -> str | None:
    try:
        return subprocess.run(["gdalinfo", "--version"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[10000, 20000, 40000], help="output sides in pixels")
    p.add_argument("--tile-px", type=int, default=1000, help="tile side in pixels (divides every size)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/skysense-bench-mosaic"), help="tiles are kept here")
    p.add_argument("--threads", default="1", help="GDAL NUM_THREADS for both (a count or ALL_CPUS)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each tool per size, interleaved")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--keep", action="store_true", help="keep the output COGs")
    p.add_argument("--parts-workers", type=int, default=2,
                   help="at the largest size, also the product as COG parts written by this many Ray workers")
    p.add_argument("--part-px", type=int, default=None, help="part side for --parts-workers (default: half the size)")
    args = p.parse_args(argv)
    for s in args.sizes:
        if s % args.tile_px:
            p.error(f"size {s} is not a multiple of --tile-px {args.tile_px}")
    n_max = max(args.sizes) // args.tile_px
    args.workdir.mkdir(parents=True, exist_ok=True)
    grid = make_tiles(args.workdir, n_max, args.tile_px)
    missing = [t for t in ("gdalbuildvrt", "gdal_translate") if shutil.which(t) is None]
    if missing:
        print(
            f"baseline tool(s) missing: {', '.join(missing)} (apt-get install gdal-bin): no baseline, no ratios",
            file=sys.stderr,
        )
    runs = args.workdir / "runs"
    runs.mkdir(exist_ok=True)
    env = dict(
        gdal_cli=_gdal_cli_version(), gdal_rasterio=rasterio.__gdal_version__, cpus=os.cpu_count(), threads=args.threads
    )
    for s in args.sizes:
        n = s // args.tile_px
        list_file = runs / f"tiles_{s}.txt"
        list_file.write_text("\n".join(str(t) for row in grid[:n] for t in row[:n]) + "\n")
        ours_tif, base_tif, same_tif, vrt = (runs / f"{k}_{s}.tif" for k in ("ours", "baseline", "same", "vrt"))
        vrt = vrt.with_suffix(".vrt")
        load = os.getloadavg()[0]
        res: dict[str, list[dict]] = {"ours": [], "baseline": [], "baseline_same_gdal": []}
        for _ in range(args.repeat):
            if not missing:
                res["baseline"].append(
                    run_baseline(list_file, vrt, base_tif, args.threads, runs / "baseline.log", args.timeout)
                )
            res["ours"].append(run_ours(list_file, ours_tif, args.threads, runs / "ours.log", args.timeout))
            if not missing:
                res["baseline_same_gdal"].append(
                    run_same_gdal(list_file, vrt, same_tif, args.threads, runs / "same.log", args.timeout)
                )
        ours = _best(res["ours"])
        ours["bytes"] = ours_tif.stat().st_size if ours_tif.exists() else None
        row = dict(bench="mosaic", size_px=s, pixels=s * s, tiles=n * n, tile_px=args.tile_px, ours=ours)
        if missing:
            row["baseline"] = {"error": f"missing {', '.join(missing)} (apt-get install gdal-bin)"}
        else:
            base, same = _best(res["baseline"]), _best(res["baseline_same_gdal"])
            base["bytes"] = base_tif.stat().st_size if base_tif.exists() else None
            row.update(
                baseline=base,
                baseline_same_gdal=same,
                time_ratio=_ratio(ours["seconds"], base["seconds"]),
                cpu_ratio=_ratio(ours["cpu_seconds"], base["cpu_seconds"]),
                rss_ratio=_ratio(ours["peak_rss_mb"], base["peak_rss_mb"]),
                time_ratio_same_gdal=_ratio(ours["seconds"], same["seconds"]),
                cpu_ratio_same_gdal=_ratio(ours["cpu_seconds"], same["cpu_seconds"]),
                pixels_equal=pixels_equal(ours_tif, base_tif) if ours_tif.exists() and base_tif.exists() else None,
            )
        parts_vrt = runs / f"parts_{s}.vrt"
        if args.parts_workers and s == max(args.sizes):
            part_px = args.part_px or s // 2
            parts = run_parts(list_file, parts_vrt, part_px, args.parts_workers, args.threads, runs / "parts.log",
                              args.timeout)
            row["parts"] = {**parts, "workers": args.parts_workers, "part_px": part_px,
                            "speedup_vs_one_cog": _ratio(ours["seconds"], parts.get("seconds")),
                            "speedup_mosaic_only": _ratio(ours["seconds"], parts.get("mosaic_s")),
                            "pixels_equal_one_cog": pixels_equal(parts_vrt, ours_tif)
                            if parts_vrt.exists() and ours_tif.exists() else None}
        row.update(load_avg_1min_at_start=round(load, 2), **env)
        print(json.dumps(row), flush=True)
        if not args.keep:
            for f in (ours_tif, base_tif, same_tif, vrt, parts_vrt):
                f.unlink(missing_ok=True)
            shutil.rmtree(parts_vrt.with_suffix(".parts"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
