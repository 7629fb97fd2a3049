"""Ray Data over the cube: one row per tile sample (or per square window of it), read with zarr 3 in the workers.

``ray.data.read_zarr`` only reads Zarr v2 (shared/research/ray.md section 1.1), so this is a custom
:class:`ray.data.Datasource`. The driver reads the tile index only (ids, status, centres) and the cube config;
every read task re-opens the store itself and reads its own tiles, one block per tile (all its windows).

Row schema (numpy; H x W = window in S2 pixels, the whole tile with its halo when ``window`` is None;
r = the cube's ``hr_ratio``; T = that modality's dates in the cube):

    tile_id         str
    y0, x0          int64, window origin in S2 pixels within the tile sample (halo included)
    lat, lon        float64, tile centre in degrees (from the index)
    s2              (T, 10, H, W) float32  reflectance x 1e4 (0 where nodata; see s2_mask)
    s1              (T, 2, H, W)  float32  backscatter in dB, NaN where nodata
    hr              (T, 3, H*r, W*r) float32  0..255
    <m>_valid       (T,) bool  the date holds usable data (False for padding)
    <m>_mask        (T, h, w) bool  True = usable pixel, on that modality's grid
    <m>_doy         (T,) int64  day of year 1..366 of the date, 0 for padding slots (no item) and NaT
    labels          (H*r, W*r) uint8  (only with ``labels=``) the label raster on the HR grid, 255 = nodata
    labels_grid     (H, W) uint8      the same on the 10 m grid

These are exactly the quantities of :mod:`skysense_core.inputs`; :func:`rows_to_input` collates a batch of rows
into a :class:`~skysense_core.inputs.SkySenseInput` (plus the label tensor)::

    ds = read_cube(cube, window=64, stride=48, labels="truth/landcover_hr.tif")   # training windows
    for x, y in ds.iter_torch_batches(batch_size=8, collate_fn=CollateToInput(device=dev)):
        out = model(x)
    ds = read_cube(cube, tiles=todo, window=64, stride=32)    # inference: overlapping windows, y0/x0 to blend

Ray Data does not keep row order across read tasks (each tile is one task unless ``tiles_per_task`` > 1);
``tile_id``, ``y0`` and ``x0`` say where every row belongs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import zarr
from ray.data import Datasource, ReadTask
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline import storage, zarr_cube
from pipeline.labels import labels_on_grid, open_label_raster, tile_georef

if TYPE_CHECKING:  # torch and the model package are imported lazily: read workers never need them
    import torch

    from skysense_core.inputs import SkySenseInput

MODALITIES = ("hr", "s2", "s1")  # = skysense_core.inputs.MODALITIES

__all__ = [
    "CollateToInput",
    "CubeDatasource",
    "done_tiles",
    "read_cube",
    "rows_to_input",
    "window_origins",
]

_BANDS = {"hr": 3, "s2": 10, "s1": 2}


def window_origins(size: int, window: int | None, stride: int | None = None) -> list[int]:
    """Start offsets of windows of ``window`` pixels every ``stride`` (default ``window``) along an axis of
    ``size`` pixels; the last window is snapped to the edge, so the windows cover the axis exactly.
    ``window=None``: one window, the whole axis."""
    if window is None:
        if stride is not None:
            raise ValueError("stride needs a window")
        return [0]
    stride = window if stride is None else stride
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
    if window > size:
        raise ValueError(f"window {window} is larger than the tile sample ({size} px including the halo)")
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} would leave gaps between windows")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def done_tiles(cube: str | Path) -> list[str]:
    """The tiles whose index status is DONE, in index order (the index, never a directory listing)."""
    root = zarr_cube.open_cube(cube)
    ids = zarr_cube.tile_ids(root)
    status = root["index/status"][:]
    return [t for t, s in zip(ids, status, strict=True) if s == zarr_cube.DONE]


def _day_of_year(times: np.ndarray) -> np.ndarray:
    """datetime64 -> int64 day of year 1..366, 0 for NaT."""
    t = times.astype("datetime64[D]")
    doy = (t - t.astype("datetime64[Y]")).astype(np.int64) + 1
    return np.where(np.isnat(t), 0, doy).astype(np.int64)


def _decode_times(arr: zarr.Array) -> np.ndarray:
    """A CF-encoded time coordinate (``units: days since ...``) read with zarr, decoded to datetime64."""
    raw = arr[...]
    attrs = dict(arr.attrs)
    if np.issubdtype(raw.dtype, np.datetime64):
        return raw
    if "units" not in attrs:
        raise zarr_cube.CubeError(f"time coordinate {arr.path} has no units")
    # xarray's CF time decoder on the bare array: building an xarray Dataset to decode it would import dask
    # (xarray's duck-array probe, ~0.7 s in every fresh read worker and inference actor).
    from xarray.coding.times import decode_cf_datetime

    fill = attrs.get("_FillValue")
    missing = np.zeros(raw.shape, bool) if fill is None else raw == np.asarray(fill, raw.dtype)
    days = np.where(missing, np.nan, raw.astype(np.float64))
    return decode_cf_datetime(days, attrs["units"], attrs.get("calendar", "proleptic_gregorian"))


@dataclass(frozen=True)
class _Spec:
    """What a read task needs (small and picklable): no arrays, no open handles."""

    cube: str
    modalities: tuple[str, ...]
    size: int  # tile sample side in S2 px, halo included
    hr_ratio: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    window: int  # window side in S2 px (= size for whole tiles)
    labels: str | None
    min_valid: float = 0.0  # windows with a smaller fraction of covered S2-grid pixels are dropped

    @property
    def windows(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]


def _read_tile(spec: _Spec, tile_id: str, lat: float, lon: float, label_src) -> dict[str, np.ndarray] | None:
    """The rows of one tile (None when ``min_valid`` drops every window)."""
    g = zarr.open_group(spec.cube, path=zarr_cube.tile_group(tile_id), mode="r", zarr_format=3)
    attrs = dict(g.attrs)
    if not attrs.get(zarr_cube.DONE_ATTR):
        raise zarr_cube.CubeError(f"tile {tile_id} is not (completely) written in {spec.cube}")
    zarr_cube.check_tile_chunks(g, [a for m in spec.modalities for a in (m, f"{m}_mask", f"{m}_valid")],
                                f"tile {tile_id} of {spec.cube}")
    wins = spec.windows
    w, r = spec.window, spec.hr_ratio
    if spec.min_valid > 0:
        cover = _coverage(g, spec.modalities, r)
        wins = [(y, x) for y, x in wins if cover[y : y + w, x : x + w].mean() >= spec.min_valid]
    n = len(wins)
    if n == 0:
        return None
    out: dict[str, np.ndarray] = {
        "tile_id": np.array([tile_id] * n),
        "y0": np.array([y for y, _ in wins], np.int64),
        "x0": np.array([x for _, x in wins], np.int64),
        "lat": np.full(n, lat, np.float64),
        "lon": np.full(n, lon, np.float64),
    }
    items = attrs.get("items", {})
    for m in spec.modalities:
        k = r if m == "hr" else 1
        data = g[m][...]
        mask = g[f"{m}_mask"][...].astype(bool)
        valid = g[f"{m}_valid"][...].astype(bool)
        doy = _day_of_year(_decode_times(g[f"time_{m}"]))
        slots = items.get(m)
        if slots is not None and len(slots) == len(doy):  # a slot with no item is padding, whatever its date
            doy = np.where(np.array([bool(s) for s in slots]), doy, 0)
        out[m] = np.stack([data[:, :, y * k : (y + w) * k, x * k : (x + w) * k] for y, x in wins]).astype(np.float32)
        out[f"{m}_valid"] = np.broadcast_to(valid, (n, *valid.shape)).copy()
        out[f"{m}_mask"] = np.stack([mask[:, y * k : (y + w) * k, x * k : (x + w) * k] for y, x in wins])
        out[f"{m}_doy"] = np.broadcast_to(doy, (n, *doy.shape)).copy()
    if label_src is not None:
        geo = tile_georef(spec.cube, tile_id, attrs)
        hr = labels_on_grid(label_src, geo.epsg, *geo.grid(True))
        lo = labels_on_grid(label_src, geo.epsg, *geo.grid(False))
        out["labels"] = np.stack([hr[y * r : (y + w) * r, x * r : (x + w) * r] for y, x in wins])
        out["labels_grid"] = np.stack([lo[y : y + w, x : x + w] for y, x in wins])
    return out


def _coverage(g: zarr.Group, modalities: Sequence[str], hr_ratio: int) -> np.ndarray:
    """(H, W) bool on the S2 grid: some modality has a usable pixel there on some date (HR pooled: any of its
    ``hr_ratio`` x ``hr_ratio`` pixels)."""
    cover = None
    for m in modalities:
        mask = g[f"{m}_mask"][...].astype(bool) & g[f"{m}_valid"][...].astype(bool)[:, None, None]
        any_t = mask.any(0)
        if m == "hr":
            h, w = any_t.shape
            any_t = any_t.reshape(h // hr_ratio, hr_ratio, w // hr_ratio, hr_ratio).any((1, 3))
        cover = any_t if cover is None else cover | any_t
    return cover


def _read_group(spec: _Spec, group: list[tuple[str, float, float]]) -> Iterator[Block]:
    label_src = open_label_raster(spec.labels) if spec.labels else None
    try:
        for tile_id, lat, lon in group:
            rows = _read_tile(spec, tile_id, lat, lon, label_src)
            if rows is not None:
                yield BlockAccessor.batch_to_block(rows)
    finally:
        if label_src is not None:
            label_src.close()


class CubeDatasource(Datasource):
    """Rows of a cube: one per tile sample, or one per square window of ``window`` S2 pixels every ``stride``
    pixels (last window snapped to the edge; the windows cover the tile sample, halo included, exactly).

    cube: the cube path (it must be reachable from every Ray node: a shared file system).
    tiles: tile ids to read, in this order; default every tile whose index status is DONE.
    modalities: which of ``hr``, ``s2``, ``s1`` to read; default all three (those the cube holds). One asked
        for explicitly that the cube lacks is an error.
    labels: a categorical raster (any CRS / resolution) added as ``labels`` (HR grid) and ``labels_grid``
        (10 m grid), cut like the data (:mod:`pipeline.labels`).
    tiles_per_task: tiles per read task (fewer, larger tasks for many small tiles); each tile is one block.
    min_valid: drop windows where less than this fraction of the S2-grid pixels is covered by a usable pixel of
        some modality on some date (training on windows outside the AOI teaches nothing); 0 keeps every window,
        and then the row count is exact.
    shuffle: the read tasks (tiles) in a new random order every time the dataset executes (every epoch), without
        the all-to-all barrier of ``Dataset.randomize_block_order``, which reads the whole epoch before the
        first row leaves; windows within a tile stay together (shuffle those with a local shuffle buffer).

    See the module docstring for the row schema.
    """

    def __init__(
        self,
        cube: str | Path,
        *,
        tiles: Sequence[str] | None = None,
        modalities: Sequence[str] | None = None,
        window: int | None = None,
        stride: int | None = None,
        labels: str | Path | None = None,
        tiles_per_task: int = 1,
        min_valid: float = 0.0,
        shuffle: bool = False,
    ):
        super().__init__()
        cube = storage.location(cube)  # workers may run in another working directory
        root = zarr_cube.open_cube(cube)
        cfg = zarr_cube.cube_config(root)
        ids = zarr_cube.tile_ids(root)
        status = root["index/status"][:]
        lat, lon = root["index/center_lat"][:], root["index/center_lon"][:]
        pos = {t: i for i, t in enumerate(ids)}
        if tiles is None:
            sel = [i for i, s in enumerate(status) if s == zarr_cube.DONE]
        else:
            tiles = list(tiles)
            unknown = [t for t in tiles if t not in pos]
            if unknown:
                raise ValueError(f"{len(unknown)} tiles are not in the index of {cube}, e.g. {unknown[0]}")
            if len(set(tiles)) != len(tiles):
                raise ValueError("tiles holds duplicates")
            sel = [pos[t] for t in tiles]
            not_done = [ids[i] for i in sel if status[i] != zarr_cube.DONE and not zarr_cube.is_done(cube, ids[i])]
            if not_done:
                raise ValueError(f"{len(not_done)} tiles are not done in {cube}, e.g. {not_done[0]}")
        if not 0.0 <= min_valid <= 1.0:
            raise ValueError(f"min_valid must be a fraction in [0, 1], got {min_valid}")
        if tiles_per_task < 1:
            raise ValueError(f"tiles_per_task must be >= 1, got {tiles_per_task}")
        mods = tuple(modalities) if modalities is not None else MODALITIES
        bad = [m for m in mods if m not in MODALITIES]
        if bad or not mods or len(set(mods)) != len(mods):
            raise ValueError(f"modalities must be distinct names out of {MODALITIES}, got {list(mods)}")
        if sel:
            g = zarr.open_group(cube, path=zarr_cube.tile_group(ids[sel[0]]), mode="r", zarr_format=3)
            members = set(g.keys())
            missing = [m for m in mods if not {m, f"{m}_mask", f"{m}_valid", f"time_{m}"} <= members]
            if missing and modalities is not None:
                raise ValueError(f"the cube {cube} holds no {missing} arrays")
            mods = tuple(m for m in mods if m not in missing)
        if labels is not None:
            labels = str(labels)
            if "://" not in labels and not labels.startswith("/vsi"):
                labels = str(Path(labels).resolve())
            open_label_raster(labels).close()  # fail on the driver, before any task starts
        size = cfg.grid.size_px
        ys = window_origins(size, window, stride)
        self._spec = _Spec(
            cube=cube,
            modalities=mods,
            size=size,
            hr_ratio=cfg.hr_ratio,
            ys=tuple(ys),
            xs=tuple(ys),
            window=size if window is None else window,
            labels=labels,
            min_valid=float(min_valid),
        )
        self._times = {"hr": cfg.t_hr, "s2": cfg.t_s2, "s1": cfg.t_s1}
        self._tiles = [(ids[i], float(lat[i]), float(lon[i])) for i in sel]
        self._index = (pos, lat, lon)  # every tile of the cube, for read_tile
        self._tiles_per_task = tiles_per_task
        self._shuffle = shuffle

    # -- what the dataset will hold -------------------------------------------------------------------------
    @property
    def tiles(self) -> list[str]:
        return [t for t, _, _ in self._tiles]

    @property
    def modalities(self) -> tuple[str, ...]:
        return self._spec.modalities

    @property
    def hr_ratio(self) -> int:
        return self._spec.hr_ratio

    @property
    def windows(self) -> list[tuple[int, int]]:
        """(y0, x0) of every window of a tile, in row order (the same for every tile of the cube)."""
        return self._spec.windows

    @property
    def window_size(self) -> int:
        return self._spec.window

    def num_rows(self) -> int:
        """Rows of the dataset (an upper bound with ``min_valid`` > 0)."""
        return len(self._tiles) * len(self._spec.windows)

    def row_bytes(self) -> int:
        """In-memory bytes of one row (the arrays; the few scalars are rounded up)."""
        s = self._spec
        total = 96  # tile_id, y0, x0, lat, lon
        for m in s.modalities:
            t, side = self._times[m], s.window * (s.hr_ratio if m == "hr" else 1)
            total += t * _BANDS[m] * side * side * 4 + t * side * side + t * (1 + 8)
        if s.labels:
            total += (s.window * s.hr_ratio) ** 2 + s.window**2
        return int(total)

    def read_tile(self, tile_id: str) -> dict[str, np.ndarray] | None:
        """One tile's rows, read here (no Ray task), as a numpy batch; any tile of the cube's index, not only those
        of ``tiles`` (None when ``min_valid`` drops every window). For a process that reads tile after tile, such
        as an inference actor: the cube's index was read once, when this datasource was made, where a new
        datasource per tile reads the whole index (every tile's id) each time (at 10,000 tiles ~50 % of a small
        tile's inference). Raises ``ValueError`` for a tile not in the index and ``CubeError`` for one not
        (completely) written."""
        pos, lat, lon = self._index
        i = pos.get(tile_id)
        if i is None:
            raise ValueError(f"tile {tile_id} is not in the index of {self._spec.cube}")
        label_src = open_label_raster(self._spec.labels) if self._spec.labels else None
        try:
            return _read_tile(self._spec, tile_id, float(lat[i]), float(lon[i]), label_src)
        finally:
            if label_src is not None:
                label_src.close()

    # -- the Datasource interface (Ray 2.60) -----------------------------------------------------------------
    def get_name(self) -> str:
        return "Cube"

    def estimate_inmemory_data_size(self) -> int | None:
        return self.num_rows() * self.row_bytes()

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        n = len(self._tiles)
        if n == 0:
            return []
        order = np.random.default_rng().permutation(n) if self._shuffle else np.arange(n)
        n_tasks = math.ceil(n / self._tiles_per_task)
        if parallelism is not None and parallelism > 0:
            n_tasks = min(n_tasks, parallelism)
        spec, per_tile = self._spec, len(self._spec.windows)
        row_bytes = self.row_bytes()
        tasks = []
        for part in np.array_split(order, n_tasks):
            group = [self._tiles[i] for i in part]
            rows = len(group) * per_tile
            size_bytes = int(rows * row_bytes)  # an upper bound when min_valid drops windows

            def read_fn(group=group) -> Iterator[Block]:
                return _read_group(spec, group)

            if spec.min_valid > 0:
                rows = None  # unknown until read: windows below min_valid are dropped
            meta = BlockMetadata(num_rows=rows, size_bytes=size_bytes, exec_stats=None, input_files=None)
            tasks.append(ReadTask(read_fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks


class IdleBackoff(ExecutionCallback):
    """Ray Data execution callback: a 20 ms sleep after every scheduling-loop step in which nothing moved (no
    input taken, no task submitted or finished, no output produced or taken by the consumer).

    Ray 2.60's streaming executor blocks (``ray.wait``, 0.1 s) only on tasks that are still running. When every
    operator is backpressured by a slow consumer -- a training loop, an inference actor -- and the finished
    tasks' outputs may not be read yet, ``ray.wait`` returns at once and the loop spins: we measured the
    ``SplitCoordinator`` of a pretraining run at 55-100 % of a core on a 2-core machine, next to the trainer
    (bench/pretrain.py). The sleep adds at most 20 ms of latency when data does arrive."""

    SLEEP_S = 0.02

    def __init__(self) -> None:
        self._last: tuple | None = None

    @staticmethod
    def _signature(topology) -> tuple:
        sig = []
        for op in topology:
            m = op.metrics
            sig.append((m.num_inputs_received, m.num_tasks_submitted, m.num_tasks_finished,
                        m.num_task_outputs_generated, m.num_outputs_taken, m.num_external_outqueue_blocks))
        return tuple(sig)

    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None)  # private in 2.60; without it we do nothing
        if not topology:
            return
        try:
            sig = self._signature(topology)
        except AttributeError:  # another Ray version's metrics: no back-off rather than a broken dataset
            return
        if sig == self._last:
            time.sleep(self.SLEEP_S)
        self._last = sig


def quiet_data_context(progress_bars: bool = False) -> None:
    """Ray Data's progress bars off (unless ``progress_bars``) and :class:`IdleBackoff` installed, in this
    process's current DataContext: what every pipeline over the cube wants on a small machine."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    if IdleBackoff not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(IdleBackoff)


def until(batch: Mapping[str, np.ndarray], until_doy: int | None) -> dict[str, np.ndarray]:
    """A cube batch whose dates after ``until_doy`` (day of year) are marked invalid: what an as-of product (a
    flood map on the event date) may use. The cube's series is one calendar year, so day order is time order."""
    out = dict(batch)
    if until_doy is None:
        return out
    for m in MODALITIES:
        if f"{m}_valid" in out:
            out[f"{m}_valid"] = np.asarray(out[f"{m}_valid"]) & (np.asarray(out[f"{m}_doy"]) <= until_doy)
    return out


def read_cube(
    cube: str | Path,
    *,
    num_cpus: float = 0.25,
    memory: float | None = None,
    override_num_blocks: int | None = None,
    ray_remote_args: Mapping[str, Any] | None = None,
    progress_bars: bool = False,
    concurrency: int | None = None,
    **datasource_kwargs,
) -> ray.data.Dataset:
    """``ray.data.read_datasource(CubeDatasource(cube, **datasource_kwargs))`` with fractional CPUs per read
    task (on small machines whole CPUs starve the training or inference stage: shared/research/ray.md).

    Ray Data's progress bars are off unless ``progress_bars``: the jobs log their own progress per step or
    tile, and the bars (re-drawn per epoch and per consumer) bury it in job logs. ``concurrency``: read tasks
    at once at most (default: as many as the CPUs allow); each one running may hold its own worker process."""
    quiet_data_context(progress_bars)
    source = CubeDatasource(cube, **datasource_kwargs)
    return ray.data.read_datasource(
        source,
        num_cpus=num_cpus,
        memory=memory,
        override_num_blocks=override_num_blocks,
        ray_remote_args=dict(ray_remote_args) if ray_remote_args else None,
        concurrency=concurrency,
    )


def _tensor(x, dtype: torch.dtype) -> torch.Tensor:
    import torch

    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if arr.dtype == object:  # per-row arrays that were not stacked (e.g. from iter_rows)
            arr = np.stack([np.asarray(a) for a in arr])
        if not arr.flags.writeable or not arr.flags.c_contiguous:  # Arrow-backed batches are read-only
            arr = np.array(arr, order="C")
        t = torch.from_numpy(arr)
    if dtype == torch.bool and t.dtype != torch.bool:
        return t != 0
    if dtype == torch.int64 and t.is_floating_point():
        return t.round().to(torch.int64)
    return t.to(dtype)


def rows_to_input(
    batch: Mapping[str, np.ndarray | torch.Tensor], modalities: Sequence[str] | None = None
) -> tuple[SkySenseInput, torch.Tensor | None]:
    """Collate a batch of cube rows into the model's input and the HR label tensor.

    batch: column -> (B, ...) arrays, as ``Dataset.iter_batches(batch_format="numpy")`` yields them, or
        tensors as ``iter_torch_batches`` yields them (that one cannot convert the string ``tile_id`` column:
        drop it first, ``ds.drop_columns(["tile_id"])``, or use ``collate_fn=CollateToInput()``). Any dtypes:
        data becomes float32, ``*_valid``/``*_mask`` bool, ``*_doy`` and labels int64.
    modalities: which to use (default every modality in the batch); one asked for but absent is a KeyError.
    Returns ``(SkySenseInput, labels)``: labels (B, H*r, W*r) int64 (255 = nodata) when the batch has
    ``labels``, else None. Tensors stay on the device they came on.
    """
    import torch

    from skysense_core.inputs import ModalityInput, SkySenseInput

    present = [m for m in MODALITIES if m in batch]
    if modalities is None:
        mods = present
    else:
        mods = list(modalities)
        missing = [m for m in mods if m not in batch]
        if missing:
            raise KeyError(f"the batch holds no {missing} (it has {present})")
    if not mods:
        raise ValueError(f"the batch holds none of {MODALITIES} (columns: {sorted(batch)})")
    kw: dict[str, Any] = {}
    for m in mods:
        kw[m] = ModalityInput(
            data=_tensor(batch[m], torch.float32),
            valid=_tensor(batch[f"{m}_valid"], torch.bool),
            doy=_tensor(batch[f"{m}_doy"], torch.int64),
            mask=_tensor(batch[f"{m}_mask"], torch.bool) if f"{m}_mask" in batch else None,
        )
    for k in ("lat", "lon"):
        kw[k] = _tensor(batch[k], torch.float32) if k in batch else None
    labels = _tensor(batch["labels"], torch.int64) if "labels" in batch else None
    return SkySenseInput(**kw), labels


class CollateToInput(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=CollateToInput(device=...))``: batches arrive as
    ``(SkySenseInput, labels | None)`` (:func:`rows_to_input`) on ``device`` (default CPU; Ray does not move
    a custom type itself, so in Ray Train pass ``ray.train.torch.get_device()``). The ``tile_id`` column is
    ignored, so the dataset need not drop it."""

    def __init__(self, modalities: Sequence[str] | None = None, device: Any = None):
        self.modalities = None if modalities is None else tuple(modalities)
        self.device = device

    def __call__(self, batch: Mapping[str, np.ndarray]) -> tuple[SkySenseInput, torch.Tensor | None]:
        x, y = rows_to_input(batch, self.modalities)
        if self.device is not None:
            x = x.to(self.device)
            y = None if y is None else y.to(self.device)
        return x, y
