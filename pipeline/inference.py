"""Inference over the cube on Ray: sliding windows blended per tile, per-tile GeoTIFFs with a manifest, then one
COG (``pipeline.mosaic``), a quicklook PNG and a STAC item (``pipeline.product_item``).

    result = run_inference(InferenceConfig(cube="out/demo/cube.zarr", checkpoint="runs/probe",
                                           task="landcover", out="out/landcover.tif"))

Tasks (``checkpoint`` is a fine-tune run directory or its ``head.safetensors``, which names its encoder, or, for
``fewshot`` and ``embeddings``, an encoder checkpoint itself):

* ``landcover``: F_fus -> the fine-tuned head (``pipeline.finetune``) -> class logits; uint8 class map.
* ``fewshot``: SkySense++ in-context segmentation (``skysense_core.semantic.few_shot_segment``, the k support
  windows stacked above each query window) -> class probabilities; uint8 class map. Support: k labelled tiles
  (:func:`parse_support`); of each, the window with the most labelled pixels.
* ``embeddings``: F_fus itself (B, 2D, h, w), float32 bands, nodata NaN.

The data path (driver = :func:`run_inference`)::

    read_cube(tiles=todo, window=None)   with --gpu: one row per tile sample WITH its halo, fractional CPUs, one
                                         tile per task, four read tasks per GPU actor at once; on CPU the tile ids
                                         only, and the actor reads each tile itself (:func:`reads_in_actor`)
      -> map_batches(TilePredictor)      actor pool (ActorPoolStrategy(min_size=1, max_size=N)); 1 GPU per actor
                                         when --gpu (bf16 autocast on CUDA only); the model is loaded once per actor;
                                         it writes each tile core as a GeoTIFF in the tile's UTM CRS (temp file +
                                         os.replace: ``write_tile_outputs``) and returns one small status row per tile
      -> the driver iterates the status rows and appends them to the manifest log as they arrive

Windows (``PredictorSpec.windows``): they cover the tile core plus ``margin`` px of context on each side (within
the halo), ``window`` px every ``window - overlap`` px, the last row and column cut short at the span's end, so
no pixel is computed that is not needed: by default one window per tile on CPU for ``tiny``. HR windows are
``hr_ratio`` times larger. Windows of the same shape are batched across the tiles of a call. Logits
(probabilities for few-shot, features for embeddings) are accumulated with a 2-D Hann weight evaluated at
half-pixel offsets, so it is never 0; only the core is written. Pixels where no modality has a usable pixel on
any valid date (the model's own keep rule, HR pooled to the grid at half its pixels) are nodata. Normalisation
happens inside the model (``skysense_core.inputs.normalise``).

Why the writing happens in the actor, and not in a map stage or a ``ray.data.Datasink``: a Datasink reports to
the driver only at the end of the write (``on_write_complete``), and the manifest must grow tile by tile so that
a stopped job resumes where it stopped; a separate map stage costs a worker process and a transfer of every
prediction for a few milliseconds of work per tile. Why the pipeline needs care on small machines: see
``pipeline.ingest.LOCAL_RAY_SYSTEM_CONFIG`` (workers kept alive) and :func:`reader_concurrency`.

Per-tile directory ``<work_dir>/<name>/`` (default ``<out dir>/<out stem>.tiles/``)::

    tiles/<tile_id>.tif    the tile core (tile_px x tile_px at 10 m), uint8 nodata 255 + colour table; or the
                           embedding field's int8 unit vectors, nodata -128; or float32 bands nodata NaN (written
                           atomically)
    tiles/<tile_id>.confidence.tif   class maps: the top class's probability, uint8 percent, nodata 255 (written
                           before the class map)
    manifest.parquet       one row per tile (``pipeline.tile_table``): tile, status ("done" | "failed"), file,
                           seconds, worker | reason; written atomically at the end of every run
    manifest.json          {"format", "fingerprint", "counts": {"done", "failed"}, "tiles_table":
                           "manifest.parquet", "runs": [...]}: small, whatever the tile count; written atomically
                           after the table
    manifest.log.jsonl     records appended by the driver as tiles finish (a killed driver loses none that
                           were written to it); folded into the table at the end of every run
    pids/actor-<pid>.pid   test hook (``write_pids``)

A re-run with the same fingerprint (task, encoder and head sha256, support, window, overlap, margin, cube,
precision, tile_format: what a tile file holds) skips every tile recorded done whose file exists; a different
fingerprint starts the records over. A tile that fails (unreadable, missing from the cube, an exception in the
model) is recorded with its reason and does not stop the others; the mosaic is made when every tile is done, or
with ``allow_partial``.

Why read failures are dropped blocks (``DataContext.max_errored_blocks``) and not rows: the
datasource raises on a tile it cannot read; with one tile per read task that loses only that tile, and the
driver re-reads the tiles that never arrived to record why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import storage, zarr_cube
from pipeline.datasource import (
    CubeDatasource,
    quiet_data_context,
    rows_to_input,
    until,
    window_origins,
)
from pipeline.embedding_field import EMBEDDING_DIMS
from pipeline.grid import parse_tile_id, utm_epsg, utm_zone
from pipeline.jsonfiles import read_json
from pipeline.labels import CONFIDENCE_NODATA, NODATA
from pipeline.tile_table import read_records, write_records

if TYPE_CHECKING:  # pipeline.finetune imports torch: the read and write workers never need it
    from pipeline.finetune import HeadInfo

TASKS = ("landcover", "fewshot", "embeddings")
MANIFEST = "manifest.json"
MANIFEST_TABLE = "manifest.parquet"
TILE_FILE = "tiles/{tile_id}.tif"  # a tile's prediction, relative to the tile directory
CONFIDENCE_FILE = "tiles/{tile_id}.confidence.tif"  # a class map tile's confidence band (uint8 percent)
MANIFEST_LOG = "manifest.log.jsonl"
MANIFEST_FORMAT = "skysense-inference-manifest/2"  # /1 kept the tile records inside manifest.json (still read)
DEFAULT_WINDOW = 32  # few-shot, and presets not in PRESET_WINDOW
# [ours] The default (largest) window per preset, S2 px: a whole tile with its margin for tiny on a laptop; for
# the HR-ratio-32 presets 64 px = 2048 HR px (base, small) and 32 px = 1024 HR px (huge, the official few-shot
# pair's height) keep one window's activations within a few GiB in bf16. With the bounded global attention the
# cost per pixel hardly depends on the window, so the largest that fits memory wastes the least on overlaps.
PRESET_WINDOW = {"tiny": 256, "small": 64, "base": 64, "huge": 32}
QUICKLOOK_PX = 1024  # the quicklook's longest side (pipeline.mosaic.quicklook_png's default)
DEFAULT_PART_PX = 32768  # [ours] side of the largest single-COG product: 1 GiB of uint8, 328 km at 10 m
DEFAULT_OVERLAP = 4  # [ours] S2 px shared by neighbouring windows inside a tile, blended with the Hann weight
# [ours] S2 px of context predicted around the tile core (within the halo) and then dropped: a core pixel at the
# tile edge sees this much of the neighbouring tile, so both sides of a tile border are predicted alike.
DEFAULT_MARGIN = 8

__all__ = [
    "InferenceConfig", "InferencePlan", "InferenceResult", "Manifest", "PredictorSpec", "SupportEntry",
    "SupportSet", "TASKS", "TilePredictor", "hann_window", "parse_support", "plan_inference", "read_tiles_local",
    "run_inference", "valid_pixels", "window_plan", "window_spans", "write_tile_outputs",
]


# ------------------------------------------------------------------------------------------------------------------
# windows and blending
# ------------------------------------------------------------------------------------------------------------------
def window_plan(size: int, window: int, overlap: int) -> list[int]:
    """Window origins along one axis of a tile sample of ``size`` px: ``window`` px every ``window - overlap``
    px, the last one anchored to the edge (``pipeline.datasource.window_origins``). Few-shot support windows
    are picked from this plan."""
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got overlap {overlap} for window {window}")
    return window_origins(size, window, window - overlap)


def window_spans(start: int, end: int, window: int, overlap: int, *, fixed: bool = False,
                 size: int | None = None, multiple: int = 4) -> list[tuple[int, int]]:
    """(origin, length) of the windows along one axis that cover ``[start, end)``: ``window`` px every
    ``window - overlap`` px from ``start``. The last window is cut short at ``end`` (its length rounded up to
    ``multiple``, the model's patch, by moving its origin back), so no pixel outside the span is computed; one
    window covers a span no longer than ``window``. ``fixed``: every window is exactly ``window`` px (few-shot,
    whose support windows have that size): the last is anchored to ``end``, and a span shorter than ``window``
    gets one window centred on it and kept inside ``[0, size)``."""
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got overlap {overlap} for window {window}")
    if end <= start:
        raise ValueError(f"empty span [{start}, {end})")
    size = end if size is None else size

    def rounded(n: int) -> int:
        return -(-n // multiple) * multiple

    if fixed:
        if window > size:
            raise ValueError(f"window {window} is larger than the tile sample ({size} px)")
        if end - start <= window:
            o = min(max(start - (window - (end - start)) // 2, 0), size - window)
            return [(o, window)]
        return [(start + o, window) for o in window_origins(end - start, window, window - overlap)]
    spans, o = [], start
    while True:
        if end - o <= window:
            n = min(rounded(end - o), size)
            spans.append((min(o, size - n), n))
            return spans
        spans.append((o, window))
        o += window - overlap


def hann_window(n: int, m: int | None = None) -> np.ndarray:
    """(n, m) float32 blending weight (m defaults to n): the outer product of Hann windows evaluated at pixel
    centres, ``sin(pi (i + 0.5) / n) ** 2``. Smooth, largest in the middle, and never 0 (smallest
    ``sin(pi / 2n) ** 2`` at the border), so a pixel covered by one window only still gets its prediction."""
    def hann(k: int) -> np.ndarray:
        return np.sin(np.pi * (np.arange(k) + 0.5) / k) ** 2

    return np.outer(hann(n), hann(n if m is None else m)).astype(np.float32)


def valid_pixels(row: Mapping[str, np.ndarray], modalities: Sequence[str], hr_ratio: int) -> np.ndarray:
    """(S, S) bool on the S2 grid of one row (tile sample): some modality has a usable pixel there on some valid
    date. HR is pooled to the grid as the model does (``SkySense._encode_dates``): a cell is usable when at least
    half of its ``hr_ratio`` x ``hr_ratio`` pixels are. Everything else is nodata in the products."""
    out = None
    for m in modalities:
        mask = np.asarray(row[f"{m}_mask"]).astype(bool) & np.asarray(row[f"{m}_valid"]).astype(bool)[:, None, None]
        if m == "hr":
            t, h, w = mask.shape
            frac = mask.reshape(t, h // hr_ratio, hr_ratio, w // hr_ratio, hr_ratio).mean(axis=(2, 4))
            usable = (frac >= 0.5).any(0)
        else:
            usable = mask.any(0)
        out = usable if out is None else out | usable
    if out is None:
        raise ValueError("no modality to tell valid pixels from")
    return out


def window_batch(row: Mapping[str, np.ndarray], origins: Sequence[tuple[int, int]], w: int | tuple[int, int],
                 hr_ratio: int, modalities: Sequence[str]) -> dict[str, np.ndarray]:
    """The columns of the cube's row schema (``pipeline.datasource``) for windows of one tile sample row:
    (B, ...) with B = len(origins), each ``w`` S2 px square, or (height, width) (``hr_ratio`` times that in HR
    px), at (y0, x0)."""
    n = len(origins)
    wh, ww = (w, w) if isinstance(w, int) else w
    out: dict[str, np.ndarray] = {}
    for m in modalities:
        k = hr_ratio if m == "hr" else 1
        data, mask = np.asarray(row[m]), np.asarray(row[f"{m}_mask"])
        out[m] = np.stack([data[:, :, y * k:(y + wh) * k, x * k:(x + ww) * k] for y, x in origins])
        out[f"{m}_mask"] = np.stack([mask[:, y * k:(y + wh) * k, x * k:(x + ww) * k] for y, x in origins])
        for c in ("valid", "doy"):
            v = np.asarray(row[f"{m}_{c}"])
            out[f"{m}_{c}"] = np.broadcast_to(v, (n, *v.shape)).copy()
    out["lat"] = np.full(n, float(row["lat"]))
    out["lon"] = np.full(n, float(row["lon"]))
    return out


# ------------------------------------------------------------------------------------------------------------------
# few-shot support
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SupportEntry:
    """One labelled support tile: the cube holding it, its id, and the label raster (any CRS / resolution)."""

    cube: str
    tile: str
    labels: str


def parse_support(spec: str | Path, cube: str | Path, allow: Sequence[str] = ()) -> list[SupportEntry]:
    """The ``--support`` argument: a JSON file, or the JSON text itself, in one of two forms::

        {"labels": "truth/landcover_hr.tif", "tiles": ["32N_0391_3904", "32N_0392_3904"], "cube": "other.zarr"}
        [{"tile": "32N_0391_3904", "labels": "a.tif"}, {"tile": "32N_0392_3904", "labels": "b.tif", "cube": "c.zarr"}]

    ``cube`` is optional (default: the cube being predicted). Relative paths in a file are relative to the file.
    A file is input someone else may have written: the label rasters and cubes it names must lie in its own
    directory tree, or be http(s) / object-store URLs (``pipeline.hrefs``: the catalog policy, with the file's
    directory as the catalog's), unless ``allow`` (``--allow-href``) names their directory; JSON text on the
    command line is the user's own and is not policed. Raises ``ValueError`` with the reason for anything else
    (``pipeline.hrefs.HrefRefused``, a ``ValueError``, for a path outside the policy)."""
    from pipeline.hrefs import HrefPolicy

    text, base, policy = str(spec), Path.cwd(), None
    if not text.lstrip().startswith(("{", "[")):
        p = Path(text)
        if not p.is_file():
            raise ValueError(f"--support {text}: no such file (give a JSON file or JSON text)")
        text, base = p.read_text(), p.resolve().parent
        policy = HrefPolicy.for_catalog(base, allow, owner="the support file")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--support is not valid JSON: {e}") from None

    def path(v: str) -> str:
        resolved = v if "://" in v or v.startswith("/vsi") else str((base / v).resolve())
        if policy is not None:
            policy.check(resolved, what=f"--support {spec}: the path")
        return resolved

    if isinstance(doc, dict):
        if not isinstance(doc.get("tiles"), list) or not isinstance(doc.get("labels"), str):
            raise ValueError('--support {"labels": RASTER, "tiles": [TILE_ID, ...], "cube": CUBE (optional)}')
        pairs = [{"tile": t, "labels": doc["labels"], "cube": doc.get("cube")} for t in doc["tiles"]]
    elif isinstance(doc, list):
        pairs = doc
    else:
        raise ValueError("--support must be a JSON object or list")
    out = []
    for p in pairs:
        if not isinstance(p, dict) or not isinstance(p.get("tile"), str) or not isinstance(p.get("labels"), str):
            raise ValueError(f'--support entry {p!r}: expected {{"tile": TILE_ID, "labels": RASTER}}')
        out.append(SupportEntry(cube=path(p["cube"]) if p.get("cube") else str(Path(cube).resolve()),
                                tile=p["tile"], labels=path(p["labels"])))
    if not out:
        raise ValueError("--support names no tile")
    if len(set(out)) != len(out):
        raise ValueError("--support names a tile twice")
    return out


@dataclass(frozen=True)
class SupportSet:
    """The k labelled support windows few-shot inference stacks above every query window (numpy, picklable).

    rows: the cube row columns (``pipeline.datasource``) of k windows of ``window`` S2 px, (k, ...).
    labels: (k, H, W) uint8 class ids on the HR grid of the windows (H = window * hr_ratio) when HR is among the
        modalities, else on the 10 m grid (H = window); 255 = unlabelled.
    origins: (tile, y0, x0) of each window."""

    rows: dict[str, np.ndarray]
    labels: np.ndarray
    num_classes: int
    origins: tuple[tuple[str, int, int], ...]

    def digest(self) -> str:
        """A hash of the support (data and labels): part of the run fingerprint."""
        h = hashlib.sha256()
        for k in sorted(self.rows):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.rows[k]).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()


def load_support(entries: Sequence[SupportEntry], size: int, window: int, overlap: int, hr_ratio: int,
                 modalities: Sequence[str], num_classes: int) -> SupportSet:
    """Read the support tiles (in this process; tile samples of ``size`` S2 px), put their labels on the tile
    grids and keep, of each tile, the window (of the inference window plan) with the most labelled pixels."""
    rows, labels, origins = [], [], []
    starts = window_plan(size, window, overlap)
    for e in entries:
        row = next(read_tiles_local(e.cube, [e.tile], labels=e.labels, modalities=modalities))
        lab10 = row["labels_grid"][0]
        best = max(((y, x) for y in starts for x in starts),
                   key=lambda yx: int((lab10[yx[0]:yx[0] + window, yx[1]:yx[1] + window] < num_classes).sum()))
        if int((lab10[best[0]:best[0] + window, best[1]:best[1] + window] < num_classes).sum()) == 0:
            raise ValueError(f"support tile {e.tile}: {e.labels} labels no pixel of it with a class < {num_classes}")
        one = {k: v[0] for k, v in row.items()}
        rows.append(window_batch(one, [best], window, hr_ratio, modalities))
        y, x = best
        if "hr" in modalities:
            r = hr_ratio
            lab = one["labels"][y * r:(y + window) * r, x * r:(x + window) * r]
        else:
            lab = lab10[y:y + window, x:x + window]
        labels.append(np.where(lab < num_classes, lab, NODATA).astype(np.uint8))
        origins.append((e.tile, int(y), int(x)))
    cols = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    return SupportSet(rows=cols, labels=np.stack(labels), num_classes=num_classes, origins=tuple(origins))


# ------------------------------------------------------------------------------------------------------------------
# reading tiles in this process (single-process prediction, the benchmark baseline, failure diagnosis)
# ------------------------------------------------------------------------------------------------------------------
def read_tiles_local(cube: str | Path, tiles: Sequence[str], **datasource_kwargs) -> Iterator[dict[str, np.ndarray]]:
    """The cube datasource's rows read here, without Ray tasks: one numpy batch per tile (its windows, or the
    whole tile sample with ``window=None``), in the order of ``tiles``. Raises what the read raises."""
    from ray.data.block import BlockAccessor

    source = CubeDatasource(cube, tiles=list(tiles), **datasource_kwargs)
    for task in source.get_read_tasks(len(tiles)):
        for block in task():
            yield BlockAccessor.for_block(block).to_batch_format("numpy")


def _diagnose_read(cube: str, tile_id: str, modalities: Sequence[str]) -> str:
    """Why a tile never came out of the pipeline: re-read it here and report the error."""
    try:
        for _ in read_tiles_local(cube, [tile_id], modalities=modalities):
            pass
    except Exception as e:
        return f"read failed: {type(e).__name__}: {e}"
    return ("no result from the pipeline (the read or the inference actor failed on it repeatedly; the tile reads "
            "fine now: see the Ray worker logs)")


# ------------------------------------------------------------------------------------------------------------------
# the predictor
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictorSpec:
    """Everything a :class:`TilePredictor` needs (small and picklable, shipped to every actor).

    task: one of :data:`TASKS`. encoder: encoder checkpoint path; head: ``head.safetensors`` (landcover).
    window / overlap: S2 px (:meth:`windows`). batch_size: windows per forward, gathered across the tiles of a
    call (landcover, embeddings; few-shot runs one query window per forward, stacked under the support).
    size / core: tile sample side and the core's (start, length) in S2 px. margin: S2 px around the core that
    the windows cover too (context, then dropped). modalities: those read and fed to the model. gpu: CUDA + bf16
    autocast. threads: torch intra-op threads (None: leave as is). support: few-shot support. seed: few-shot
    label-id draw, reset per window so that a tile's result does not depend on what the actor did before.
    pid_dir: test hook, each actor writes ``actor-<pid>.pid`` there, and ``busy-<pid>`` while it works.
    features: the per-pixel feature stack the head reads, or the embeddings written
    (:data:`skysense_core.pixel_features.FEATURE_SETS`; landcover takes its head's). until_doy: dates after this
    day of year are not used (an as-of head, e.g. a flood on its event date: the head's own setting).
    temperature: softmax temperature of the confidence band (the head's, ``pipeline.calibration``).
    embedding_dims: embeddings written as the int8 field's unit vectors of this width
    (``pipeline.embedding_field``); None: the float32 features as computed."""

    task: str
    encoder: str
    head: str | None
    window: int
    overlap: int
    batch_size: int
    size: int
    core: tuple[int, int]
    hr_ratio: int
    modalities: tuple[str, ...]
    num_classes: int | None
    gpu: bool = False
    threads: int | None = None
    support: SupportSet | None = None
    seed: int = 0
    pid_dir: str | None = None
    margin: int = 0
    features: str = "fused"
    until_doy: int | None = None
    temperature: float = 1.0
    embedding_dims: int | None = None

    @property
    def classes(self) -> bool:
        """A class map (landcover, fewshot), written with its confidence band; else embeddings."""
        return self.task != "embeddings"

    def windows(self) -> list[tuple[int, int, int, int]]:
        """The windows (y0, x0, height, width) in S2 px of the tile sample that one tile is predicted from: they
        cover the core plus ``margin`` (within the sample) and nothing else, ``window`` px each with ``overlap`` px
        shared by neighbours, the last row and column cut short at the span's end (:func:`window_spans`).
        Few-shot windows are all ``window`` px square (the support's size)."""
        c0, n = self.core
        a, b = max(c0 - self.margin, 0), min(c0 + n + self.margin, self.size)
        spans = window_spans(a, b, self.window, self.overlap, fixed=self.task == "fewshot", size=self.size)
        return [(y, x, hy, wx) for y, hy in spans for x, wx in spans]

    def kept(self, y: int, x: int, h: int, w: int) -> tuple[slice, slice] | None:
        """The part of the window (y, x, h, w) inside the tile core, as (rows, columns) slices in window px, or
        None when all of it is (few-shot windows are never cut: the support and the query meet whole). What lies
        outside the core is context for the encoders and is never read, so the per-location stages after them
        (fusion, geo-context, per-pixel features, head) run on this part only (``SkySense.Encoded.crop``)."""
        c0, n = self.core
        ys = slice(max(c0 - y, 0), min(c0 + n - y, h))
        xs = slice(max(c0 - x, 0), min(c0 + n - x, w))
        if self.task == "fewshot" or (ys == slice(0, h) and xs == slice(0, w)):
            return None
        return ys, xs


def cube_modalities(ccfg) -> list[str]:
    """The modalities a cube holds (those with date slots), in :data:`MODALITIES` order."""
    return [m for m, t in (("hr", ccfg.t_hr), ("s2", ccfg.t_s2), ("s1", ccfg.t_s1)) if t > 0]


def default_window_plan(task: str, preset: str, grid, window: int | None = None) -> tuple[int, int, int]:
    """(window, overlap, margin) in S2 px by default: ``window`` if given, else :data:`PRESET_WINDOW` (few-shot:
    :data:`DEFAULT_WINDOW`) within the tile sample; :data:`DEFAULT_OVERLAP` where the window is wide enough;
    :data:`DEFAULT_MARGIN` within the halo."""
    if window is None:
        window = DEFAULT_WINDOW if task == "fewshot" else PRESET_WINDOW.get(preset, DEFAULT_WINDOW)
        window = min(window, grid.size_px // 4 * 4)
    return window, DEFAULT_OVERLAP if window >= 2 * DEFAULT_OVERLAP else 0, min(DEFAULT_MARGIN, grid.halo_px)


def feature_spec(cube: str | Path, encoder: str | Path, features: str = "fused", threads: int | None = None,
                 batch_size: int = 4) -> PredictorSpec:
    """The :class:`PredictorSpec` of an embeddings run of ``features`` over ``cube`` with the default window plan
    of ``encoder``'s preset (what fine-tuning caches its features with, so that training sees what inference
    computes)."""
    ccfg = zarr_cube.cube_config(zarr_cube.open_cube(str(cube)))
    mcfg, _ = encoder_config(encoder)
    mods = tuple(m for m in cube_modalities(ccfg) if m in mcfg.modalities)
    window, overlap, margin = default_window_plan("embeddings", mcfg.name, ccfg.grid)
    return PredictorSpec(task="embeddings", encoder=str(encoder), head=None, window=window, overlap=overlap,
                         batch_size=batch_size, size=ccfg.grid.size_px, core=(ccfg.grid.halo_px, ccfg.grid.tile_px),
                         hr_ratio=ccfg.hr_ratio, modalities=mods, num_classes=None,
                         threads=threads or os.cpu_count(), margin=margin, features=features)


class TilePredictor:
    """Predicts whole tile samples: sliding windows, Hann-blended, core cut out, nodata applied.

    Single process::

        p = TilePredictor(spec)
        for batch in read_tiles_local(cube, tiles, modalities=spec.modalities):
            core = p.predict({k: v[0] for k, v in batch.items()})    # (bands, tile_px, tile_px)

    As the Ray Data actor class: ``ds.map_batches(TilePredictor, fn_constructor_kwargs={"spec": spec,
    "sink": {...}}, ...)``; ``__call__`` never raises for a bad tile: it returns the tile with status ``failed``
    and the reason. With ``sink`` (the keyword arguments of :func:`write_tile_outputs` but the batch) the actor
    writes each tile's GeoTIFF itself and returns the status rows only: no write stage, no worker process for it
    and no transfer of the prediction. With ``cube``, a batch may hold only ``tile_id``: the actor reads the
    tiles itself (:func:`read_tiles_local`), between its forwards.
    """

    def __init__(self, spec: PredictorSpec, sink: Mapping[str, Any] | None = None, cube: str | None = None):
        import torch

        self.spec = spec
        self.sink = dict(sink) if sink is not None else None
        self.cube = cube
        if spec.pid_dir:
            Path(spec.pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(spec.pid_dir) / f"actor-{os.getpid()}.pid").write_text(str(os.getpid()))
        if spec.gpu and not torch.cuda.is_available():
            raise RuntimeError("gpu=True but this worker sees no CUDA device")
        self.device = torch.device("cuda" if spec.gpu else "cpu")
        from skysense_core.pixel_features import feature_dim

        cfg, _ = encoder_config(spec.encoder)
        self.feature_dim = feature_dim(spec.features, cfg, spec.modalities)
        self.projection = None
        if spec.task == "embeddings" and spec.embedding_dims:
            from pipeline.embedding_field import projection

            self.projection = projection(self.feature_dim, spec.embedding_dims)
        self._loaded = False
        self._source = None  # the cube's datasource, made by the first read (reads_in_actor)

    def _load(self) -> None:
        """Load the model, head and few-shot support, once, in the thread that predicts. Ray Data constructs the
        actor on its main thread and calls it on another; a model built (its weights initialised by OpenMP
        parallel loops) in one thread and run in another predicted 15-20 % slower on 2 cores (1.48 vs 1.23 s
        a tile, measured), a model built and run in the same thread at full speed."""
        import torch

        from pipeline.finetune import load_head
        from pipeline.malloc import keep_freed_memory
        from skysense_core.checkpoint import load_checkpoint

        if self._loaded:
            return
        keep_freed_memory()
        spec = self.spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        model, _, _ = load_checkpoint(spec.encoder)
        self.model = model.eval().to(self.device)
        self.head = None
        if spec.task == "landcover":
            head, _ = load_head(spec.head, channels=model.cfg.uper_channels)
            self.head = head.to(self.device)
        self.support_inputs, self.support_labels = [], []
        if spec.task == "fewshot":
            s = spec.support
            for i in range(len(s.labels)):
                one = {k: v[i:i + 1] for k, v in s.rows.items()}
                x, _ = rows_to_input(one, spec.modalities)
                self.support_inputs.append(x.to(self.device))
                self.support_labels.append(torch.from_numpy(s.labels[i].astype(np.int64)).to(self.device))
        self._loaded = True

    # -- what it writes -------------------------------------------------------------------------------------------
    @property
    def out_bands(self) -> int:
        """Bands of a tile as the Ray UDF returns it: class + confidence, or the embedding's width."""
        if self.spec.classes:
            return 2
        return min(self.feature_dim, self.spec.embedding_dims or self.feature_dim)

    @property
    def out_dtype(self) -> np.dtype:
        if self.spec.classes:
            return np.dtype(np.uint8)
        return np.dtype(np.int8) if self.spec.embedding_dims else np.dtype(np.float32)

    @property
    def out_fill(self) -> float:
        from pipeline.embedding_field import EMBEDDING_NODATA

        return {"u": NODATA, "i": EMBEDDING_NODATA, "f": np.nan}[self.out_dtype.kind]

    def written(self, pred: np.ndarray) -> np.ndarray:
        """A tile's prediction (:meth:`predict_rows` with confidence) as written: the embeddings quantised to the
        int8 field's unit vectors when ``embedding_dims`` is set, else as it is."""
        if self.spec.classes or not self.spec.embedding_dims:
            return pred
        from pipeline.embedding_field import quantise

        return quantise(pred, self.projection)

    def _autocast(self):
        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- tiles ----------------------------------------------------------------------------------------------------
    def predict(self, row: Mapping[str, np.ndarray]) -> np.ndarray:
        """One tile sample row (the datasource's schema, one tile, no batch axis) -> its core prediction
        (bands, n, n), n = tile_px: uint8 class ids with nodata 255, or float32 features with nodata NaN."""
        return self.predict_rows([row])[0]

    def predict_rows(self, rows: Sequence[Mapping[str, np.ndarray]], confidence: bool = False) -> list[np.ndarray]:
        """Several tile sample rows -> their core predictions (:meth:`predict`). Windows of the same shape are
        batched across the tiles (``batch_size`` per forward); each window's values are accumulated with a Hann
        weight, then divided by the accumulated weight. ``confidence`` (class maps): a second band, the top
        class's probability in percent (uint8 0..100, 255 nodata; landcover: softmax of the blended logits at
        the head's temperature, ``pipeline.calibration``; few-shot: its blended class probability, not
        calibrated)."""
        import torch

        self._load()
        s = self.spec
        if s.until_doy is not None:
            rows = [until(r, s.until_doy) for r in rows]
        plan = s.windows()
        c0, n = s.core
        wsum = np.zeros((s.size, s.size), np.float32)
        for y, x, h, w in plan:
            wsum[y:y + h, x:x + w] += hann_window(h, w)
        by_shape: dict[tuple, list[tuple[int, int, int]]] = {}  # windows of one shape and kept part batch together
        for r in range(len(rows)):
            for y, x, h, w in plan:
                kept = s.kept(y, x, h, w)
                key = (h, w, None if kept is None else (kept[0].start, kept[0].stop, kept[1].start, kept[1].stop))
                by_shape.setdefault(key, []).append((r, y, x))
        acc: list[Any] = [None] * len(rows)
        step = 1 if s.task == "fewshot" else s.batch_size
        with torch.inference_mode():
            for (h, w, cut), items in by_shape.items():
                kept = None if cut is None else (slice(cut[0], cut[1]), slice(cut[2], cut[3]))
                ky, kx = kept or (slice(0, h), slice(0, w))
                weight = torch.from_numpy(hann_window(h, w)[ky, kx]).to(self.device)
                for i in range(0, len(items), step):
                    part = items[i:i + step]
                    cols = [window_batch(rows[r], [(y, x)], (h, w), s.hr_ratio, s.modalities) for r, y, x in part]
                    batch = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
                    x_in, _ = rows_to_input(batch, s.modalities)
                    vals = self._window_values(x_in.to(self.device), kept)  # (B, C, kept h, kept w) float32
                    for (r, y, x0), v in zip(part, vals, strict=True):
                        if acc[r] is None:
                            acc[r] = torch.zeros((v.shape[0], s.size, s.size), dtype=torch.float32, device=self.device)
                        acc[r][:, y + ky.start:y + ky.stop, x0 + kx.start:x0 + kx.stop] += v * weight
        norm = torch.from_numpy(wsum[c0:c0 + n, c0:c0 + n]).to(self.device)
        out = []
        for r, row in enumerate(rows):
            blended = (acc[r][:, c0:c0 + n, c0:c0 + n] / norm).cpu().numpy()
            valid = valid_pixels(row, s.modalities, s.hr_ratio)[c0:c0 + n, c0:c0 + n]
            if s.task == "embeddings":
                blended = blended.astype(np.float32)
                blended[:, ~valid] = np.nan
                out.append(blended)
            else:
                cls = blended.argmax(0).astype(np.uint8)
                cls[~valid] = NODATA
                if not confidence:
                    out.append(cls[None])
                    continue
                from pipeline.calibration import confidence_percent

                if s.task == "fewshot":  # blended probabilities already
                    conf = np.rint(np.clip(blended.max(0), 0, 1) * 100).astype(np.uint8)
                else:
                    conf = confidence_percent(torch.from_numpy(blended), s.temperature).numpy()
                conf[~valid] = CONFIDENCE_NODATA
                out.append(np.stack([cls, conf]))
        return out

    def _window_values(self, x, kept: tuple[slice, slice] | None = None) -> Any:
        """(B, C, h, w) float32 for a batch of windows: class logits (landcover), class probabilities (fewshot),
        or the features (embeddings); with ``kept`` (:meth:`PredictorSpec.kept`) for that part of the windows
        only: the encoders see the whole window, the per-location stages after them the kept part."""
        import torch
        import torch.nn.functional as F

        from skysense_core.pixel_features import pixel_features
        from skysense_core.semantic import few_shot_segment

        self._load()
        s = self.spec
        with self._autocast():
            if s.task == "fewshot":
                g = torch.Generator().manual_seed(s.seed)  # the same label-id draw for every window
                _, probs = few_shot_segment(self.model, self.support_inputs, self.support_labels, x,
                                            s.support.num_classes, generator=g, mode="stack")
                probs = probs.float()[None]
                if probs.shape[-1] != x.grid_size(s.hr_ratio)[1]:  # HR-resolution probabilities -> the 10 m grid
                    probs = F.avg_pool2d(probs, s.hr_ratio)
                return probs
            enc = self.model.encode(x)
            if kept is not None:
                enc, x = enc.crop(*kept), x.crop(*kept, s.hr_ratio)
            out = self.model.fuse(enc, x)
            if s.task == "embeddings":
                return pixel_features(s.features, out, x, s.hr_ratio)
            parts = pixel_features(s.features, out, x, s.hr_ratio, parts=True)
            if hasattr(self.head, "forward_parts"):
                return self.head.forward_parts(parts).float()
            return self.head(torch.cat(parts, 1)).float()

    def _read(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The tile sample rows of ``ids`` read from ``self.cube`` here, as a batch; a tile that cannot be read is
        a row of zeros with its error in ``read_error`` (the predictor fails it alone)."""
        rows, errors = [], []
        for t in ids:
            try:
                if self._source is None:  # the cube's index read once per actor, not once per tile
                    self._source = CubeDatasource(self.cube, modalities=self.spec.modalities)
                row = self._source.read_tile(t)
                if row is None:  # pragma: no cover (min_valid is 0 here: every window is kept)
                    raise ValueError("no window of the tile was kept")
                rows.append(row)
                errors.append("")
            except Exception as e:
                rows.append(None)
                errors.append(f"{type(e).__name__}: {e}")
        ref = next((r for r in rows if r is not None), None)
        if ref is None:
            return {"tile_id": np.asarray(ids), "read_error": np.asarray(errors)}
        rows = [r if r is not None else {k: np.zeros_like(v) for k, v in ref.items()} for r in rows]
        out = {k: np.concatenate([r[k] for r in rows]) for k in ref}
        out["tile_id"], out["read_error"] = np.asarray(ids), np.asarray(errors)
        return out

    # -- the Ray Data UDF -----------------------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of tile rows -> one row per tile: ``tile_id``, ``status`` (``done`` / ``failed``), ``reason``,
        ``seconds``, ``worker`` (pid), ``pred`` (bands, n, n) (all nodata for a failed tile) and ``finished``
        (Unix time; with a sink, after its writes)."""
        n = self.spec.core[1]
        ids = [str(t) for t in batch["tile_id"]]
        if self.cube is not None and not any(m in batch for m in self.spec.modalities):
            batch = self._read(ids)
        out: dict[str, list] = {"tile_id": [], "status": [], "reason": [], "seconds": [], "worker": [], "pred": []}
        errors = batch.get("read_error")
        busy = Path(self.spec.pid_dir) / f"busy-{os.getpid()}" if self.spec.pid_dir else None
        if busy is not None:  # test hook: this actor is inside a task (a kill now interrupts a tile)
            busy.write_text(" ".join(ids))
        t0 = time.perf_counter()
        preds: dict[int, np.ndarray] = {}
        reasons: dict[int, str] = {}
        readable = []
        for i in range(len(ids)):
            if errors is not None and str(errors[i]):
                reasons[i] = f"read failed: {errors[i]}"
            else:
                readable.append(i)
        try:  # the tiles' windows batched together ...
            rows = [{k: v[i] for k, v in batch.items()} for i in readable]
            preds.update(zip(readable, map(self.written, self.predict_rows(rows, confidence=self.spec.classes)),
                             strict=True))
        except Exception:  # ... and if that fails, one by one: one bad tile must not take its neighbours down
            for i in readable:
                try:
                    row = {k: v[i] for k, v in batch.items()}
                    preds[i] = self.written(self.predict_rows([row], confidence=self.spec.classes)[0])
                except Exception as e:
                    reasons[i] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        seconds = (time.perf_counter() - t0) / max(len(ids), 1)
        fill = self.out_fill
        for i, tile_id in enumerate(ids):
            out["tile_id"].append(tile_id)
            out["status"].append("done" if i in preds else "failed")
            out["reason"].append(reasons.get(i, ""))
            out["seconds"].append(seconds)
            out["worker"].append(os.getpid())
            out["pred"].append(preds.get(i, np.full((self.out_bands, n, n), fill, self.out_dtype)))
        if busy is not None:
            busy.unlink(missing_ok=True)
        rows = {"tile_id": np.array(out["tile_id"]), "status": np.array(out["status"]),
                "reason": np.array(out["reason"]), "seconds": np.array(out["seconds"], np.float64),
                "worker": np.array(out["worker"], np.int64), "pred": np.stack(out["pred"]),
                "finished": np.full(len(ids), time.time(), np.float64)}
        return rows if self.sink is None else write_tile_outputs(rows, **self.sink)


# ------------------------------------------------------------------------------------------------------------------
# the per-tile sink
# ------------------------------------------------------------------------------------------------------------------
def tile_path(tile_dir: str | Path, tile_id: str, pattern: str = TILE_FILE) -> Path | str:
    """Where a tile's prediction (or, with ``pattern`` :data:`CONFIDENCE_FILE`, its confidence) lives: a Path,
    or a URL (str) for an ``s3://`` tile directory."""
    if storage.is_remote(tile_dir):
        return storage.join(str(tile_dir), pattern.format(tile_id=tile_id))
    return Path(tile_dir) / pattern.format(tile_id=tile_id)


def write_tile(path: str | Path, data: np.ndarray, *, epsg: int, transform, nodata, colormap=None,
               band_names: Sequence[str] | None = None, tags: Mapping[str, str] | None = None) -> Path:
    """Write one tile core (bands, n, n) as a deflate GeoTIFF, whole (``pipeline.storage.local_output``: a
    temporary name in the same directory then ``os.replace``, or one object PUT for an ``s3://`` path): a
    reader, or a re-run, never sees a partial file."""
    import rasterio
    from rasterio.crs import CRS

    bands, h, w = data.shape
    profile = dict(driver="GTiff", width=w, height=h, count=bands, dtype=data.dtype.name, crs=CRS.from_epsg(epsg),
                   transform=transform, nodata=nodata, compress="deflate",
                   predictor=3 if data.dtype.kind == "f" else 1)
    if h % 16 == 0 and w % 16 == 0 and min(h, w) >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with storage.local_output(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            if colormap:
                dst.write_colormap(1, dict(colormap))
            for i, name in enumerate(band_names or [], start=1):
                dst.set_band_description(i, name)
            if tags:
                dst.update_tags(**tags)
    return path if storage.is_remote(path) else Path(path)


def write_tile_outputs(batch: Mapping[str, np.ndarray], *, tile_dir: str, cube: str, nodata: float,
                       colormap: Mapping[int, tuple] | None = None, band_names: Sequence[str] | None = None,
                       tags: Mapping[str, str] | None = None, confidence: bool = False) -> dict[str, np.ndarray]:
    """The per-tile sink (a Ray Data map stage on fractional CPUs): writes every ``done`` row's ``pred`` as
    ``tile_dir/tiles/<tile_id>.tif`` in the tile's UTM CRS (georeference from the cube's tile attributes, the core
    offset by the halo) and returns the status rows without ``pred``: ``tile_id``, ``status``, ``reason``,
    ``seconds``, ``worker``, ``file``, ``finished`` (Unix time after the writes: when the tile was done, as the
    actor's clock says; the driver hears of it later). A failed write turns the row into ``failed`` with the
    reason.
    ``confidence``: ``pred`` is (class, confidence); the confidence goes to ``tiles/<tile_id>.confidence.tif``
    (uint8 percent, nodata 255), written before the class map so that a tile whose class map exists has both."""
    from affine import Affine

    from pipeline.labels import tile_georef

    grid = zarr_cube.cube_config(zarr_cube.open_cube(cube)).grid
    status, reason, files = list(batch["status"]), list(batch["reason"]), []
    for i, tile_id in enumerate(str(t) for t in batch["tile_id"]):
        f = ""
        if status[i] == "done":
            try:
                geo = tile_georef(cube, tile_id)
                c0 = parse_tile_id(tile_id, grid).core_slice()[0].start
                pred = np.asarray(batch["pred"][i])
                where = dict(epsg=geo.epsg, transform=geo.transform * Affine.translation(c0, c0))
                if confidence:
                    write_tile(tile_path(tile_dir, tile_id, CONFIDENCE_FILE), pred[1:2], nodata=CONFIDENCE_NODATA,
                               band_names=["confidence_percent"], tags={**(tags or {}), "tile_id": tile_id},
                               **where)
                    pred = pred[:1]
                write_tile(tile_path(tile_dir, tile_id), pred, nodata=nodata, colormap=colormap,
                           band_names=band_names, tags={**(tags or {}), "tile_id": tile_id}, **where)
                f = TILE_FILE.format(tile_id=tile_id)
            except Exception as e:
                status[i], reason[i] = "failed", f"write failed: {type(e).__name__}: {e}"
        files.append(f)
    return {"tile_id": np.asarray(batch["tile_id"]).astype(str), "status": np.array(status, dtype=str),
            "reason": np.array(reason, dtype=str), "seconds": np.asarray(batch["seconds"], np.float64),
            "worker": np.asarray(batch["worker"], np.int64), "file": np.array(files, dtype=str),
            "finished": np.full(len(files), time.time(), np.float64)}


# ------------------------------------------------------------------------------------------------------------------
# the manifest
# ------------------------------------------------------------------------------------------------------------------
class Manifest:
    """Per-tile records of a tile directory (module docstring): ``manifest.parquet`` and ``manifest.json`` plus
    the append-only log the driver writes as tiles finish. Only the driver writes it. Linear in the tile count:
    one append per tile, one table write per run.

    An ``s3://`` tile directory has no appendable file: the records are written whole (table, then JSON) every
    :attr:`FLUSH_S` seconds while tiles finish, so a killed driver loses at most that much of the record (those
    tiles are predicted again by the next run, nothing else is lost)."""

    FLUSH_S = 30.0  # [ours] object-store manifests: seconds between two writes of the records

    def __init__(self, root: str | Path, fingerprint: Mapping[str, Any], say: Callable[[str], None] = print):
        self.remote = storage.is_remote(root)
        self.root = str(root) if self.remote else Path(root)
        self.fingerprint = dict(fingerprint)
        self.tiles: dict[str, dict] = {}
        self.runs: list[dict] = []
        if not self.remote:
            self.root.mkdir(parents=True, exist_ok=True)
        doc = {}
        fix = "move it away to rebuild the records (finished tile files are predicted again)"
        if storage.exists(self.at(MANIFEST)):
            doc = read_json(self.at(MANIFEST), "the inference manifest", fix)
        logged: list[dict] = []
        old_fp = doc.get("fingerprint")
        log = None if self.remote else self.root / MANIFEST_LOG
        if log is not None and log.exists():
            for line in log.read_text().splitlines():
                try:
                    logged.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a killed driver
        if logged and old_fp is None:
            old_fp = logged[0].get("fingerprint")
        if (doc or logged) and old_fp != self.fingerprint:
            say(f"[infer] {self.root}: the earlier records were made with other settings; starting over")
            doc, logged = {}, []
            if log is not None:
                log.unlink(missing_ok=True)
        self.tiles = dict(doc.get("tiles", {}))  # format /1
        if doc.get("tiles_table"):
            self.tiles = read_records(self.at(doc["tiles_table"]), "the inference manifest's tile table",
                                      "move it and manifest.json away to rebuild the records (finished tile files "
                                      "are predicted again)")
        self.runs = list(doc.get("runs", []))
        for rec in logged:
            if "tile" in rec:
                self.tiles[rec["tile"]] = {k: v for k, v in rec.items() if k not in ("tile", "fingerprint")}
        self._log = None
        self._flushed = time.monotonic()

    def at(self, name: str) -> str | Path:
        """The location of ``name`` in the tile directory (a Path, or a URL for an object store)."""
        return storage.join(self.root, name) if self.remote else self.root / name

    def done(self) -> set[str]:
        """Tiles recorded done whose file exists (an object store: one listing of the tiles, not a request per
        tile)."""
        if self.remote:
            key = storage.object_key(self.root)
            files = {p[len(key) + 1:] for p in storage.filesystem(self.root).find(f"{key}/tiles")}
            return {t for t, r in self.tiles.items() if r.get("status") == "done" and r["file"] in files}
        return {t for t, r in self.tiles.items() if r.get("status") == "done" and (self.root / r["file"]).exists()}

    def record(self, tile_id: str, rec: Mapping[str, Any]) -> None:
        """Record a tile's outcome now (appended to the log and flushed; an object store: written with the others
        at most :attr:`FLUSH_S` s later)."""
        self.tiles[tile_id] = dict(rec)
        if self.remote:
            if time.monotonic() - self._flushed > self.FLUSH_S:
                self._write_records()
            return
        if self._log is None:
            fresh = not (self.root / MANIFEST_LOG).exists()
            self._log = open(self.root / MANIFEST_LOG, "a")
            if fresh:
                self._log.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
        self._log.write(json.dumps({"tile": tile_id, **rec}, default=str) + "\n")
        self._log.flush()

    def _write_records(self) -> str | Path:
        """``manifest.parquet`` then ``manifest.json``, each written whole."""
        write_records(self.at(MANIFEST_TABLE), self.tiles)
        doc = {"format": MANIFEST_FORMAT, "fingerprint": self.fingerprint,
               "counts": {s: sum(r.get("status") == s for r in self.tiles.values()) for s in ("done", "failed")},
               "tiles_table": MANIFEST_TABLE, "runs": self.runs}
        storage.write_bytes(self.at(MANIFEST), json.dumps(doc, indent=1, default=str).encode())
        self._flushed = time.monotonic()
        return self.at(MANIFEST)

    def write(self, run: Mapping[str, Any] | None = None) -> str | Path:
        """Fold the log into ``manifest.parquet`` and ``manifest.json`` (each written whole, the table first) and
        drop the log."""
        if run is not None:
            self.runs.append(dict(run))
        if self._log is not None:
            self._log.close()
            self._log = None
        out = self._write_records()
        if not self.remote:
            (self.root / MANIFEST_LOG).unlink(missing_ok=True)
        return out


# ------------------------------------------------------------------------------------------------------------------
# configuration and pre-flight
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class InferenceConfig:
    """One inference run (``jobs/infer.py`` flags in brackets).

    cube [--cube]; checkpoint [--checkpoint]: a fine-tune run directory / ``head.safetensors`` (landcover; it
    names its encoder), or an encoder checkpoint (fewshot, embeddings); task [--task]; out [--out]: the product
    COG (``.tif``), next to it ``<stem>.png`` (quicklook) and ``<stem>.json`` (STAC item). The cube, ``out`` and
    ``work_dir`` may be ``s3://`` URLs (``pipeline.storage``: the actors write the tiles there, the driver reads
    them through GDAL and uploads the product); support [--support]
    (fewshot, :func:`parse_support`; allow_hrefs [--allow-href]: directories or URL prefixes a support file may
    point to beyond its own directory tree); window [--window] the largest window, S2 px (default
    :data:`PRESET_WINDOW` of the encoder's preset, 32 for few-shot; at most the tile sample); overlap [--overlap]
    px shared by neighbouring windows (default :data:`DEFAULT_OVERLAP`); margin [--margin] px of context around
    the tile core that the windows cover (default :data:`DEFAULT_MARGIN`, at most the cube's halo); batch_size
    [--batch-size] windows per forward; gpu [--gpu]: one GPU per actor, bf16 autocast; crs [--crs]: mosaic CRS
    (EPSG code or any rasterio CRS string; default the UTM zone of the AOI's centre); overwrite [--overwrite]:
    replace an existing product (tiles done earlier with the same settings are reused); allow_partial
    [--allow-partial]: make the product even when tiles failed (they are nodata); name / work_dir [--name,
    --work-dir]: the per-tile directory ``work_dir/name`` (default ``<out dir>/<out stem>.tiles``); ray_address
    [--ray-address]; num_actors [--num-actors] (default: the GPUs with --gpu, else one per 8 CPUs, at least 1);
    cpus_per_actor [--cpus-per-actor] (default 1 with --gpu, else the cluster's CPUs less the read stage's
    share, split over the actors; at most the CPUs of the cluster's largest node).

    Library only: tiles (a subset of the cube's tiles; default all planned tiles), threads (torch
    threads per actor; default its CPUs, rounded), read_cpus (Ray CPUs of a read task), read_concurrency (read
    tasks at once; default :func:`reader_concurrency`), tiles_per_call (tiles an actor gets per call, their
    windows batched together; default :func:`tiles_per_call`), read_in_actor (the actors read their tiles;
    default :func:`reads_in_actor`), seed (few-shot label ids), max_tiles (test hook:
    stop after this many tiles, before the mosaic), write_pids (test hook: actors write their pids to
    ``<tile dir>/pids``), make_product (False: predict the tiles and stop; the caller mosaics them with others,
    as ``pipeline.refresh`` does); part_px [--part-px]: a product wider or taller than this (output px) is
    written as COGs of part_px x part_px on one grid, made by parallel Ray tasks, with a VRT that opens them as
    one raster and a STAC Collection of the parts (``pipeline.mosaic.mosaic_parts``); below it, one COG.

    Products. A class map (landcover, fewshot) comes with ``<stem>.confidence.tif`` (uint8 percent of the top
    class, ``pipeline.calibration``), ``<stem>.parquet`` (its polygons, GeoParquet, ``pipeline.vectors``; vectors
    [--no-vectors]; min_mapping_unit_m2 [--min-mapping-unit]: smaller patches are merged into their neighbours
    first; simplify_m [--simplify]: vertex tolerance in metres, 0 = only collinear vertices dropped, lossless)
    and ``<stem>.report.html`` (report [--no-report]). embedding_dtype [--embedding-dtype]: ``int8`` (the
    default) writes the embedding field ``<stem>.zarr`` (``pipeline.embedding_field``: 64-d unit vectors, one
    Zarr chunk per tile; ``out`` may end in ``.zarr``), plus an int8 COG when ``out`` ends in ``.tif`` or with
    embedding_cog [--embedding-cog]; ``float32``: the raw features as a float32 COG, nodata NaN."""

    cube: str
    checkpoint: str
    task: str
    out: str
    support: str | None = None
    window: int | None = None
    overlap: int | None = None
    margin: int | None = None
    batch_size: int = 4
    gpu: bool = False
    crs: str | int | None = None
    overwrite: bool = False
    allow_partial: bool = False
    name: str | None = None
    work_dir: str | None = None
    ray_address: str | None = None
    num_actors: int | None = None
    tiles: list[str] | None = None
    cpus_per_actor: float | None = None
    threads: int | None = None
    read_cpus: float = 0.25
    read_concurrency: int | None = None
    tiles_per_call: int | None = None
    read_in_actor: bool | None = None
    seed: int = 0
    max_tiles: int | None = None
    write_pids: bool = False
    make_product: bool = True
    part_px: int = DEFAULT_PART_PX
    allow_hrefs: tuple[str, ...] = ()
    embedding_dtype: str = "int8"
    embedding_cog: bool = False
    vectors: bool = True
    min_mapping_unit_m2: float = 0.0
    simplify_m: float = 0.0
    report: bool = True


@dataclass
class InferencePlan:
    """What pre-flight found out (:func:`plan_inference`); ``spec`` builds the same predictor anywhere."""

    config: InferenceConfig
    spec: PredictorSpec
    out: Path
    tile_dir: Path
    tiles: list[str]  # every tile of the run, in index order
    todo: list[str]  # the readable ones (the others are failed up front, see missing)
    missing: dict[str, str]  # tile -> why it cannot be read
    lat_lon: dict[str, tuple[float, float]]
    encoder_sha256: str
    head: HeadInfo | None
    preset: str
    class_names: dict[int, str]
    colormap: dict[int, tuple[int, int, int, int]]
    band_names: list[str] | None
    dst_crs: str | None
    fingerprint: dict[str, Any]
    search: dict[str, Any]

    @property
    def nodata(self) -> float:
        if self.spec.classes:
            return NODATA
        from pipeline.embedding_field import EMBEDDING_NODATA

        return EMBEDDING_NODATA if self.spec.embedding_dims else float("nan")

    @property
    def field(self) -> Path | None:
        """The embedding field's path (``<stem>.zarr``), None when the run writes none."""
        return self.out.with_suffix(".zarr") if self.spec.embedding_dims else None

    @property
    def cog(self) -> Path | None:
        """The product COG's path, None for a field-only embeddings run (``--out X.zarr``)."""
        if self.spec.embedding_dims and self.out.suffix == ".zarr" and not self.config.embedding_cog:
            return None
        return self.out.with_suffix(".tif")


def encoder_config(path: str | Path):
    """The ModelConfig stored in an encoder checkpoint, from its metadata only (no tensors loaded)."""
    from safetensors import safe_open

    from skysense_core.checkpoint import FORMAT
    from skysense_core.config import ModelConfig

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path} is not a safetensors checkpoint: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a SkySense checkpoint ({FORMAT}); its format is {meta.get('format')!r}")
    return ModelConfig.from_dict(json.loads(meta["config"])), meta


def resolve_checkpoint(checkpoint: str, task: str) -> tuple[str, HeadInfo | None]:
    """-> (encoder checkpoint path, head info for landcover)."""
    from pipeline.finetune import HEAD_FILE, read_head_info

    p = Path(checkpoint)
    if not p.exists():
        raise ValueError(f"checkpoint {p} does not exist")
    candidate = p / HEAD_FILE if p.is_dir() else p
    if not candidate.is_file():
        raise ValueError(f"{p} holds no {HEAD_FILE}: give a fine-tune run directory, a head or an encoder checkpoint")
    from safetensors import safe_open

    try:
        with safe_open(str(candidate), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"checkpoint {candidate} is not a safetensors file: {e}") from None
    if "head" not in meta:  # an encoder checkpoint
        if task == "landcover":
            raise ValueError(f"--task landcover needs a fine-tuned head (the output directory of jobs/finetune.py or "
                             f"its {HEAD_FILE}); {candidate} is not one")
        return str(candidate.resolve()), None
    head = read_head_info(candidate)
    if not head.encoder:
        raise ValueError(f"the head {candidate} does not name its encoder checkpoint; re-run jobs/finetune.py")
    if not Path(head.encoder).is_file():
        raise ValueError(f"the encoder checkpoint {head.encoder} that {candidate} was trained on does not exist")
    return str(Path(head.encoder).resolve()), head if task == "landcover" else None


def _object_path(url: str) -> PurePosixPath:
    """An ``s3://bucket/key`` URL as the path ``/bucket/key`` (``with_suffix``, ``parent``, ``stem`` as for a
    local product); :func:`_product_location` turns it back into a URL."""
    assert url.startswith("s3://"), url
    return PurePosixPath("/" + storage.object_key(url))


def _product_location(out: Path | PurePosixPath) -> Callable[[PurePosixPath], str | Path]:
    """For a product path from :func:`plan_inference`: the function giving the location of a path beside it (a
    local Path as it is, an object path as its ``s3://`` URL)."""
    if isinstance(out, Path):
        return lambda p: p
    return lambda p: f"s3:/{p}"


def default_product_crs(search: Mapping[str, Any]) -> str | None:
    """The UTM zone of the AOI's centre (the cube's search AOI), as 'EPSG:326xx' / 'EPSG:327xx'."""
    aoi = search.get("aoi")
    if not aoi:
        return None
    import shapely.geometry

    c = shapely.geometry.shape(aoi).centroid
    return f"EPSG:{utm_epsg(utm_zone(c.x), c.y < 0)}"


def plan_inference(cfg: InferenceConfig, say: Callable[[str], None] = print) -> InferencePlan:
    """Check everything that can be checked before any work: raises ``ValueError`` (bad settings, a checkpoint
    that does not fit the cube), ``FileExistsError`` (the product exists and not ``overwrite``) or
    ``zarr_cube.CubeError`` (no cube). Reads metadata only, plus the support tiles for few-shot."""
    from pipeline.finetune import file_sha256, label_legend

    if cfg.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, not {cfg.task!r}")
    remote = storage.is_remote(cfg.out)
    out = _object_path(storage.location(cfg.out)) if remote else Path(cfg.out).resolve()
    out_at = _product_location(out)
    if cfg.embedding_dtype not in ("int8", "float32"):
        raise ValueError(f"--embedding-dtype must be int8 or float32, got {cfg.embedding_dtype!r}")
    field = cfg.task == "embeddings" and cfg.embedding_dtype == "int8"
    if out.suffix.lower() not in ((".tif", ".tiff", ".zarr") if field else (".tif", ".tiff")):
        raise ValueError(f"--out must be a GeoTIFF path (.tif){' or an embedding field (.zarr)' if field else ''}, "
                         f"got {out_at(out)}")
    if field and remote:
        raise ValueError(f"--out {out_at(out)}: the int8 embedding field is written to a local path only; "
                         f"use --embedding-dtype float32 for an s3:// COG, or a local --out")
    if cfg.min_mapping_unit_m2 < 0:
        raise ValueError(f"--min-mapping-unit must be >= 0 m², got {cfg.min_mapping_unit_m2}")
    if cfg.simplify_m < 0:
        raise ValueError(f"--simplify must be >= 0 m, got {cfg.simplify_m}")
    for existing in ([out, out.with_suffix(".zarr")] if field else [out]):
        if storage.exists(out_at(existing)) and not cfg.overwrite:
            raise FileExistsError(f"the product {out_at(existing)} exists: pass --overwrite to replace it")
    if storage.exists(out_at(out.with_suffix(".vrt"))) and not cfg.overwrite:
        raise FileExistsError(f"the product {out_at(out.with_suffix('.vrt'))} (in parts) exists: pass --overwrite "
                              f"to replace it")
    if cfg.part_px < 16:
        raise ValueError(f"--part-px must be >= 16, got {cfg.part_px}")
    if not remote and out.exists() and out.is_dir() and out.suffix != ".zarr":
        raise ValueError(f"--out {out} is a directory")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.num_actors is not None and cfg.num_actors < 1:
        raise ValueError(f"--num-actors must be >= 1, got {cfg.num_actors}")
    if (cfg.task == "fewshot") != (cfg.support is not None):
        raise ValueError("--support is required by --task fewshot, and only by it")
    if not storage.exists(cfg.cube):
        raise ValueError(f"cube {cfg.cube} does not exist")
    cube = storage.location(cfg.cube)
    root = zarr_cube.open_cube(cube)
    ccfg = zarr_cube.cube_config(root)
    size, halo, tile_px = ccfg.grid.size_px, ccfg.grid.halo_px, ccfg.grid.tile_px

    encoder, head = resolve_checkpoint(cfg.checkpoint, cfg.task)
    mcfg, _ = encoder_config(encoder)
    cube_mods = cube_modalities(ccfg)
    mods = [m for m in cube_mods if m in mcfg.modalities]
    if not mods:
        raise ValueError(f"the checkpoint {encoder} (modalities {list(mcfg.modalities)}) shares no modality with "
                         f"the cube {cube} ({cube_mods})")
    if "hr" in mods and mcfg.hr_ratio != ccfg.hr_ratio:
        raise ValueError(f"the checkpoint {encoder} is preset '{mcfg.name}' with {mcfg.hr_ratio} HR pixels per "
                         f"Sentinel pixel, the cube {cube} has {ccfg.hr_ratio}: use a checkpoint of a preset made "
                         f"for this cube's HR ratio (or ingest with --hr-ratio {mcfg.hr_ratio})")
    from skysense_core.pixel_features import feature_dim as pixel_feature_dim

    features = head.features if head is not None else "fused"
    feature_dim = pixel_feature_dim(features, mcfg, mods)
    sha = file_sha256(encoder)
    if head is not None:
        if head.preset and head.preset != mcfg.name:
            raise ValueError(f"the head {head.path} was trained on preset '{head.preset}', its encoder {encoder} "
                             f"is preset '{mcfg.name}'")
        if head.in_dim and head.in_dim != feature_dim:
            raise ValueError(f"the head {head.path} takes {head.in_dim} features, the encoder {encoder} "
                             f"(preset '{mcfg.name}') makes {feature_dim} of the feature set '{features}' from the "
                             f"cube's modalities {mods}")
        if head.encoder_sha256 and head.encoder_sha256 != sha:
            raise ValueError(f"the encoder {encoder} changed since the head {head.path} was trained on it "
                             f"(sha256 {sha[:12]}..., the head records {head.encoder_sha256[:12]}...)")

    window, overlap, margin = default_window_plan(cfg.task, mcfg.name, ccfg.grid, cfg.window)
    overlap = overlap if cfg.overlap is None else cfg.overlap
    margin = margin if cfg.margin is None else cfg.margin
    if not 0 <= margin <= halo:
        raise ValueError(f"--margin must be between 0 and the cube's halo ({halo} px), got {margin}")
    if window < 4 or window % mcfg.vit_patch_size or window > size:
        raise ValueError(f"--window must be a multiple of {mcfg.vit_patch_size} between {mcfg.vit_patch_size} and "
                         f"the tile sample side {size} (tile {tile_px} + 2 x halo {halo}), got {window}")
    if cfg.task == "fewshot" and window % mcfg.mask_cell:
        raise ValueError(f"--task fewshot needs a --window that is a multiple of {mcfg.mask_cell}")
    window_plan(size, window, overlap)  # overlap checks

    # tiles: every planned tile (or the subset asked for); those not written are failed up front
    ids = zarr_cube.tile_ids(root)
    status = root["index/status"][:]
    lat, lon = root["index/center_lat"][:], root["index/center_lon"][:]
    pos = {t: i for i, t in enumerate(ids)}
    if cfg.tiles is not None:
        unknown = [t for t in cfg.tiles if t not in pos]
        if unknown:
            raise ValueError(f"{len(unknown)} tiles are not in the cube's index, e.g. {unknown[0]}")
        tiles = sorted(set(cfg.tiles), key=pos.__getitem__)
    else:
        tiles = list(ids)
    if not tiles:
        raise ValueError(f"the cube {cube} plans no tile")
    missing = {}
    for t in tiles:
        s = int(status[pos[t]])
        if s != zarr_cube.DONE and not zarr_cube.is_done(cube, t):
            what = {zarr_cube.PLANNED: "planned but never written", zarr_cube.FAILED: "failed at ingest"}.get(s, s)
            missing[t] = f"not in the cube: the tile is {what} (re-run jobs/ingest.py for it)"
    todo = [t for t in tiles if t not in missing]

    # classes and colours
    class_names: dict[int, str] = {}
    colormap: dict[int, tuple[int, int, int, int]] = {}
    band_names = None
    num_classes = None
    support = None
    if cfg.task == "landcover":
        num_classes = head.num_classes
        class_names = {k: v for k, v in head.class_names.items() if k < num_classes}
        colormap = {k: v for k, v in head.colormap.items() if k < num_classes}
    elif cfg.task == "fewshot":
        entries = parse_support(cfg.support, cube, cfg.allow_hrefs)
        for e in entries:
            if e.cube != cube:
                other = zarr_cube.cube_config(zarr_cube.open_cube(e.cube))
                if other.grid.size_px != size or other.hr_ratio != ccfg.hr_ratio:
                    raise ValueError(f"support cube {e.cube} has another grid or HR ratio than {cube}")
        names0, colors0 = label_legend(entries[0].labels)
        if names0:
            num_classes = max(names0) + 1
        else:
            from pipeline.labels import label_classes

            num_classes = label_classes(entries[0].labels)
        if num_classes is None:
            raise ValueError(f"cannot tell the classes of {entries[0].labels}: it has no class_names tag")
        if num_classes > mcfg.vocab_size - 1:
            raise ValueError(f"{num_classes} classes do not fit the {mcfg.vocab_size - 1} label ids of few-shot")
        class_names, colormap = names0, colors0
        say(f"[infer] reading {len(entries)} support tile(s)")
        support = load_support(entries, size, window, overlap, ccfg.hr_ratio, mods, num_classes)
    elif field:
        band_names = [f"emb_{i:02d}" for i in range(min(EMBEDDING_DIMS, feature_dim))]
    else:
        d = mcfg.fusion_dim
        band_names = [f"fus_mm_{i:04d}" for i in range(d)]
        if mcfg.geo_context:
            band_names += [f"fus_geo_{i:04d}" for i in range(d)]

    tile_name = cfg.name or f"{out.stem}.tiles"
    if cfg.work_dir and storage.is_remote(cfg.work_dir):
        tile_dir = storage.join(storage.location(cfg.work_dir), tile_name)
    elif cfg.work_dir:
        tile_dir = Path(cfg.work_dir).resolve() / tile_name
    else:
        tile_dir = out_at(out.parent / tile_name)
        tile_dir = tile_dir if remote else Path(tile_dir)
    if cfg.crs is not None:
        from rasterio.crs import CRS
        from rasterio.errors import CRSError

        crs = f"EPSG:{cfg.crs}" if str(cfg.crs).isdigit() else str(cfg.crs)
        try:
            CRS.from_user_input(crs)
        except CRSError as e:
            raise ValueError(f"--crs {cfg.crs}: {e}") from None
        dst_crs = crs
    else:
        dst_crs = default_product_crs(dict(root.attrs.get("search", {})))
    if field and (out.suffix.lower() in (".tif", ".tiff") or cfg.embedding_cog) and \
            product_side_px(todo, ccfg.grid, dst_crs) > cfg.part_px:
        raise ValueError(f"the int8 embedding COG of {len(todo)} tiles would pass --part-px {cfg.part_px} px a side: "
                         f"write the field alone (--out ending in .zarr, without --embedding-cog), whose chunks "
                         f"have no such limit")

    spec = PredictorSpec(
        task=cfg.task, encoder=encoder, head=head.path if head else None, window=window, overlap=overlap,
        batch_size=cfg.batch_size, size=size, core=(halo, tile_px), hr_ratio=ccfg.hr_ratio, modalities=tuple(mods),
        num_classes=num_classes, gpu=cfg.gpu, threads=cfg.threads, support=support, seed=cfg.seed,
        pid_dir=storage.join(tile_dir, "pids") if cfg.write_pids else None, margin=margin, features=features,
        until_doy=head.until_doy if head is not None else None,
        temperature=head.temperature if head is not None else 1.0,
        embedding_dims=EMBEDDING_DIMS if field else None,
    )
    fingerprint = {
        "task": cfg.task, "cube": cube, "encoder_sha256": sha,
        "head_sha256": file_sha256(head.path) if head else None,
        "support": support.digest() if support is not None else None, "window": window, "overlap": overlap,
        "margin": margin,
        "precision": "bf16" if cfg.gpu else "fp32", "seed": cfg.seed if cfg.task == "fewshot" else None,
        # what a tile file holds: class map + confidence file, the int8 field's vectors, or float features
        "tile_format": "class+confidence/1" if cfg.task != "embeddings" else
                       f"int8-unit-{EMBEDDING_DIMS}/1" if field else "float32",
    }
    return InferencePlan(
        config=cfg, spec=spec, out=out, tile_dir=tile_dir, tiles=tiles, todo=todo, missing=missing,
        lat_lon={t: (float(lat[pos[t]]), float(lon[pos[t]])) for t in tiles}, encoder_sha256=sha, head=head,
        preset=mcfg.name, class_names=class_names, colormap=colormap, band_names=band_names, dst_crs=dst_crs,
        fingerprint=fingerprint, search=dict(root.attrs.get("search", {})),
    )


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class InferenceResult:
    """What a run did. ``complete``: every tile done (the product was made); ``out`` / ``quicklook`` / ``item``:
    the product files, None when no product was made (failed tiles without ``allow_partial``, or stopped by
    ``max_tiles``). ``processed``: tiles this run predicted (done or failed in the model); ``skipped``: tiles
    done by an earlier run. ``seconds``: ``plan``, ``pipeline`` (Ray Data, from its start to the last tile:
    actor start-up and model loading included), ``first_tile`` (from its start to the end of the first tile, by
    the actor's clock), ``steady_per_tile`` (seconds per tile after the first: the rate a long run converges to;
    with several actors, tiles over their combined rate), ``mosaic``, ``total``. ``pixels_per_s``: core pixels
    of the tiles this run predicted / pipeline seconds."""

    tile_dir: Path
    manifest: Path
    tiles: list[str]
    done: list[str]
    failed: dict[str, str]
    processed: list[str]
    skipped: list[str]
    complete: bool
    stopped_early: bool = False
    out: Path | None = None
    quicklook: Path | None = None
    item: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    pixels_per_s: float | None = None

    def summary(self) -> dict[str, Any]:
        return {"complete": self.complete, "out": str(self.out) if self.out else None, "tiles": len(self.tiles),
                "done": len(self.done), "failed": len(self.failed), "processed": len(self.processed),
                "skipped": len(self.skipped), "stopped_early": self.stopped_early, "tile_dir": str(self.tile_dir),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "pixels_per_s": self.pixels_per_s,
                "failures": {t: r.splitlines()[0] if r else r for t, r in sorted(self.failed.items())}}


def actor_resources(cfg: InferenceConfig) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor) for this cluster."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), int(res.get("GPU", 0))
    # an actor lives on one node: never ask for more CPUs than the largest node has, or it is never placed
    largest = max((float(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive")), default=cpus)
    if cfg.gpu:
        if gpus < 1:
            raise ValueError("--gpu: the Ray cluster has no GPU")
        n = cfg.num_actors or gpus
        per = cfg.cpus_per_actor or min(1.0, largest)
    else:
        n = cfg.num_actors or max(1, int(cpus // 8))
        # leave the read stage its share, or it starves behind the actors on small machines
        per = cfg.cpus_per_actor or min(max(0.5, (cpus - cfg.read_cpus) / n), largest)
    if per > largest:
        raise ValueError(f"--cpus-per-actor {per:g}: no node of the Ray cluster has that many CPUs (the largest "
                         f"has {largest:g})")
    threads = cfg.threads or max(1, round(per))
    return n, per, threads


def reads_in_actor(cfg: InferenceConfig) -> bool:
    """Whether the inference actors read their tiles themselves (default on CPU) instead of read tasks feeding
    them (default with --gpu). On CPU the model's OpenMP threads fill every core, and a read task running beside
    them (~0.3 CPU-s per tile) stalls both threads at every barrier: on 2 cores a tile took 1.85 s in the actor
    against 1.2 s alone. Read first and then computed, it takes the read time plus the compute. A GPU would idle
    through the reads, so there they stay in parallel tasks."""
    return (not cfg.gpu) if cfg.read_in_actor is None else cfg.read_in_actor


def tiles_per_call(cfg: InferenceConfig) -> int:
    """Tiles an actor gets per call (their same-shaped windows share forwards): 1 on CPU, where a tile's windows
    fill a forward and larger batches only leave the cache; 4 on a GPU."""
    return cfg.tiles_per_call or (4 if cfg.gpu else 1)


def reader_concurrency(cfg: InferenceConfig, n_actors: int) -> int:
    """Read tasks at once at most. Each running task may hold a worker process of its own, and on a small machine
    starting workers is where the CPU goes (~1.5 CPU-s each). Reading a tile costs ~0.3 CPU-s and the model on CPU
    ~3 CPU-s, so one reader per CPU actor keeps it fed; a GPU predicts a tile in a fraction of the read time, so
    it gets four."""
    if cfg.read_concurrency is not None:
        return cfg.read_concurrency
    return (4 if cfg.gpu else 1) * n_actors


def _input_items(cube: str, tiles: Sequence[str]) -> list[str]:
    """Ids of every STAC item the tiles were made from (the tiles' ``items`` attributes)."""
    items: set[str] = set()
    for t in tiles:
        for per_date in zarr_cube.tile_attrs(cube, t).get("items", {}).values():  # modality -> dates -> ids
            for ids in per_date:
                items.update([ids] if isinstance(ids, str) else (i for i in ids or [] if i))
    return sorted(items)


def product_side_px(tiles: Sequence[str], grid, dst_crs: str | int | None) -> int:
    """The larger side, in 10 m output pixels, of the mosaic of ``tiles``' cores in ``dst_crs`` (default the
    first tile's UTM zone, as the mosaic's default for one zone), from the tile ids alone (no file read)."""
    import shapely
    from pyproj import CRS as PCRS
    from pyproj import Transformer

    from pipeline.grid import footprints_lonlat, parse_tile_id

    parsed = [parse_tile_id(t, grid) for t in tiles]
    if not parsed:
        return 0
    fps = footprints_lonlat(parsed, halo=False)
    dst = PCRS.from_user_input(dst_crs) if dst_crs is not None else PCRS.from_epsg(parsed[0].epsg)
    tr = Transformer.from_crs(4326, dst, always_xy=True)
    x0, y0, x1, y1 = shapely.total_bounds(shapely.transform(fps, lambda xy: np.column_stack(tr.transform(xy[:, 0],
                                                                                                        xy[:, 1]))))
    res = grid.res_m if dst.is_projected else grid.res_m / 111_320.0
    return int(math.ceil(max(x1 - x0, y1 - y0) / res))


def _ray_map(num_cpus: float):
    """``map_fn`` for :func:`pipeline.mosaic.mosaic_parts`: one Ray task per part when Ray runs, else in turn."""
    import ray

    def run(fn, args):
        if not ray.is_initialized():
            return [fn(a) for a in args]
        task = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
        return ray.get([task.remote(a) for a in args])

    return run


def _make_product(plan: InferencePlan, done: list[str], failed: Mapping[str, str], say,
                  run: Mapping[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """The mosaic COG (or, past ``part_px``, the part COGs and their VRT), its quicklook PNG and STAC item (or
    collection of part items) from the done tiles, with the class map's confidence COG, polygons and report, or
    the embedding field. An ``s3://`` product is made in a local temporary directory (GDAL's COG driver writes a
    seekable file) and uploaded file by file, the item's relative hrefs intact; the tiles are read where they
    are. ``run``: the run's figures for the report and the item (:func:`run_cost`)."""
    if isinstance(plan.out, Path):
        return _make_product_at(plan, plan.out, done, failed, say, run)
    import tempfile

    url = _product_location(plan.out)
    with tempfile.TemporaryDirectory(prefix="skysense-product-") as tmp:
        local = Path(tmp) / plan.out.name
        made = _make_product_at(plan, local, done, failed, say, run)
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        say(f"[infer] uploading the product ({len(files)} files) to {url(plan.out.parent)}")
        for f in files:
            storage.upload(f, url(plan.out.parent / f.relative_to(tmp).as_posix()))
        if local.with_suffix(".vrt").exists():  # a single-COG product of an earlier run
            for stale in (plan.out, plan.out.with_suffix(".json")):
                storage.remove(url(stale))
    return tuple(url(plan.out.parent / Path(p).relative_to(tmp).as_posix()) for p in made)


def _provenance(plan: InferencePlan, done: list[str], failed: Mapping[str, str],
                run: Mapping[str, Any] | None) -> dict[str, Any]:
    """The product's provenance (``skysense:*`` properties, ``processing:*`` where the extension has the field)."""
    import platform
    from importlib.metadata import version

    import torch

    cfg, spec = plan.config, plan.spec
    search = plan.search
    prov = {
        "task": cfg.task, "model_preset": plan.preset, "checkpoint": spec.encoder,
        "checkpoint_sha256": plan.encoder_sha256, "head": spec.head,
        "head_sha256": plan.fingerprint["head_sha256"], "window": spec.window, "overlap": spec.overlap,
        "cube": plan.fingerprint["cube"], "dates": {"start": search.get("start"), "end": search.get("end")},
        "input_items": _input_items(plan.fingerprint["cube"], done), "tiles_done": len(done),
        "tiles_failed": sorted(failed), "lineage": f"SkySense {cfg.task} inference over the cube tiles (pipeline."
                                                   f"inference), mosaicked with pipeline.mosaic",
        "level": "L4", "facility": platform.node() or "unknown",
        "software": {"skysense": version("skysense"), "torch": torch.__version__, "ray": _ray_version()},
        "datetime": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if spec.classes and spec.task == "landcover":
        prov["confidence_temperature"] = spec.temperature
    if spec.support is not None:
        prov["support_windows"] = [list(o) for o in spec.support.origins]
    for k in ("tiles_predicted", "cpu_seconds", "gpu_seconds", "km2_per_hour", "area_km2"):
        if run and run.get(k) is not None:
            prov[k] = run[k]
    if run:
        prov["cost_of"] = "this run's predictions; tiles done by an earlier run with the same settings are reused " \
                          "and not counted"
    return prov


def _ray_version() -> str:
    import ray

    return ray.__version__


def run_cost(plan: InferencePlan, tile_seconds: Sequence[float], pipeline_s: float, cpus_per_actor: float,
             gpu: bool) -> dict[str, Any]:
    """The cost of THIS run's predictions (tiles done by an earlier run, reused, cost nothing now and are not
    counted; ``tiles_predicted`` says how many were): ``cpu_seconds`` = sum over tiles of the actor's seconds on
    it x the CPUs the actor holds (what the cluster was charged, not what the cores did), ``gpu_seconds`` the
    same x its GPU, ``area_km2`` of the tiles predicted, ``km2_per_hour`` = that area / the pipeline's wall time
    (actor start-up and model loading included)."""
    busy = float(sum(tile_seconds))
    tile_km = (plan.spec.core[1] * 10 / 1000) ** 2  # the 10 m grid's tile core
    area = len(tile_seconds) * tile_km
    return {"tiles_predicted": len(tile_seconds), "cpu_seconds": round(busy * cpus_per_actor, 1),
            "gpu_seconds": round(busy, 1) if gpu else 0.0,
            "area_km2": round(area, 6),
            "km2_per_hour": round(area / (pipeline_s / 3600), 2) if pipeline_s > 0 and area else None}


def _make_product_at(plan: InferencePlan, out: Path, done: list[str], failed: Mapping[str, str],
                     say, run: Mapping[str, Any] | None = None) -> tuple[Path, Path, Path]:
    """:func:`_make_product` written at the local path ``out``."""
    if plan.spec.embedding_dims:
        return _make_field_product(plan, out, done, failed, say, run)
    from pipeline.mosaic import mosaic_parts, mosaic_tiles, product_blocksize, quicklook_png
    from pipeline.product_item import product_item, write_item, write_parts_collection

    cfg, spec = plan.config, plan.spec
    tags = {"task": cfg.task, "model_preset": plan.preset, "checkpoint_sha256": plan.encoder_sha256,
            "window": str(spec.window), "overlap": str(spec.overlap)}
    classes = spec.classes
    grid = zarr_cube.cube_config(zarr_cube.open_cube(plan.fingerprint["cube"])).grid
    common = dict(dst_crs=plan.dst_crs, nodata=plan.nodata,
                  resampling="nearest" if classes else "bilinear",
                  overview_resampling="mode" if classes else "average",
                  colormap=(plan.colormap or None) if classes else None,
                  class_names=(plan.class_names or None) if classes else None,
                  band_names=plan.band_names, tags=tags, overwrite=True, progress=say)
    confidence = dict(common, nodata=CONFIDENCE_NODATA, resampling="nearest", overview_resampling="average",
                      colormap=None, class_names=None, band_names=["confidence_percent"],
                      tags={**tags, "temperature": f"{spec.temperature:.6g}"})
    tiles = [tile_path(plan.tile_dir, t) for t in sorted(done)]
    conf_tiles = [tile_path(plan.tile_dir, t, CONFIDENCE_FILE) for t in sorted(done)]
    in_parts = product_side_px(sorted(done), grid, plan.dst_crs) > cfg.part_px
    conf_out = out.with_name(f"{out.stem}.confidence.tif")
    if in_parts:
        n_side = math.ceil(cfg.part_px / spec.core[1])
        blocks = product_blocksize(spec.core[1], n_side * n_side)
        cog, parts = mosaic_parts(tiles, out.with_suffix(".vrt"), cfg.part_px, map_fn=_ray_map(0.5),
                                  blocksize=blocks, **common)
        conf_parts = []
        if classes:
            conf_cog, conf_parts = mosaic_parts(conf_tiles, conf_out.with_suffix(".vrt"), cfg.part_px,
                                                map_fn=_ray_map(0.5), blocksize=blocks, **confidence)
        for stale in _single_cog_files(out):  # a single-COG product of an earlier run
            stale.unlink(missing_ok=True)
    else:
        cog = mosaic_tiles(tiles, out, blocksize=product_blocksize(spec.core[1], len(done)), **common)
        if classes:
            conf_cog = mosaic_tiles(conf_tiles, conf_out, blocksize=product_blocksize(spec.core[1], len(done)),
                                    **confidence)
    png = quicklook_png(cog, out.with_suffix(".png"))
    search = plan.search
    start = datetime.fromisoformat(search["start"]) if search.get("start") else None
    end = datetime.fromisoformat(search["end"]) if search.get("end") else None
    provenance = _provenance(plan, done, failed, run)
    item_kw = dict(start=start, end=end, class_names=(plan.class_names or None) if classes else None,
                   colormap=(plan.colormap or None) if classes else None, provenance=provenance)
    extras = ProductExtras()
    if in_parts:
        items = []
        for i, p in enumerate(parts):
            item = product_item(p, item_id=f"{out.stem}-{p.stem}", **item_kw)
            if classes:
                extras.add_class_assets(item, plan, p, conf_parts[i], say)
            items.append(item)
        report = None
        if cfg.report:  # the parts' report: the quicklook of the VRT, the areas summed over the parts
            holder = product_item(cog, item_id=out.stem, quicklook=png, **item_kw)
            report = extras.add_report(holder, plan, out, png, holder, run, say).resolve()
        item_path = write_parts_collection(
            items, cog, out.with_suffix(".json"), collection_id=out.stem, quicklook=png, report=report,
            description=f"SkySense {cfg.task} product in {len(parts)} COG part(s) of at most {cfg.part_px} px, "
                        f"joined by {cog.name}")
    else:
        item = product_item(cog, item_id=out.stem, quicklook=png, **item_kw)
        if classes:
            extras.add_class_assets(item, plan, cog, conf_cog, say)
        item_path = out.with_suffix(".json")
        if cfg.report:
            extras.add_report(item, plan, out, png, item, run, say)
        item_path = write_item(item, item_path)
    return cog, png, item_path


def _single_cog_files(out: Path) -> list[Path]:
    """The files of a single-COG product at ``out`` (a parts product of the same name replaces them)."""
    return [out, out.with_suffix(".json"), out.with_name(f"{out.stem}.confidence.tif"), out.with_suffix(".parquet"),
            out.with_name(f"{out.stem}.report.html"), out.with_name(f"{out.stem}.report.json")]


class ProductExtras:
    """What a product gets beside its COG: the class map's confidence COG, its polygons (GeoParquet) and the run's
    report, each an asset of the product's STAC item. Keeps the class areas and vector counts it measured."""

    def __init__(self) -> None:
        self.areas_km2: dict[str, float] = {}
        self.vectors: list[Path] = []

    def add_class_assets(self, item, plan: InferencePlan, cog: Path, conf_cog: Path, say) -> None:
        import pystac

        from pipeline.product_item import add_raster_asset

        add_raster_asset(item, "confidence", conf_cog, roles=["data", "confidence"],
                         title=f"confidence of the class map: percent of the top class "
                               f"(softmax at temperature {plan.spec.temperature:.3g})",
                         nodata=CONFIDENCE_NODATA, unit="percent")
        for name, km2 in class_areas_km2(cog, plan.class_names).items():
            self.areas_km2[name] = self.areas_km2.get(name, 0.0) + km2
        if plan.config.vectors:
            from pipeline.vectors import polygonise

            vec = polygonise(cog, cog.with_suffix(".parquet"), class_names=plan.class_names or None,
                             min_mapping_unit_m2=plan.config.min_mapping_unit_m2, simplify_m=plan.config.simplify_m)
            say(f"[infer] polygons: {vec.features} features in {Path(vec.path).name} (minimum mapping unit "
                f"{plan.config.min_mapping_unit_m2:g} m², {vec.sieved_pixels} px merged), {vec.seconds:.1f} s")
            item.add_asset("vectors", pystac.Asset(
                str(Path(vec.path).resolve()), media_type="application/vnd.apache.parquet", roles=["data", "vector"],
                title=f"class polygons (GeoParquet; minimum mapping unit {plan.config.min_mapping_unit_m2:g} m², "
                      f"simplified to {plan.config.simplify_m:g} m)"))
            self.vectors.append(Path(vec.path))

    def add_report(self, item, plan: InferencePlan, out: Path, png: Path, product_item, run, say) -> Path:
        import pystac

        from pipeline.report import RunReport, save_report_json, write_report

        rep = RunReport(
            title=f"SkySense {plan.config.task}: {out.stem}", quicklook=png,
            legend=[(plan.class_names.get(k, str(k)), tuple(plan.colormap[k])) for k in sorted(plan.colormap)]
            if plan.spec.classes else [],
            class_areas_km2=dict(self.areas_km2),
            provenance=report_provenance(product_item.properties),
            timings_s=dict((run or {}).get("seconds", {})),
            cost={k: (run or {}).get(k) for k in ("tiles_predicted", "cpu_seconds", "gpu_seconds", "area_km2",
                                                   "km2_per_hour")},
            bounds_lonlat=tuple(product_item.bbox) if product_item.bbox else None,
            notes=[f"{n} tile(s) failed and are nodata" for n in [len(product_item.properties.get(
                "skysense:tiles_failed", []))] if n],
        )
        path = write_report(rep, out.parent, name=f"{out.stem}.report.html")
        save_report_json(rep, out.with_name(f"{out.stem}.report.json"))
        item.add_asset("report", pystac.Asset(str(path.resolve()), media_type=pystac.MediaType.HTML,
                                              roles=["overview", "metadata"], title="run report"))
        say(f"[infer] report {path.name}")
        return path


def report_provenance(props: Mapping[str, Any]) -> dict[str, Any]:
    """The report's provenance from a product item's properties: model, checkpoint, dates, input items."""
    keep = ("task", "model_preset", "checkpoint", "checkpoint_sha256", "head", "head_sha256", "dates",
            "input_items", "tiles_done", "cube", "window", "overlap", "confidence_temperature")
    out = {k: props[f"skysense:{k}"] for k in keep if props.get(f"skysense:{k}") is not None}
    for k in ("processing:software", "processing:datetime", "processing:facility"):
        if k in props:
            out[k.split(":")[1]] = props[k]
    return out


def class_areas_km2(cog: str | Path, class_names: Mapping[int, str]) -> dict[str, float]:
    """km² per class of a class-map COG, read block by block: pixel count x pixel area (projected metric CRS:
    the pixel's square; geographic: each row's pixel area on the WGS84 sphere of mean radius, an approximation
    within ~0.5 %)."""
    import rasterio

    counts: dict[int, float] = {}
    with rasterio.open(cog) as src:
        t = src.transform
        metric = src.crs.is_projected and src.crs.linear_units in ("metre", "meter")
        for _, win in src.block_windows(1):
            data = src.read(1, window=win)
            if metric:
                w = np.full(data.shape[0], abs(t.a * t.e))
            else:
                lat = t.f + t.e * (win.row_off + np.arange(data.shape[0]) + 0.5)
                r = 6371008.8
                w = (np.radians(abs(t.a)) * r * np.cos(np.radians(lat))) * (np.radians(abs(t.e)) * r)
            for v in np.unique(data):
                if src.nodata is not None and v == src.nodata:
                    continue
                counts[int(v)] = counts.get(int(v), 0.0) + float(((data == v) * w[:, None]).sum())
    return {class_names.get(v, str(v)): round(a / 1e6, 6) for v, a in sorted(counts.items())}


def _make_field_product(plan: InferencePlan, out: Path, done: list[str], failed: Mapping[str, str], say,
                        run: Mapping[str, Any] | None) -> tuple[Path, Path, Path]:
    """The embedding field ``<stem>.zarr`` (``pipeline.embedding_field``), an int8 COG too when asked, a
    quicklook (the first three components as RGB of the COG, or of a coarse mosaic of at most
    :data:`QUICKLOOK_PX` a side made for it and then removed), the STAC item and the report."""
    import pystac

    from pipeline.embedding_field import EMBEDDING_NODATA, EMBEDDING_SCALE, FIELD_FORMAT, projection, write_field
    from pipeline.mosaic import mosaic_tiles, product_blocksize, quicklook_png
    from pipeline.product_item import product_item, write_item

    cfg, spec = plan.config, plan.spec
    field_path = out.with_suffix(".zarr")  # plan.field, at ``out`` (a temporary directory for an upload)
    tiles = [tile_path(plan.tile_dir, t) for t in sorted(done)]
    provenance = _provenance(plan, done, failed, run)
    feature_dim = _feature_dim(plan)
    proj = projection(feature_dim, spec.embedding_dims)
    t0 = time.perf_counter()
    from pipeline.product_item import public_provenance

    write_field(tiles, field_path, proj=proj, overwrite=True,
                provenance=public_provenance({k: v for k, v in provenance.items() if k != "input_items"}))
    say(f"[infer] embedding field {field_path.name}: {len(tiles)} chunks of {spec.embedding_dims} x int8, "
        f"{time.perf_counter() - t0:.1f} s")
    cog = plan.cog
    tags = {"task": cfg.task, "model_preset": plan.preset, "checkpoint_sha256": plan.encoder_sha256,
            "scale": f"{EMBEDDING_SCALE!r}", "offset": "0", "field_format": FIELD_FORMAT}
    made_cog = cog is not None
    target = cog if made_cog else out.with_name(f".{out.stem}.quicklook-{os.getpid()}.tif")
    # without a COG to show, the quicklook's source is a coarse mosaic (<= QUICKLOOK_PX a side), not a full one
    grid = zarr_cube.cube_config(zarr_cube.open_cube(plan.fingerprint["cube"])).grid
    side = product_side_px(sorted(done), grid, plan.dst_crs)
    coarse = None if made_cog or side <= QUICKLOOK_PX else grid.res_m * side / QUICKLOOK_PX
    try:
        mosaic_tiles(tiles, target, dst_crs=plan.dst_crs, nodata=EMBEDDING_NODATA, resampling="nearest",
                     overview_resampling="nearest", band_names=plan.band_names, tags=tags, overwrite=True,
                     blocksize=product_blocksize(spec.core[1], len(done)), progress=say, resolution=coarse)
        png = quicklook_png(target, out.with_suffix(".png"))
        start = datetime.fromisoformat(plan.search["start"]) if plan.search.get("start") else None
        end = datetime.fromisoformat(plan.search["end"]) if plan.search.get("end") else None
        item = product_item(target, item_id=out.stem, start=start, end=end, provenance=provenance, quicklook=png)
        data = item.assets.pop("data")
        if made_cog:  # the COG: scale/offset per band say how to dequantise
            from pystac.extensions.raster import RasterExtension

            for b in RasterExtension.ext(data).bands or []:
                b.scale, b.offset = EMBEDDING_SCALE, 0.0
            data.title = f"embedding vectors, int8 COG ({spec.embedding_dims} bands; value x {EMBEDDING_SCALE:.6g})"
            item.add_asset("cog", data)
    finally:
        if not made_cog:
            target.unlink(missing_ok=True)
    item.add_asset("data", pystac.Asset(
        str(field_path.resolve()), media_type="application/vnd+zarr", roles=["data", "embeddings"],
        title=f"embedding field: {spec.embedding_dims}-d unit vectors, int8, one Zarr v3 chunk per tile",
        extra_fields={"raster:bands": [{"data_type": "int8", "nodata": EMBEDDING_NODATA, "scale": EMBEDDING_SCALE,
                                        "offset": 0.0, "spatial_resolution": 10.0}] * spec.embedding_dims,
                      "skysense:field_format": FIELD_FORMAT,
                      "skysense:projection": "identity (F_fus kept)" if proj is None else
                      f"fixed random orthonormal {spec.embedding_dims} x {feature_dim} (array 'projection')"}))
    item_path = out.with_suffix(".json")
    if cfg.report:
        ProductExtras().add_report(item, plan, out, png, item, run, say)
    item_path = write_item(item, item_path)
    return field_path, png, item_path


def _feature_dim(plan: InferencePlan) -> int:
    from skysense_core.pixel_features import feature_dim

    mcfg, _ = encoder_config(plan.spec.encoder)
    return feature_dim(plan.spec.features, mcfg, plan.spec.modalities)


def run_inference(cfg: InferenceConfig, progress: Callable[[str], None] | None = print) -> InferenceResult:
    """Predict every tile of the cube not done yet, record each in the manifest, then make the product (module
    docstring). Raises what :func:`plan_inference` raises before anything is written; tile failures are results
    (``InferenceResult.failed``), not exceptions."""
    import ray

    from pipeline.datasource import read_cube
    from pipeline.ingest import init_ray

    say = progress or (lambda _s: None)
    t_start = time.perf_counter()
    plan = plan_inference(cfg, say)
    spec = plan.spec
    manifest = Manifest(plan.tile_dir, plan.fingerprint, say)
    already = manifest.done() & set(plan.tiles)
    todo = [t for t in plan.todo if t not in already]
    for t, reason in plan.missing.items():
        manifest.record(t, {"status": "failed", "reason": reason})
    t_plan = time.perf_counter() - t_start
    say(f"[infer] {cfg.task}: {len(plan.tiles)} tiles ({len(already)} done earlier, {len(plan.missing)} missing "
        f"from the cube, {len(todo)} to predict); window {spec.window} px, overlap {spec.overlap} px; tiles in "
        f"{plan.tile_dir}")

    processed: list[str] = []
    per_actor_cpus = 0.0
    stopped = False
    t_pipe = 0.0
    finished: list[float] = []  # seconds from the pipeline's start to each tile's end, by the actors' clocks
    if todo and not (cfg.max_tiles is not None and cfg.max_tiles <= 0):
        init_ray(cfg.ray_address)
        n_actors, per, threads = actor_resources(cfg)
        per_actor_cpus = per
        spec = dataclasses.replace(spec, threads=threads)
        ctx = ray.data.DataContext.get_current()
        saved = ctx.max_errored_blocks
        ctx.max_errored_blocks = -1  # a tile that cannot be read loses only itself (one tile per read task)
        try:
            in_actor = reads_in_actor(cfg)
            if in_actor:
                quiet_data_context()
                ds = ray.data.from_items([{"tile_id": t} for t in todo], override_num_blocks=len(todo))
            else:
                ds = read_cube(plan.fingerprint["cube"], tiles=todo, modalities=list(spec.modalities),
                               num_cpus=cfg.read_cpus, override_num_blocks=len(todo),
                               concurrency=reader_concurrency(cfg, n_actors))
            # A killed actor is replaced and its tile retried, but not forever: a tile that kills every actor
            # (host OOM, a crash in a library) fails after 3 retries instead of looping. Ray 2.60 has no named
            # parameter for max_task_retries, only the deprecated ray_remote_args.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
                tags = {"task": cfg.task, "model_preset": plan.preset, "checkpoint_sha256": plan.encoder_sha256}
                sink = {"tile_dir": str(plan.tile_dir), "cube": plan.fingerprint["cube"], "nodata": plan.nodata,
                        "colormap": plan.colormap or None, "band_names": plan.band_names, "tags": tags,
                        "confidence": spec.classes}
                ds = ds.map_batches(
                    TilePredictor, batch_size=tiles_per_call(cfg),
                    fn_constructor_kwargs={"spec": spec, "sink": sink,
                                           "cube": plan.fingerprint["cube"] if in_actor else None},
                    batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors),
                    num_cpus=per, num_gpus=1 if cfg.gpu else None, max_restarts=-1, max_task_retries=3,
                )
            say(f"[infer] {n_actors} actor(s) x {per:g} CPU{' + 1 GPU' if cfg.gpu else ''}, {threads} torch "
                f"thread(s) each")
            t0, wall0 = time.perf_counter(), time.time()
            it = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
            try:
                for batch in it:
                    finished.extend(float(f) - wall0 for f in batch["finished"])
                    for i, tile_id in enumerate(str(t) for t in batch["tile_id"]):
                        rec = {"status": str(batch["status"][i]), "seconds": round(float(batch["seconds"][i]), 3),
                               "worker": int(batch["worker"][i])}
                        if rec["status"] == "done":
                            rec["file"] = str(batch["file"][i])
                        else:
                            rec["reason"] = str(batch["reason"][i])
                        manifest.record(tile_id, rec)
                        processed.append(tile_id)
                        say(f"[infer] {tile_id} {rec['status']} in {rec['seconds']:.1f} s "
                            f"({len(processed)}/{len(todo)})" + (f": {rec['reason'].splitlines()[0]}"
                                                                 if rec["status"] != "done" else ""))
                    if cfg.max_tiles is not None and len(processed) >= cfg.max_tiles:
                        stopped = True
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            t_pipe = time.perf_counter() - t0
        finally:
            ctx.max_errored_blocks = saved
        if not stopped:
            seen = set(processed)
            lost = [t for t in todo if t not in seen]
            for t in lost:  # dropped blocks: the read (or the actor, beyond its retries) failed on them
                manifest.record(t, {"status": "failed", "reason": _diagnose_read(plan.fingerprint["cube"], t,
                                                                                spec.modalities)})
                processed.append(t)
                say(f"[infer] {t} failed: {manifest.tiles[t]['reason']}")
    else:
        stopped = bool(todo)

    done_now = manifest.done()
    done = [t for t in plan.tiles if t in done_now]
    failed = {t: manifest.tiles.get(t, {}).get("reason", "not processed") for t in plan.tiles if t not in done_now}
    complete = not failed
    result = InferenceResult(
        tile_dir=plan.tile_dir, manifest=manifest.at(MANIFEST), tiles=plan.tiles, done=done,
        failed={} if stopped else failed, processed=processed, skipped=sorted(already), complete=complete,
        stopped_early=stopped,
    )
    run_rec = {"started": datetime.now().isoformat(timespec="seconds"), "processed": len(processed),
               "skipped": len(already), "failed": len(failed), "stopped_early": stopped}
    t_mosaic = 0.0
    if not stopped and done and cfg.make_product and (complete or cfg.allow_partial):
        t0 = time.perf_counter()
        predicted_now = [t for t in processed if t in done_now]
        run_fig = run_cost(plan, [float(manifest.tiles[t].get("seconds") or 0) for t in predicted_now], t_pipe,
                           per_actor_cpus, cfg.gpu)
        run_fig["seconds"] = {"plan": round(t_plan, 2), "predict (Ray pipeline)": round(t_pipe, 2)}
        result.out, result.quicklook, result.item = _make_product(plan, done, failed, say, run_fig)
        t_mosaic = time.perf_counter() - t0
        say(f"[infer] product {result.out} ({len(done)} tiles{f', {len(failed)} failed' if failed else ''}), "
            f"quicklook {PurePosixPath(str(result.quicklook)).name}, STAC item {PurePosixPath(str(result.item)).name}")
    elif failed and not stopped and cfg.make_product:
        say(f"[infer] {len(failed)} tile(s) failed, no product made (re-run to retry them, or --allow-partial)")
    manifest.write(run_rec)
    n_core = spec.core[1] ** 2
    predicted = [t for t in processed if t in done_now]
    result.seconds = {"plan": t_plan, "pipeline": t_pipe, "mosaic": t_mosaic, "total": time.perf_counter() - t_start}
    if finished:
        # Ray Data hands the driver a tile's row about one tile late (the actor's next call first), so the tiles'
        # own end times, not the driver's arrival times, say when the first tile was done and how fast the rest
        result.seconds["first_tile"] = min(finished)
        if len(finished) > 1:
            result.seconds["steady_per_tile"] = (max(finished) - min(finished)) / (len(finished) - 1)
    result.pixels_per_s = len(predicted) * n_core / t_pipe if t_pipe > 0 and predicted else None
    return result


def windows_per_tile(plan: InferencePlan) -> int:
    """How many windows one tile is predicted from."""
    return len(plan.spec.windows())


def computed_pixels_per_tile(spec: PredictorSpec) -> int:
    """S2 px the model computes for one tile (the windows' areas): over the core's ``tile_px ** 2``, the price
    of the margin and the overlaps."""
    return sum(h * w for _, _, h, w in spec.windows())
