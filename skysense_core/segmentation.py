"""Supervised fine-tuning of the model's parts for dense land cover: ``SegmentationFinetuner(model, train=...)``,
``forward(batch, labels, num_classes, generator) -> (loss, logs)``, the interface of the other trainer modules
(``SkySensePretrainer``, ``SemanticPretrainer``), so the Ray Train loop runs it unchanged.

What trains (``train``):

- ``fusion``: the fusion transformer and the day-of-year encoding (``ctpe``), with the encoders frozen
  (SkySense's fusion is what turns the per-date tokens into one representation; it is the cheap part to adapt);
- ``all``: every parameter of the model.

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


class SegmentationFinetuner(nn.Module):
    def __init__(self, model: SkySense, num_classes: int, train: str = "fusion", features: str = "dates",
                 modalities: tuple[str, ...] | None = None):
        super().__init__()
        if train not in TRAINABLE:
            raise ValueError(f"train must be one of {sorted(TRAINABLE)}, got {train!r}")
        self.model = model
        self.features = features
        self.num_classes = num_classes
        mods = modalities or model.cfg.modalities
        dim = feature_dim(features, model.cfg, mods)
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.classifier = nn.Linear(dim, num_classes)
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(prefix) for prefix in TRAINABLE[train]))

    def train(self, mode: bool = True) -> SegmentationFinetuner:
        """Frozen parts stay in eval mode: their normalisation statistics must not drift while others train."""
        super().train(mode)
        for module in self.model.modules():
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()
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
        x, y = x[ok], y[ok]
        weight = inverse_sqrt_frequency_weights(torch.bincount(y, minlength=self.num_classes))
        logits = self.classifier(self.norm(x))
        loss = F.cross_entropy(logits, y, weight=weight.to(logits.dtype))
        acc = float((logits.argmax(1) == y).float().mean())
        return loss, {"loss": float(loss.detach()), "loss/segment": float(loss.detach()), "pixel_accuracy": acc}
