"""Pretraining on Ray: Ray Data streams the cube to a Ray Train ``TorchTrainer`` (SkySense stage 1 / stage 2).

    result = run_pretraining(PretrainJobConfig(cube="demo.zarr", preset="tiny", stage=1, steps=200,
                                               batch_size=8, workers=2, out="runs"))

The data path (driver): ``pipeline.datasource.read_cube`` -> one row per ``window``-px window of every done tile
(fractional CPUs); for stage 1 a ``map_batches`` stage on a pool of CPU actors (:class:`ViewMaker`, one per train
worker at most) draws the multi-crop views
(``skysense_core.augment.make_views``, the pretrainer's recipe) and flattens them into numpy columns
(:func:`views_to_columns`), so the training loop only decodes them (:func:`columns_to_views`) and never augments.
Stage 2 reads the label raster reprojected onto the HR grid by the datasource (``labels=``).

The loop (:func:`train_loop_per_worker`, one per Ray Train worker): the model from the preset, the stage-1
``SkySensePretrainer`` (EMA teacher, DINO heads, geo prototypes updated inside forward) or the stage-2
``SemanticPretrainer``, wrapped by ``ray.train.torch.prepare_model`` (DDP over gloo on CPU, NCCL on GPU, with
``broadcast_buffers=False``: the geo-context bank and the DINO centres are kept identical on every rank by the
all-reduces inside their updates, which we verify at every checkpoint, instead of broadcasting the bank -- 1.7 GB
for ``huge`` -- on every forward); bf16 autocast on GPU only; AdamW with a linear warm-up and a cosine decay.
It pulls its shard with ``get_dataset_shard("train")`` and cycles epochs until ``steps``.

Checkpoints: every ``checkpoint_every`` steps and at the end, rank 0 writes ``weights.safetensors`` (student,
teacher, heads incl. the DINO centres, via ``skysense_core.checkpoint.save_checkpoint``) and ``train_state.pt``
(optimizer, scheduler, step, epoch, data position, RNG states, DINO centres), and every rank calls
``ray.train.report`` (rank 0 with the checkpoint). At start ``ray.train.get_checkpoint()`` resumes. Ray Train V2
restarts the worker group from the last checkpoint after a worker dies (``FailureConfig(max_failures)``), and a
run re-submitted with the same ``name`` and ``out`` continues from its last checkpoint up to the requested total
``steps`` (a finished run with the same ``steps`` does no step and only re-exports).

Run directory ``<out>/<name>/``: Ray's ``checkpoint_*`` directories and run snapshot, ``metrics.csv`` (one row per
step, rows after the resumed checkpoint dropped on resume), ``loss_curve.png``, ``model.safetensors`` (final
weights: student as ``model.``, teacher, heads) and ``model_card.json``.

The data position is recorded (epoch, batches into the epoch) but not replayed: a resumed run starts a new pass
over the data. Ray Data's streaming order is not reproducible across executions (tasks finish in any order,
tiles are shuffled per epoch, views are random), so "the same next batch" does not exist to resume at.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.ingest import init_ray
from pipeline.labels import label_classes

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.csv"
CURVE = "loss_curve.png"
MODEL = "model.safetensors"
CARD = "model_card.json"

# [ours] The ``tiny`` preset is for CPU tests and the demo: DINO heads and crops cut to match.
TINY_PRETRAIN = {"head_dim": 512, "head_hidden": 256, "head_bottleneck": 64, "max_pixels": 1024, "n_local": 2}


@dataclass
class PretrainJobConfig:
    """One pretraining run.

    cube: the Zarr cube (``jobs/ingest.py``). preset: model preset (``tiny`` .. ``huge``). stage: 1 (SkySense
    self-distillation) or 2 (SkySense++ masked semantic learning on labels). steps: total optimiser steps of the
    run (a resumed run stops there too). batch_size: global batch (split over ``workers``). gpu: one GPU per worker.
    out: the storage path; the run lives in ``out/name``. lr: peak AdamW learning rate, reached after ``warmup``
    steps, then cosine to 0. window: training window side in S2 pixels (a multiple of 4; default 16, or the tile
    side rounded down to a multiple of 4 if smaller). labels: label raster for stage 2 (default: the demo region's
    ``truth/landcover_hr.tif`` next to the cube's catalog). num_classes: default from the raster's class names.
    init: safetensors checkpoint to initialise the model from (e.g. stage-1 weights for stage 2) when the run has
    no checkpoint yet. model_overrides / pretrain_overrides: ``ModelConfig`` / ``PretrainConfig`` fields
    (``n_local`` / ``n_global`` go into its ``AugmentConfig``). cpus_per_worker: Ray CPUs per train worker
    (default 0.5 on small clusters, else 1). data_cpus: Ray CPUs per read / view task. views_on_data_workers: make
    stage-1 views in Ray Data (default) or in the loop. shuffle_buffer: rows of the local shuffle buffer each
    worker draws its batches from (a tile's windows arrive together; this mixes tiles within a batch; 0: off).
    min_valid: windows with less data coverage than this fraction are not trained on (``CubeDatasource``).
    data_buffer_mb: object-store budget of the training data stream, so the data workers run at most this far
    ahead of the loop instead of making a whole epoch of views up front and taking the trainer's CPU while they
    do. write_pids: test hook, each rank writes ``pids/rank<r>.pid``. objective: ``pretrain`` (the stage's
    self-supervised objective) or ``segment`` (supervised fine-tuning on ``labels``,
    ``skysense_core.segmentation.SegmentationFinetuner``: ``train_parts`` fusion | all, the head reading the
    pixel feature set ``features``); tiles: train on these tiles only (default: every done tile).
    """

    cube: str
    preset: str = "tiny"
    stage: int = 1
    steps: int = 100
    batch_size: int = 8
    workers: int = 1
    gpu: bool = False
    out: str = "runs"
    name: str | None = None
    lr: float | None = None  # default: 5e-4 [ours] (stage 1, fine-tuning), 2e-4 (stage 2, official)
    weight_decay: float = 0.04
    warmup: int = 10
    checkpoint_every: int = 50
    window: int | None = None
    labels: str | None = None
    num_classes: int | None = None
    seed: int = 0
    init: str | None = None
    model_overrides: dict = field(default_factory=dict)
    pretrain_overrides: dict = field(default_factory=dict)
    max_failures: int = 3
    cpus_per_worker: float | None = None
    data_cpus: float = 0.25
    views_on_data_workers: bool = True
    grad_clip: float | None = None  # default: 3.0 [ours] (stage 1, fine-tuning), 5.0 (stage 2, official)
    shuffle_buffer: int = 64
    min_valid: float = 0.5
    data_buffer_mb: float = 512.0
    write_pids: bool = False
    layer_decay: float = 0.7  # stage 2: layer-wise lr decay (skysense_core.semantic.STAGE2_RECIPE)
    objective: str = "pretrain"
    train_parts: str = "fusion"
    features: str = "dates"
    tiles: list[str] | None = None

    @property
    def self_distillation(self) -> bool:
        """SkySense stage 1: EMA teacher, views."""
        return self.objective == "pretrain" and self.stage == 1

    @property
    def supervised(self) -> bool:
        """Reads labels: stage 2, or supervised fine-tuning."""
        return not self.self_distillation

    @property
    def run_name(self) -> str:
        return self.name or f"{self.preset}-stage{self.stage}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out).resolve() / self.run_name

    @property
    def per_worker_batch(self) -> int:
        return max(1, self.batch_size // max(1, self.workers))


# ------------------------------------------------------------------------------------------------------------------
# configuration helpers
# ------------------------------------------------------------------------------------------------------------------
def pretrain_config(preset: str, overrides: dict | None = None):
    """The stage-1 ``PretrainConfig``: defaults, the ``tiny`` cut-downs, then ``overrides``."""
    from skysense_core.augment import AugmentConfig
    from skysense_core.pretrain import PretrainConfig

    kw = dict(TINY_PRETRAIN) if preset == "tiny" else {}
    kw.update(overrides or {})
    aug_fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    aug = {k: kw.pop(k) for k in list(kw) if k in aug_fields}
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    bad = sorted(set(kw) - known)
    if bad:
        raise ValueError(f"unknown pretraining settings {bad}; known: {sorted(known | aug_fields)}")
    for k, v in kw.items():
        if isinstance(v, list):
            kw[k] = tuple(v)
    return PretrainConfig(**kw, augment=AugmentConfig(**aug))


def augment_config(preset: str, hr_ratio: int, model_overrides: dict | None, pretrain_overrides: dict | None):
    """The view recipe the stage-1 pretrainer uses (``SkySensePretrainer.augment_config``), computed without
    allocating the model (built on the meta device)."""
    from skysense_core import get_config
    from skysense_core.pretrain import SkySensePretrainer

    mc = get_config(preset, hr_ratio=hr_ratio, **(model_overrides or {}))
    pc = pretrain_config(preset, pretrain_overrides)
    # the method reads only the student's config and the recipe: a stand-in with those two is enough
    return SkySensePretrainer.augment_config(SimpleNamespace(student=SimpleNamespace(cfg=mc), cfg=pc))


@dataclass
class CubeInfo:
    path: str
    hr_ratio: int
    tile_side: int
    tiles_done: int
    start: str | None
    end: str | None
    catalog: str | None


def cube_info(cube: str | Path) -> CubeInfo:
    """What the run needs to know about the cube (raises ``zarr_cube.CubeError`` if there is none)."""
    from pipeline import zarr_cube

    root = zarr_cube.open_cube(cube)
    cc = zarr_cube.cube_config(root)
    status = root["index/status"][:]
    search = dict(root.attrs.get("search", {}))
    return CubeInfo(
        path=str(Path(cube).resolve()), hr_ratio=int(cc.hr_ratio), tile_side=int(cc.grid.tile_px + 2 * cc.grid.halo_px),
        tiles_done=int((status == zarr_cube.DONE).sum()), start=search.get("start"), end=search.get("end"),
        catalog=search.get("catalog"),
    )


def default_labels(info: CubeInfo) -> str | None:
    """The demo region's land-cover truth for a cube made from a demo catalog, else None."""
    if not info.catalog:
        return None
    cat = Path(info.catalog)
    root = cat.parent if cat.suffix == ".json" else cat
    for name in ("landcover_hr.tif", "landcover_10m.tif"):
        p = root / "truth" / name
        if p.exists():
            return str(p)
    return None


def resolve_config(cfg: PretrainJobConfig) -> tuple[PretrainJobConfig, CubeInfo]:
    """Check the settings and fill the defaults that depend on the cube. Raises ``ValueError`` (bad input) or
    ``zarr_cube.CubeError`` (no cube)."""
    if cfg.stage not in (1, 2):
        raise ValueError(f"--stage must be 1 or 2, not {cfg.stage}")
    if cfg.objective not in ("pretrain", "segment"):
        raise ValueError(f"objective must be 'pretrain' or 'segment', not {cfg.objective!r}")
    for name in ("steps", "batch_size", "workers", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.batch_size < cfg.workers:
        raise ValueError(f"the global batch {cfg.batch_size} is smaller than the {cfg.workers} workers")
    if not 0.0 <= cfg.min_valid <= 1.0:
        raise ValueError(f"min_valid must be a fraction in [0, 1], got {cfg.min_valid}")
    if cfg.init:  # a bad --init fails here, before Ray starts, not in every worker
        from pipeline.inference import encoder_config

        if not Path(cfg.init).is_file():
            raise ValueError(f"--init {cfg.init} does not exist")
        try:
            init_cfg, _ = encoder_config(cfg.init)
        except ValueError as e:
            raise ValueError(f"--init: {e} (only SkySense safetensors checkpoints are read; a pickle never is)") \
                from None
        if init_cfg.name != cfg.preset:
            raise ValueError(f"--init {cfg.init} holds a {init_cfg.name!r} model, not the --preset {cfg.preset!r}")
    official2 = cfg.objective == "pretrain" and cfg.stage == 2
    if cfg.lr is None or cfg.grad_clip is None:
        from skysense_core.semantic import STAGE2_RECIPE

        lr, clip = (STAGE2_RECIPE["lr"], STAGE2_RECIPE["grad_clip"]) if official2 else (5e-4, 3.0)
        cfg = dataclasses.replace(cfg, lr=lr if cfg.lr is None else cfg.lr,
                                  grad_clip=clip if cfg.grad_clip is None else cfg.grad_clip)
    if cfg.warmup < 0 or cfg.lr <= 0:
        raise ValueError("lr must be positive and warmup non-negative")
    if not Path(cfg.cube).exists():
        raise ValueError(f"no cube at {cfg.cube}")
    from skysense_core import get_config

    get_config(cfg.preset)  # unknown preset -> ValueError
    info = cube_info(cfg.cube)
    if info.tiles_done == 0:
        raise ValueError(f"cube {cfg.cube} has no done tile")
    out = dataclasses.replace(cfg, cube=info.path, out=str(Path(cfg.out).resolve()), name=cfg.run_name)
    if out.window is None:
        out.window = 16 if info.tile_side >= 16 else info.tile_side // 4 * 4
    if out.window < 4 or out.window % 4 or out.window > info.tile_side:
        raise ValueError(f"--window must be a multiple of 4 between 4 and the tile side {info.tile_side}, "
                         f"got {out.window}")
    try:
        get_config(cfg.preset, hr_ratio=info.hr_ratio, **cfg.model_overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model settings do not fit the cube (HR ratio {info.hr_ratio}): {e}") from None
    if out.self_distillation:
        pretrain_config(out.preset, out.pretrain_overrides)  # unknown settings -> ValueError
    else:
        if out.labels is None:
            out.labels = default_labels(info)
        if out.labels is None:
            raise ValueError("stage 2 and fine-tuning need --labels (a label raster); this cube's catalog has no "
                             "demo truth")
        if not Path(out.labels).exists():
            raise ValueError(f"no label raster at {out.labels}")
        out.labels = str(Path(out.labels).resolve())
        if out.num_classes is None:
            out.num_classes = label_classes(out.labels)
        if out.num_classes is None:
            raise ValueError(f"cannot tell the classes of {out.labels}: give --num-classes")
    if out.init is not None and not Path(out.init).exists():
        raise ValueError(f"no checkpoint at {out.init}")
    return out, info


# ------------------------------------------------------------------------------------------------------------------
# views on the data workers
# ------------------------------------------------------------------------------------------------------------------
def views_to_columns(views) -> dict[str, np.ndarray]:
    """Views (``skysense_core.augment.View``) -> flat numpy columns, one row per sample:
    ``view<i>_<m>`` (T, C, H, W) float32, ``view<i>_<m>_valid`` (T,) uint8, ``view<i>_<m>_doy`` (T,) int16,
    ``view<i>_<m>_mask`` (T, h, w) uint8 (a view without a mask gets the valid flags broadcast), ``view<i>_theta``
    (2, 3) float32, ``view<i>_global`` uint8; ``lat``, ``lon`` float64."""
    cols: dict[str, np.ndarray] = {}
    for i, v in enumerate(views):
        inp = v.input
        b = inp.batch_size
        for m in inp.modalities:
            mi = getattr(inp, m)
            t, _, h, w = mi.data.shape[1:]
            mask = mi.mask if mi.mask is not None else mi.valid[:, :, None, None].expand(b, t, h, w)
            cols[f"view{i}_{m}"] = mi.data.detach().float().cpu().numpy()
            cols[f"view{i}_{m}_valid"] = mi.valid.cpu().numpy().astype(np.uint8)
            cols[f"view{i}_{m}_doy"] = mi.doy.cpu().numpy().astype(np.int16)
            cols[f"view{i}_{m}_mask"] = mask.cpu().numpy().astype(np.uint8)
        cols[f"view{i}_theta"] = v.theta.detach().float().cpu().numpy()
        cols[f"view{i}_global"] = np.full(b, int(v.is_global), np.uint8)
    if views and views[0].input.lat is not None:
        cols["lat"] = views[0].input.lat.cpu().numpy().astype(np.float64)
        cols["lon"] = views[0].input.lon.cpu().numpy().astype(np.float64)
    return cols


def columns_to_views(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> list:
    """The inverse of :func:`views_to_columns` (tensors on ``device``)."""
    from skysense_core.augment import View
    from skysense_core.inputs import MODALITIES, ModalityInput, SkySenseInput

    n = 1 + max(int(k[4:].split("_", 1)[0]) for k in batch if k.startswith("view") and k.endswith("_theta"))
    lat = torch.as_tensor(batch["lat"], dtype=torch.float64).to(device) if "lat" in batch else None
    lon = torch.as_tensor(batch["lon"], dtype=torch.float64).to(device) if "lon" in batch else None
    views = []
    for i in range(n):
        kw = {}
        for m in MODALITIES:
            key = f"view{i}_{m}"
            if key not in batch:
                continue
            kw[m] = ModalityInput(
                data=torch.as_tensor(batch[key]).to(device),
                valid=torch.as_tensor(batch[f"{key}_valid"]).bool().to(device),
                doy=torch.as_tensor(batch[f"{key}_doy"]).long().to(device),
                mask=torch.as_tensor(batch[f"{key}_mask"]).bool().to(device),
            )
        views.append(View(input=SkySenseInput(**kw, lat=lat, lon=lon),
                          theta=torch.as_tensor(batch[f"view{i}_theta"]).to(device),
                          is_global=bool(np.asarray(batch[f"view{i}_global"]).reshape(-1)[0])))
    return views


def make_view_columns(batch: dict[str, np.ndarray], *, hr_ratio: int, augment, modalities=None) -> dict:
    """Ray Data ``map_batches`` UDF (numpy batches in, numpy columns out): cube rows -> stage-1 views."""
    from pipeline.datasource import rows_to_input
    from skysense_core.augment import make_views

    torch.set_num_threads(1)
    inp, _ = rows_to_input(batch, modalities)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 2)  # new views every epoch
    with torch.no_grad():
        views = make_views(inp, hr_ratio, augment, gen)
    cols = views_to_columns(views)
    if "tile_id" in batch:
        cols["tile_id"] = np.asarray(batch["tile_id"])
    return cols


class ViewMaker:
    """:func:`make_view_columns` as a Ray Data actor: the actor imports torch and the model package once and
    keeps them, where a task per batch pays the imports, a worker start and a scheduling round trip each time
    (on 2 cores we measured 20 s of latency per view task that way; bench/pretrain.py)."""

    def __init__(self, hr_ratio: int, augment, modalities=None):
        self.kw = {"hr_ratio": hr_ratio, "augment": augment, "modalities": modalities}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return make_view_columns(batch, **self.kw)


# ------------------------------------------------------------------------------------------------------------------
# the training loop
# ------------------------------------------------------------------------------------------------------------------
def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return f


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _heads_module(module) -> torch.nn.Module | None:
    """Everything of the pretrainer that is neither student nor teacher (DINO heads, projections, centres)."""
    from skysense_core.pretrain import SkySensePretrainer

    if isinstance(module, SkySensePretrainer):
        return torch.nn.ModuleDict({"student_heads": module.student_heads, "teacher_heads": module.teacher_heads,
                                    "align_proj": module.align_proj, "losses": module.losses})
    if hasattr(module, "classifier"):  # SegmentationFinetuner: its training head
        return torch.nn.ModuleDict({"norm": module.norm, "classifier": module.classifier})
    return None


def _student(module):
    return module.student if hasattr(module, "student") else module.model


def _teacher(module):
    return getattr(module, "teacher", None)


def _load_weights(module, path: Path, partial: bool = False) -> None:
    """Student (+ teacher, + heads where the checkpoint and the module have them) from our safetensors file.
    ``partial``: an init checkpoint from another stage (heads and teacher optional)."""
    from skysense_core.checkpoint import read_checkpoint

    _, parts, _ = read_checkpoint(path)
    _student(module).load_state_dict(parts["model"])
    teacher = _teacher(module)
    if teacher is not None:
        if parts["teacher"]:
            res = teacher.load_state_dict(parts["teacher"], strict=False)
            bad = [k for k in res.missing_keys if not k.startswith("glbank.")] + list(res.unexpected_keys)
            if bad:
                raise KeyError(f"teacher weights do not fit: {bad[:5]}")
        elif partial:  # a stage-2 file: the teacher starts as a copy of the student
            teacher.load_state_dict({k: v for k, v in parts["model"].items() if not k.startswith("glbank.")},
                                    strict=False)
    heads = _heads_module(module)
    if heads is not None and parts["heads"]:
        heads.load_state_dict(parts["heads"], strict=not partial)


def _dino_centres(module) -> dict[str, torch.Tensor]:
    losses = getattr(module, "losses", None)
    return {k: v.center.detach().cpu().clone() for k, v in losses.items()} if losses is not None else {}


def _replica_digest(module) -> torch.Tensor:
    """A few float64 sums that differ when the student, the teacher, the geo bank or the DINO centres of two
    ranks differ."""
    parts = []
    for mod in (_student(module), _teacher(module)):
        if mod is None:
            continue
        params = [p.detach().double() for n, p in mod.named_parameters() if not n.startswith("glbank.")]
        parts.append(torch.stack([p.sum() for p in params]).sum() if params else torch.zeros((), dtype=torch.float64))
        parts.append(torch.stack([p.abs().sum() for p in params]).sum() if params
                     else torch.zeros((), dtype=torch.float64))
    bank = getattr(_student(module), "glbank", None)
    if bank is not None:
        parts += [bank.prototypes.detach().double().sum(), bank.prototypes.detach().double().abs().sum()]
    for c in _dino_centres(module).values():
        parts.append(c.double().sum())
    return torch.stack([p.cpu() for p in parts])


def replicas_identical(module) -> bool:
    """True when every rank holds the same student, teacher, geo bank and DINO centres (one all-reduce of a few
    numbers; always True without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return True
    d = _replica_digest(module)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    lo, hi = d.to(dev), d.clone().to(dev)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


class _MetricsLog:
    """``metrics.csv`` in the run directory, written by rank 0: one row per step. On resume the rows after the
    resumed step (written before a crash) are dropped, so that the file holds one row per step."""

    BASE = ["step", "epoch", "resumed_from", "loss"]
    TAIL = ["lr", "samples_per_s", "step_s", "time"]

    def __init__(self, path: Path, resumed_step: int):
        self.path = path
        self.header: list[str] | None = None
        if path.exists():
            with path.open() as f:
                rows = list(csv.reader(f))
            if rows:
                self.header = rows[0]
                keep = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= resumed_step]
                tmp = path.with_suffix(".tmp")
                with tmp.open("w", newline="") as f:
                    csv.writer(f).writerows([self.header, *keep])
                tmp.replace(path)

    def write(self, row: dict[str, Any]) -> None:
        if self.header is None:
            terms = sorted(k for k in row if k.startswith("loss/"))
            self.header = self.BASE + terms + self.TAIL
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.header)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.header])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """``metrics.csv`` as a list of dicts of floats (empty cells left out)."""
    with Path(path).open() as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def plot_losses(metrics_csv: str | Path, png: str | Path, title: str = "") -> Path:
    """The loss curve (total bold, every term thin) against the step, with the learning rate below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    keys = sorted({k for r in rows for k in r if k.startswith("loss/")})
    steps = [r["step"] for r in rows]
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=0.8, alpha=0.7, label=k.removeprefix("loss/"))
    ax.plot(steps, [r.get("loss", float("nan")) for r in rows], lw=2.2, color="black", label="loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(title)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="tab:blue")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png.with_suffix(".tmp.png"), dpi=110)
    plt.close(fig)
    png.with_suffix(".tmp.png").replace(png)
    return png


def _progress_line(step: int, total: int, epoch: int, logs: dict, sps: float, lr: float) -> str:
    terms = " ".join(f"{k.removeprefix('loss/')}={v:.3g}" for k, v in sorted(logs.items())
                     if k.startswith("loss/"))
    return (f"[pretrain] step {step}/{total} epoch {epoch} loss {logs.get('loss', float('nan')):.4f} | {terms} | "
            f"{sps:.2f} samples/s | lr {lr:.3e}")


def numpy_rng_state(state: dict | None = None):
    """NumPy's global RNG state as plain Python data (the Mersenne Twister key as a list of ints), which
    ``torch.load(weights_only=True)`` reads; with ``state``, the reverse (what ``np.random.set_state`` takes)."""
    if state is None:
        name, key, pos, has_gauss, gauss = np.random.get_state()
        return {"name": str(name), "key": [int(k) for k in key], "pos": int(pos), "has_gauss": int(has_gauss),
                "gauss": float(gauss)}
    return (state["name"], np.asarray(state["key"], np.uint32), state["pos"], state["has_gauss"], state["gauss"])


def load_train_state(path: Path) -> dict:
    """A checkpoint's optimiser, schedule, RNG and progress state, read with ``weights_only=True``: tensors and
    plain Python data only, so a file planted in a shared run directory cannot run code in the workers. A state
    that needs more (a checkpoint written before this rule) is refused with a clear error."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects other than tensors and plain data, and is not loaded (it could "
                         f"run code): resume from a checkpoint this version wrote, or start a new run "
                         f"({str(e).splitlines()[0]})") from None


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function. ``config``: ``job`` (a :class:`PretrainJobConfig` as dict), ``hr_ratio``,
    ``modalities``, ``data`` (cube facts for the model card)."""
    import ray.train
    import ray.train.torch

    from skysense_core import build_model
    from skysense_core.checkpoint import save_checkpoint
    from skysense_core.pretrain import SkySensePretrainer, teacher_momentum
    from skysense_core.semantic import SemanticPretrainer

    cfg = PretrainJobConfig(**config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(cfg.out) / cfg.run_name
    if cfg.write_pids:
        (run_dir / "pids").mkdir(parents=True, exist_ok=True)
        (run_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))
    say = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda"

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg.preset, hr_ratio=config["hr_ratio"], **cfg.model_overrides)
    if cfg.objective == "segment":
        from skysense_core.segmentation import SegmentationFinetuner

        module = SegmentationFinetuner(model, cfg.num_classes, cfg.train_parts, cfg.features,
                                       tuple(config.get("modalities") or model.cfg.modalities))
    elif cfg.stage == 1:
        module = SkySensePretrainer(model, pretrain_config(cfg.preset, cfg.pretrain_overrides))
    else:
        module = SemanticPretrainer(model)

    ckpt = ray.train.get_checkpoint()
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _load_weights(module, Path(d) / WEIGHTS)
            state = load_train_state(Path(d) / TRAIN_STATE)
        say(f"[pretrain] resumed from checkpoint at step {state['step']} (epoch {state['epoch']})")
    elif cfg.init:
        _load_weights(module, Path(cfg.init), partial=True)
        say(f"[pretrain] initialised from {cfg.init}")

    wrapped = ray.train.torch.prepare_model(
        module, parallel_strategy_kwargs={"broadcast_buffers": False, "find_unused_parameters": True}
    )
    module = getattr(wrapped, "module", wrapped)
    if cfg.objective == "pretrain" and cfg.stage == 2:  # the official stage-2 recipe: freezing + layer decay
        from skysense_core.semantic import stage2_param_groups

        groups = stage2_param_groups(module.model, cfg.weight_decay, {"layer_decay": cfg.layer_decay})
        in_model = {id(p) for p in module.model.parameters()}
        for g in _param_groups(module, cfg.weight_decay):  # the trainer's own parameters (none today)
            g["params"] = [p for p in g["params"] if id(p) not in in_model]
            groups += [g] if g["params"] else []
        for g in groups:
            g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
    else:
        groups = _param_groups(module, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.steps))
    step, epoch, samples = 0, 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sched.lr_lambdas = [lr_lambda(cfg.warmup, cfg.steps)] * len(opt.param_groups)  # the new total, if changed
        step, epoch, samples = int(state["step"]), int(state["epoch"]), int(state.get("samples", 0))
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(numpy_rng_state(state["rng"]["numpy"]))
        random.setstate(state["rng"]["python"])
    resumed_from = step
    metrics_log = _MetricsLog(run_dir / METRICS, step) if rank == 0 else None
    param_list = [p for p in module.parameters() if p.requires_grad]
    wrapped.train()

    def checkpoint(logs: dict, batch_in_epoch: int) -> None:
        synced = replicas_identical(module)
        if not synced:
            print(f"[pretrain] WARNING rank {rank}: replicas differ at step {step} (model, geo bank or centres)",
                  flush=True)
        metrics = {"step": step, "epoch": epoch, "samples": samples, "replicas_identical": float(synced),
                   **{k: float(v) for k, v in logs.items() if k.startswith("loss")}}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="skysense-ckpt-") as d:
            meta = {"step": step, "stage": cfg.stage, "preset": cfg.preset}
            save_checkpoint(Path(d) / WEIGHTS, _student(module), _teacher(module), _heads_module(module), meta)
            torch.save({
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "samples": samples,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(), "python": random.getstate()},
                "dino_centres": _dino_centres(module), "config": asdict(cfg), "world_size": world,
            }, Path(d) / TRAIN_STATE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        say(f"[pretrain] checkpoint at step {step}" + ("" if synced else " (replicas differ!)"))

    memory_batches = config.get("memory_batches")
    if memory_batches is not None:  # bench/pretrain.py's baseline: the same loop over batches held in memory
        memory_batches = memory_batches[rank::world]

        def epoch_batches():
            return iter(memory_batches)
    else:
        shard = ray.train.get_dataset_shard("train")

        def epoch_batches():
            return shard.iter_batches(batch_format="numpy", batch_size=cfg.per_worker_batch, prefetch_batches=2,
                                      local_shuffle_buffer_size=cfg.shuffle_buffer or None)

    last_logs: dict = {}
    modalities = config.get("modalities")
    if step < cfg.steps:
        say(f"[pretrain] stage {cfg.stage}, {cfg.preset}, {world} worker(s) on {device}, steps {step}..{cfg.steps}, "
            f"batch {cfg.per_worker_batch} x {world}")
    while step < cfg.steps:
        got = 0
        t_last = time.perf_counter()
        for batch in epoch_batches():
            got += 1
            n = len(next(iter(batch.values())))
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                if cfg.self_distillation:
                    if "view0_theta" in batch:
                        loss, logs = wrapped(None, gen, views=columns_to_views(batch, device))
                    else:
                        from pipeline.datasource import rows_to_input

                        inp, _ = rows_to_input(batch, modalities)
                        loss, logs = wrapped(inp.to(device), gen)
                else:
                    from pipeline.datasource import rows_to_input

                    inp, labels = rows_to_input(batch, modalities)
                    loss, logs = wrapped(inp.to(device), labels.long().to(device), cfg.num_classes, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step + 1}: {logs}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(param_list, cfg.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            if cfg.self_distillation:
                module.update_teacher(teacher_momentum(step, cfg.steps, module.cfg.momentum_start))
            step += 1
            samples += n * world
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            last_logs = {k: float(v) for k, v in logs.items()}
            if rank == 0:
                sps = n * world / max(dt, 1e-9)
                metrics_log.write({"step": step, "epoch": epoch, "resumed_from": resumed_from, **last_logs,
                                   "lr": lr, "samples_per_s": sps, "step_s": dt, "time": round(time.time(), 3)})
                say(_progress_line(step, cfg.steps, epoch, last_logs, sps, lr))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(last_logs, got)
            if step >= cfg.steps:
                break
        if got == 0:
            raise RuntimeError("this worker's data shard is empty: fewer windows than workers?")
        if step < cfg.steps:
            epoch += 1

    if rank == 0:
        _export(cfg, module, run_dir, config.get("data", {}), world, samples)


def _export(cfg: PretrainJobConfig, module, run_dir: Path, data: dict, world: int, samples: int) -> None:
    """Final weights, model card and loss curve in the run directory (rank 0)."""
    from skysense_core.checkpoint import save_checkpoint

    rows = read_metrics(run_dir / METRICS) if (run_dir / METRICS).exists() else []
    last = rows[-1] if rows else {}
    tail = rows[-10:]
    final = {k: last[k] for k in last if k == "loss" or k.startswith("loss/")}
    mean_tail = {k: float(np.mean([r[k] for r in tail if k in r])) for k in final}
    student = _student(module)
    card = {
        "format": "skysense-model-card/1",
        "preset": cfg.preset,
        "stage": cfg.stage,
        "steps": int(last.get("step", 0)),
        "steps_requested": cfg.steps,
        "samples_seen": samples,
        "weights": MODEL,
        "weights_layout": "model.* = the EMA teacher in stage 1 (the network the papers evaluate and hand to "
                          "downstream tasks), the trained model in stage 2 (geo bank included); student.* = the "
                          "stage-1 student; heads.* = DINO heads / projections / centres (stage 1)",
        "data": {**data, "window": cfg.window,
                 "samples": "episodes: same-class mosaics of 8 windows, half cropped (pipeline.episodes)"
                 if cfg.objective == "pretrain" and cfg.stage == 2 else "windows",
                 "labels": cfg.labels if cfg.supervised else None,
                 "num_classes": cfg.num_classes if cfg.supervised else None},
        "final_losses": final,
        "mean_losses_last_10_steps": mean_tail,
        "world_size": world,
        "config": asdict(cfg),
        "model_config": student.cfg.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta = {k: card[k] for k in ("preset", "stage", "steps", "final_losses")}
    teacher = _teacher(module)
    if teacher is not None:  # the EMA teacher is what fine-tuning and inference get (SkySense evaluates it)
        save_checkpoint(run_dir / MODEL, teacher, None, _heads_module(module), {**meta, "weights": "teacher"},
                        student=student)
    else:
        save_checkpoint(run_dir / MODEL, student, None, _heads_module(module), {**meta, "weights": "model"})
    tmp = run_dir / (CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, default=str))
    tmp.replace(run_dir / CARD)
    if rows:
        plot_losses(run_dir / METRICS, run_dir / CURVE, f"{cfg.run_name}: {cfg.preset} stage {cfg.stage}")
    print(f"[pretrain] exported {run_dir / MODEL}, {run_dir / CARD}, {run_dir / CURVE}", flush=True)


# ------------------------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------------------------
def build_dataset(cfg: PretrainJobConfig, info: CubeInfo):
    """The ``train`` dataset: cube windows (stage 1: and views made on the CPU data workers; stage 2: episodes,
    ``pipeline.episodes``)."""
    from pipeline.datasource import read_cube
    from skysense_core import get_config

    kw = {"window": cfg.window, "num_cpus": cfg.data_cpus, "min_valid": cfg.min_valid}
    if cfg.supervised:
        kw["labels"] = cfg.labels
    if cfg.tiles is not None:
        kw["tiles"] = list(cfg.tiles)
    ds = read_cube(info.path, shuffle=True, **kw)  # tiles in a new order every epoch, still streamed
    if cfg.objective == "pretrain" and cfg.stage == 2:  # the official episodes: same-class mosaics of windows
        import ray.data

        from pipeline.episodes import PER_EPISODE, EpisodeMaker

        cell = get_config(cfg.preset, hr_ratio=info.hr_ratio, **cfg.model_overrides).mask_cell
        ds = ds.map_batches(EpisodeMaker, fn_constructor_kwargs={"seed": cfg.seed, "cell": cell},
                            batch_format="numpy", batch_size=PER_EPISODE * max(cfg.per_worker_batch, 2),
                            num_cpus=cfg.data_cpus,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.workers)))
    if cfg.self_distillation and cfg.views_on_data_workers:
        aug = augment_config(cfg.preset, info.hr_ratio, cfg.model_overrides, cfg.pretrain_overrides)
        import ray.data

        # views are per sample: the view batch only sizes the work per actor call, not the training batch
        ds = ds.map_batches(ViewMaker, fn_constructor_kwargs={"hr_ratio": info.hr_ratio, "augment": aug},
                            batch_format="numpy", batch_size=max(cfg.per_worker_batch, 16), num_cpus=cfg.data_cpus,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.workers)))
    return ds


