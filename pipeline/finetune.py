"""Fine-tuning a segmentation head on labelled cube tiles, with validation mIoU on held-out tiles.

The cube is read through the Ray Data datasource (windows of ``window`` Sentinel pixels, labels reprojected
onto the cube grid by ``pipeline.labels``); the encoder (a SkySense checkpoint) is frozen by default, so the
features of a batch are computed without gradient and only the head learns. Heads, on F_fus (B, 2D, h, w) at
the 10 m grid:

* ``linear``: a 1x1 convolution (the linear probe);
* ``upernet``: ``skysense_core.heads.UPerHead`` on the single grid level (PPM + FPN convolutions).

Tiles are split deterministically: every ``val_every``-th tile of the sorted done tiles is held out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pipeline.datasource import done_tiles, read_cube, rows_to_input
from pipeline.labels import NODATA, label_classes
from skysense_core.checkpoint import load_checkpoint
from skysense_core.heads import UPerHead

HEADS = ("upernet", "linear")


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
        head.train()
        for batch in _batches(cfg.cube, train_tiles, cfg.window, cfg.labels, cfg.batch_size):
            feats, target = features(batch)
            logits = head(feats)
            target = torch.where(target >= num_classes, torch.full_like(target, NODATA), target)
            loss = F.cross_entropy(logits, target, ignore_index=NODATA)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
        log(f"epoch {epoch + 1}/{cfg.epochs}  step {step}  loss {np.mean(losses[-10:]):.4f}  "
            f"{time.perf_counter() - t0:.0f} s")

    head.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for batch in _batches(cfg.cube, val_tiles, cfg.window, cfg.labels, cfg.batch_size):
            feats, target = features(batch)
            cm += confusion(head(feats).argmax(1), target, num_classes)
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
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"),
              metadata={"head": cfg.head, "num_classes": str(num_classes), "in_dim": str(in_dim)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
