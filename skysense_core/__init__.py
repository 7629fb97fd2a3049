"""skysense_core: the SkySense / SkySense++ model in pure torch (no file or network I/O).

    model = skysense_core.build_model("tiny")                 # or "small", "base", "huge"
    model = skysense_core.build_model("base", hr_ratio=8)     # any config field can be overridden

Layers (DINOv2-style): ``encoders`` (SwinV2 / ViT backbones), ``fusion``, ``prototypes`` (geo-context),
``completion`` (SkySense++ modality completion), ``heads``; the model in ``model``; the pretraining
meta-architectures in ``pretrain`` (stage 1) and ``semantic`` (stage 2 and few-shot); ``checkpoint`` I/O.
"""

from __future__ import annotations

import torch

from skysense_core.config import PRESETS, ModelConfig, get_config
from skysense_core.inputs import MODALITIES, ModalityInput, SkySenseInput


def build_model(preset: str | ModelConfig = "tiny", *, device: str | torch.device | None = None, **overrides):
    """A ``SkySense`` model from a preset name (``tiny``, ``small``, ``base``, ``huge``) or a ``ModelConfig``,
    with config fields overridden by keyword. ``device="meta"`` builds without allocating (parameter counts)."""
    from skysense_core.model import SkySense

    cfg = get_config(preset, **overrides)
    if device is None:
        return SkySense(cfg)
    with torch.device(device):
        return SkySense(cfg)


__all__ = ["MODALITIES", "PRESETS", "ModalityInput", "ModelConfig", "SkySenseInput", "build_model", "get_config"]