def ingest_options(buffer_mb: float):
    """Ray Train's default ingest options with the object-store budget of the stream capped at ``buffer_mb``."""
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.resource_limits = opts.resource_limits.copy(object_store_memory=buffer_mb * 2**20)
    return opts


def run_pretraining(cfg: PretrainJobConfig, ray_address: str | None = None, progress=print,
                    memory_batches: list[dict[str, np.ndarray]] | None = None):
    """Pretrain as ``cfg`` says; returns Ray Train's ``Result``. Raises ``ValueError`` / ``CubeError`` on bad
    input (before Ray starts) and ``ray.train.TrainingFailedError`` when training fails beyond ``max_failures``.

    ``memory_batches``: the baseline of ``bench/pretrain.py`` -- no Ray Data: every worker cycles over its share
    (``batches[rank::world]``) of these per-worker batches (the columns the dataset would yield, e.g. from
    :func:`materialize_batches`) instead of pulling a dataset shard."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    say = progress or (lambda s: None)
    cfg, info = resolve_config(cfg)
    init_ray(ray_address)
    cpus = cfg.cpus_per_worker
    if cpus is None:
        total = ray.cluster_resources().get("CPU", 1)
        cpus = 1.0 if total >= 2 * cfg.workers + 2 else 0.5
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"[pretrain] run {run_dir}: cube {info.path} ({info.tiles_done} tiles, {info.start}..{info.end}), "
        f"window {cfg.window} px, preset {cfg.preset}, stage {cfg.stage}, {cfg.steps} steps, "
        f"{cfg.workers} worker(s) x {cpus} CPU{' + 1 GPU' if cfg.gpu else ''}")
    ds = build_dataset(cfg, info) if memory_batches is None else None
    data = {"cube": info.path, "tiles": info.tiles_done, "start": info.start, "end": info.end,
            "hr_ratio": info.hr_ratio, "tile_side_px": info.tile_side}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": asdict(cfg), "hr_ratio": info.hr_ratio, "modalities": None, "data": data,
                           "memory_batches": memory_batches},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=str(Path(cfg.out).resolve()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds} if ds is not None else None,
        dataset_config=DataConfig(execution_options=ingest_options(cfg.data_buffer_mb)),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    say(f"[pretrain] done in {time.perf_counter() - t0:.1f} s; checkpoint {result.checkpoint}; "
        f"metrics {json.dumps(result.metrics or {}, default=str)}")
    return result


def materialize_batches(cfg: PretrainJobConfig, n_batches: int, ray_address: str | None = None) -> list[dict]:
    """The first ``n_batches`` per-worker batches of the ``train`` dataset (:func:`build_dataset`), in memory on
    the driver: what ``run_pretraining(memory_batches=...)`` feeds the loop with."""
    cfg, info = resolve_config(cfg)
    init_ray(ray_address)
    out = []
    while len(out) < n_batches:  # cycle epochs when the cube has fewer windows than asked
        before = len(out)
        for batch in build_dataset(cfg, info).iter_batches(batch_format="numpy", batch_size=cfg.per_worker_batch):
            if len(next(iter(batch.values()))) == cfg.per_worker_batch:
                out.append(batch)
            if len(out) == n_batches:
                break
        if len(out) == before:
            raise ValueError(f"the dataset has no full batch of {cfg.per_worker_batch} windows")
    return out


__all__ = [
    "build_dataset", "columns_to_views", "cube_info", "default_labels", "ingest_options", "lr_lambda",
    "make_view_columns", "materialize_batches", "plot_losses", "pretrain_config", "PretrainJobConfig",
    "read_metrics", "replicas_identical", "resolve_config", "run_pretraining", "train_loop_per_worker", "ViewMaker",
    "views_to_columns",
]

