"""Fine-tuning a segmentation head on labelled cube tiles, with validation mIoU on held-out tiles.

The cube is read through the Ray Data datasource (windows of ``window`` Sentinel pixels, labels reprojected
onto the cube grid by ``pipeline.labels``); the encoder (a SkySense checkpoint) is frozen by default, so the
features of a batch are computed without gradient and only the head learns. Heads, on F_fus (B, 2D, h, w) at
the 10 m grid:

* ``linear``: a 1x1 convolution (the linear probe);
* ``upernet``: ``skysense_core.heads.UPerHead`` on the single grid level (PPM + FPN convolutions).

Tiles are split deterministically: every ``val_every``-th tile of the sorted done tiles is held out.

``head.safetensors`` describes itself (:func:`read_head_info`), so that inference (``jobs/infer.py --task
landcover``) needs nothing else: metadata ``format`` = :data:`HEAD_FORMAT`, ``head`` (kind), ``num_classes``,
``in_dim``, ``channels``, ``encoder`` (absolute path of the encoder checkpoint), ``encoder_sha256``, ``preset``
(the encoder's preset name), ``class_names`` (JSON {value: name}) and ``colormap`` (JSON {value: [r, g, b, a]},
from the label raster's tags and colour table; ``{}`` when it has none), ``window``, ``labels``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.datasource import done_tiles, read_cube, rows_to_input
from pipeline.labels import NODATA, label_classes, open_label_raster
from skysense_core.checkpoint import load_checkpoint
from skysense_core.heads import UPerHead

HEADS = ("upernet", "linear")
HEAD_FILE = "head.safetensors"
HEAD_FORMAT = "skysense-head/1"


@dataclass
class FinetuneConfig:
    cube: str
    labels: str
    checkpoint: str
    out: str
    head: str = "upernet"
    num_classes: int | None = None  # default: the label raster's class_names tag, else 1 + the largest training id
    epochs: int = 5
    batch_size: int = 4
    lr: float = 1e-3
    window: int = 32  # Sentinel pixels; a multiple of 4 for the model
    val_every: int = 4  # every 4th tile is held out
    freeze_encoder: bool = True
    seed: int = 0
    class_names: list[str] = field(default_factory=list)
    max_steps: int | None = None  # stop training after this many optimiser steps (None: every epoch in full)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces (checkpoints can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def label_legend(label_raster: str | Path) -> tuple[dict[int, str], dict[int, tuple[int, int, int, int]]]:
    """({value: name}, {value: (r, g, b, a)}) of a label raster: its ``class_names`` tag (JSON {value: name}, as
    ``pipeline.cog.write_cog`` callers write it) and its colour table; empty dicts for what it lacks."""
    with open_label_raster(label_raster) as src:
        tag = src.tags().get("class_names")
        names = {int(k): str(v) for k, v in json.loads(tag).items()} if tag else {}
        colors: dict[int, tuple[int, int, int, int]] = {}
        if src.count >= 1 and src.colorinterp[0].name == "palette":
            table = src.colormap(1)
            keep = set(names) if names else {v for v in table if v != NODATA}
            colors = {int(v): tuple(int(c) for c in table[v]) for v in sorted(keep) if v in table}
    return names, colors


@dataclass(frozen=True)
class HeadInfo:
    """What a ``head.safetensors`` says about itself (module docstring); ``path`` is the file."""

    path: str
    kind: str
    num_classes: int
    in_dim: int
    channels: int
    encoder: str | None
    encoder_sha256: str | None
    preset: str | None
    class_names: dict[int, str]
    colormap: dict[int, tuple[int, int, int, int]]
    window: int | None


def save_head(
    path: str | Path, head: nn.Module, *, kind: str, num_classes: int, in_dim: int, channels: int,
    encoder: str | Path, preset: str, class_names: Mapping[int, str] | None = None,
    colormap: Mapping[int, tuple[int, ...]] | None = None, window: int | None = None, labels: str | None = None,
    encoder_sha256: str | None = None,
) -> Path:
    """Write the head's weights and its self-description (module docstring) to ``path`` atomically."""
    path = Path(path)
    meta = {
        "format": HEAD_FORMAT, "head": kind, "num_classes": str(num_classes), "in_dim": str(in_dim),
        "channels": str(channels), "encoder": str(Path(encoder).resolve()),
        "encoder_sha256": encoder_sha256 or file_sha256(encoder), "preset": preset,
        "class_names": json.dumps({str(k): v for k, v in sorted((class_names or {}).items())}),
        "colormap": json.dumps({str(k): list(v) for k, v in sorted((colormap or {}).items())}),
        "window": "" if window is None else str(window), "labels": labels or "",
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_head_info(path: str | Path) -> HeadInfo:
    """The self-description of a head file (or of ``DIR/head.safetensors`` for a fine-tune run directory), without
    loading its weights. Heads written before the self-description existed get the encoder from the run's
    ``metrics.json``. Raises ``ValueError`` for a file that is no head."""
    path = Path(path)
    if path.is_dir():
        path = path / HEAD_FILE
    if not path.is_file():
        raise ValueError(f"no fine-tuned head at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{path} is not a safetensors file: {e}") from None
    if "head" not in meta or "num_classes" not in meta:
        raise ValueError(f"{path} is not a fine-tuned head (jobs/finetune.py writes one); metadata keys {sorted(meta)}")
    encoder, sha = meta.get("encoder") or None, meta.get("encoder_sha256") or None
    if encoder is None and (path.parent / "metrics.json").exists():
        encoder = json.loads((path.parent / "metrics.json").read_text()).get("checkpoint")
    return HeadInfo(
        path=str(path.resolve()), kind=meta["head"], num_classes=int(meta["num_classes"]),
        in_dim=int(meta.get("in_dim", 0)), channels=int(meta.get("channels", 0) or 0), encoder=encoder,
        encoder_sha256=sha, preset=meta.get("preset") or None,
        class_names={int(k): v for k, v in json.loads(meta.get("class_names") or "{}").items()},
        colormap={int(k): tuple(v) for k, v in json.loads(meta.get("colormap") or "{}").items()},
        window=int(meta["window"]) if meta.get("window") else None,
    )


def load_head(path: str | Path, channels: int | None = None) -> tuple[nn.Module, HeadInfo]:
    """The head module (eval mode, CPU) and its :class:`HeadInfo`. ``channels``: the UPerNet width for heads that
    do not record it (the encoder's ``uper_channels``)."""
    info = read_head_info(path)
    head = build_head(info.kind, info.in_dim, info.num_classes, info.channels or channels or 0)
    head.load_state_dict(load_file(info.path))
    return head.eval(), info


def split_tiles(tiles: list[str], val_every: int) -> tuple[list[str], list[str]]:
    """Deterministic hold-out: every ``val_every``-th tile of the sorted ids (at least one of each)."""
    tiles = sorted(tiles)
    if len(tiles) < 2:
        raise ValueError(f"fine-tuning needs at least 2 done tiles (train + validation), the cube has {len(tiles)}")
    val = tiles[val_every - 1 :: val_every] or tiles[-1:]
    train = [t for t in tiles if t not in val]
    return train, val


def build_head(kind: str, in_dim: int, num_classes: int, channels: int) -> nn.Module:
    if kind == "linear":
        return nn.Conv2d(in_dim, num_classes, 1)
    if kind == "upernet":
        return _GridUPerNet(in_dim, channels, num_classes)
    raise ValueError(f"unknown head {kind!r}; choose one of {HEADS}")


class _GridUPerNet(nn.Module):
    def __init__(self, in_dim: int, channels: int, num_classes: int):
        super().__init__()
        self.uper = UPerHead([in_dim], channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.uper([x])


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = truth, over pixels whose truth is a class (not nodata)."""
    ok = target < num_classes
    idx = target[ok] * num_classes + pred[ok]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> list[float | None]:
    """Per-class IoU; None for a class absent from both truth and prediction."""
    tp = cm.diag().double()
    union = cm.sum(0).double() + cm.sum(1).double() - tp
    return [None if u == 0 else float(t / u) for t, u in zip(tp, union, strict=True)]


def _batches(cube, tiles, window, labels, batch_size):
    ds = read_cube(cube, tiles=tiles, window=window, labels=labels)
    yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy")


def run_finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print) -> dict:
    """Train the head, validate on the held-out tiles; writes ``head.safetensors`` and ``metrics.json`` to
    ``cfg.out`` and returns the metrics."""
    if cfg.head not in HEADS:
        raise ValueError(f"unknown head {cfg.head!r}; choose one of {HEADS}")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, _, meta = load_checkpoint(cfg.checkpoint)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(not cfg.freeze_encoder)
    train_tiles, val_tiles = split_tiles(done_tiles(cfg.cube), cfg.val_every)
    num_classes = cfg.num_classes or label_classes(cfg.labels)
    if num_classes is None:  # an untagged raster: one extra pass over the training labels
        top = 0
        for batch in _batches(cfg.cube, train_tiles, cfg.window, cfg.labels, cfg.batch_size):
            lab = batch["labels_grid"]
            lab = lab[lab != NODATA]
            top = max(top, int(lab.max()) if lab.size else 0)
        num_classes = top + 1
    in_dim = model.cfg.fusion_dim * (2 if model.glbank is not None else 1)
    head = build_head(cfg.head, in_dim, num_classes, model.cfg.uper_channels)
    params = list(head.parameters()) + ([] if cfg.freeze_encoder else list(model.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)

    def features(batch) -> tuple[torch.Tensor, torch.Tensor]:
        inp, _ = rows_to_input(batch)
        target = torch.from_numpy(np.array(batch["labels_grid"], dtype=np.int64))
        with torch.set_grad_enabled(not cfg.freeze_encoder):
            feats = model(inp).fused
        return feats, target

    losses = []
    t0 = time.perf_counter()
    step = 0
    for epoch in range(cfg.epochs):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        head.train()
        for batch in _batches(cfg.cube, train_tiles, cfg.window, cfg.labels, cfg.batch_size):
            feats, target = features(batch)
            # unlabelled pixels, classes beyond the head, and pixels whose features are not finite are ignored
            bad = (target >= num_classes) | ~torch.isfinite(feats).all(1)
            target = torch.where(bad, torch.full_like(target, NODATA), target)
            if not (target != NODATA).any():
                continue  # a batch of windows outside the labels: cross-entropy would be 0/0 = NaN
            logits = head(torch.nan_to_num(feats))
            loss = F.cross_entropy(logits, target, ignore_index=NODATA)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        log(f"epoch {epoch + 1}/{cfg.epochs}  step {step}  loss {np.mean(losses[-10:]):.4f}  "
            f"{time.perf_counter() - t0:.0f} s")

    head.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for batch in _batches(cfg.cube, val_tiles, cfg.window, cfg.labels, cfg.batch_size):
            feats, target = features(batch)
            cm += confusion(head(torch.nan_to_num(feats)).argmax(1), target, num_classes)
    ious = iou_from_confusion(cm)
    present = [v for v in ious if v is not None]
    names = cfg.class_names or [str(i) for i in range(num_classes)]
    metrics = {
        "head": cfg.head, "checkpoint": str(cfg.checkpoint), "checkpoint_meta": meta, "num_classes": num_classes,
        "train_tiles": train_tiles, "val_tiles": val_tiles, "steps": step, "final_loss": losses[-1] if losses else None,
        "per_class_iou": {names[i]: v for i, v in enumerate(ious)},
        "miou": float(np.mean(present)) if present else None,
        "pixel_accuracy": float(cm.diag().sum() / cm.sum().clamp(min=1)),
        "val_pixels": int(cm.sum()), "seconds": time.perf_counter() - t0, "config": asdict(cfg),
    }
    legend_names, legend_colors = label_legend(cfg.labels)
    save_head(out / HEAD_FILE, head, kind=cfg.head, num_classes=num_classes, in_dim=in_dim,
              channels=model.cfg.uper_channels, encoder=cfg.checkpoint, preset=model.cfg.name,
              class_names={i: n for i, n in enumerate(cfg.class_names)} or legend_names, colormap=legend_colors,
              window=cfg.window, labels=str(Path(cfg.labels).resolve()))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
