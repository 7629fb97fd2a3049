"""Supervised fine-tuning of the model's parts for dense land cover: ``SegmentationFinetuner(model, train=...)``,
``forward(batch, labels, num_classes, generator) -> (loss, logs)``, the interface of the other trainer modules
(``SkySensePretrainer``, ``SemanticPretrainer``), so the Ray Train loop runs it unchanged.

What trains (``train``):

- ``fusion``: the fusion transformer and the day-of-year encoding (``ctpe``), with the encoders frozen
  (SkySense's fusion is what turns the per-date tokens into one representation; it is the cheap part to adapt);
- ``all``: every parameter of the model.

``CachedFusionFinetuner`` trains the fusion on cached encoder outputs instead (what ``--train fusion`` runs:
the encoders are frozen, so they run once per tile, not at every step).

The per-pixel features (``skysense_core.pixel_features``) go through a batch standardisation (``BatchNorm1d``
without affine parameters over the labelled pixels: the feature stack mixes scales) into a linear classifier,
trained with cross-entropy weighted by the batch's inverse square-root class frequencies
(``skysense_core.losses.inverse_sqrt_frequency_weights``, as the head that inference gets). This head is a
training device [ours]: the head a run hands to inference is fitted afterwards on the trained model's cached
features (``pipeline.finetune``), as for a frozen encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skysense_core.losses import inverse_sqrt_frequency_weights
from skysense_core.model import SkySense
from skysense_core.pixel_features import feature_dim, pixel_features

TRAINABLE = {"fusion": ("fusion.", "ctpe"), "all": ("",)}
IGNORE = 255


def segment_loss(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of logits (N, K) against labels (N,), weighted by the batch's inverse square-root class
    frequencies. Returns (loss, logs)."""
    weight = inverse_sqrt_frequency_weights(torch.bincount(y, minlength=num_classes))
    loss = F.cross_entropy(logits, y, weight=weight.to(logits.dtype))
    acc = float((logits.argmax(1) == y).float().mean())
    return loss, {"loss": float(loss.detach()), "loss/segment": float(loss.detach()), "pixel_accuracy": acc}


def frozen_in_eval(model: nn.Module) -> None:
    """Put the modules without a trained parameter back in eval mode (after ``.train()``): frozen parts' dropout
    and normalisation statistics must not change while others train."""
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def freeze_all_but(model: nn.Module, train: str) -> None:
    """requires_grad only for the parameters :data:`TRAINABLE` names for ``train``."""
    if train not in TRAINABLE:
        raise ValueError(f"train must be one of {sorted(TRAINABLE)}, got {train!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(prefix) for prefix in TRAINABLE[train]))


class SegmentationFinetuner(nn.Module):
    def __init__(self, model: SkySense, num_classes: int, train: str = "fusion", features: str = "dates",
                 modalities: tuple[str, ...] | None = None):
        super().__init__()
        freeze_all_but(model, train)
        self.model = model
        self.features = features
        self.num_classes = num_classes
        mods = modalities or model.cfg.modalities
        dim = feature_dim(features, model.cfg, mods)
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.classifier = nn.Linear(dim, num_classes)

    def train(self, mode: bool = True) -> SegmentationFinetuner:
        super().train(mode)
        frozen_in_eval(self.model)
        return self

    def forward(self, batch, labels: torch.Tensor, num_classes: int | None = None,
                generator: torch.Generator | None = None):
        """batch: SkySenseInput (B, ...); labels (B, H, W) int64 class ids at HR or grid resolution, 255 =
        unlabelled. Returns (loss, logs)."""
        r = self.model.cfg.hr_ratio
        out = self.model(batch, geo=self.model.glbank is not None and batch.lat is not None)
        feats = pixel_features(self.features, out, batch, r)  # (B, F, h, w)
        h, w = feats.shape[-2:]
        if tuple(labels.shape[-2:]) != (h, w):  # HR labels -> the grid, by the centre pixel of each block
            off = max(r // 2 - 1, 0)
            labels = labels[:, off::r, off::r]
        y = labels.reshape(-1)
        x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        ok = (y != IGNORE) & (y < self.num_classes) & torch.isfinite(x).all(1)
        if not bool(ok.any()):  # no labelled pixel: a zero loss that still touches every trained parameter
            loss = sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
            return loss, {"loss": 0.0, "loss/segment": 0.0}
        return segment_loss(self.classifier(self.norm(x[ok])), y[ok], self.num_classes)


class CachedFusionFinetuner(nn.Module):
    """``train="fusion"`` on cached fusion inputs: with the encoders frozen their outputs never change, and the
    fusion attends over one location's dates only (no spatial mixing), so a labelled pixel's bare fusion input
    (``SkySense.fusion_sequence(..., dated=False)``: its date tokens, keep mask and days of year), its tile centre
    and the frozen rest of its feature stack are all a training step needs. The encoders run once per tile
    (``pipeline.finetune_fusion``) instead of at every step, and a step mixes pixels of every training tile.

    The trained parameters are the fusion and the date encoding (:data:`TRAINABLE` ``fusion``); the geo-context
    bank is a buffer. The features are [F_fus^mm, geo-context, frozen] into the same batch standardisation and
    linear classifier as :class:`SegmentationFinetuner`."""

    def __init__(self, model: SkySense, num_classes: int, frozen_dim: int):
        super().__init__()
        freeze_all_but(model, "fusion")
        self.model = model
        self.num_classes = num_classes
        cfg = model.cfg
        dim = cfg.fusion_dim * (2 if model.glbank is not None else 1) + frozen_dim
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.classifier = nn.Linear(dim, num_classes)

    def train(self, mode: bool = True) -> CachedFusionFinetuner:
        super().train(mode)
        frozen_in_eval(self.model)
        return self

    def features(self, seq: torch.Tensor, keep: torch.Tensor, doy: torch.Tensor, lat: torch.Tensor,
                 lon: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        """(N, F) features of N pixels: seq (N, L, C), keep (N, L) bool, doy (N, L) int64, lat / lon (N,) degrees
        of each pixel's tile centre, frozen (N, F_frozen) the rest of its feature stack."""
        fused = self.model.fuse_sequence(seq, keep, doy)  # (N, D)
        parts = [fused]
        if self.model.glbank is not None:  # per tile centre: the bank attends per sample, as in the forward
            geo = torch.empty_like(fused)
            centres, which = torch.unique(torch.stack([lat, lon], 1), dim=0, return_inverse=True)
            for i, (la, lo) in enumerate(centres):
                sel = (which == i).nonzero()[:, 0]
                f = fused[sel].T[None, :, :, None]  # (1, D, n, 1): one sample, n locations
                geo[sel] = self.model.glbank(f, la[None], lo[None])[0, :, :, 0].T.to(geo.dtype)
            parts.append(geo)
        parts.append(frozen.to(fused.dtype))
        return torch.cat(parts, 1)

    def logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Class logits (N, K) of :meth:`features`' inputs."""
        return self.classifier(self.norm(self.features(*inputs)))

    def forward(self, seq, keep, doy, lat, lon, frozen, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss and logs of N labelled pixels (:meth:`features`' inputs, labels (N,) int64 class ids)."""
        return segment_loss(self.logits(seq, keep, doy, lat, lon, frozen), labels, self.num_classes)
