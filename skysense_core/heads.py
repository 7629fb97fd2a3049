"""Task heads: the UPerNet semantic decoder (SkySense++ ``head_rec_hr`` and downstream segmentation), a linear
scene classifier, a bi-temporal change-detection head, and the logit upsampling helper.

Everything is pure torch and mirrors mmseg 1.x / mmcv 2.x layouts where a released checkpoint has to load
(``shared/research/skysense.md`` sections 1.6, 6 and 7):

- ``ConvModule`` keeps mmcv's attribute names (``conv``, ``bn``, ``activate``), so the UPerHead keys are
  ``psp_modules.k.1.conv/bn``, ``bottleneck``, ``lateral_convs.k``, ``fpn_convs.k``, ``fpn_bottleneck`` and
  ``conv_seg``, exactly as in the official ``head_rec_hr.*`` state_dict.
- Normalisation is plain ``BatchNorm2d`` where the official configs use SyncBN: SyncBN needs a process group and
  does not run on CPU. Under DDP, convert with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)``; the
  state_dict keys are identical either way.
- No module here casts dtypes. The official PPM hard-casts its upsampled pools to bfloat16, which breaks (or
  silently degrades) fp32 CPU inference; we leave precision to the caller's ``torch.autocast``.

``LinearClassifier`` and ``ChangeDetectionHead`` are our designs (the papers report scene classification and
DSIFN-CD change detection but no head code was released).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChangeDetectionHead", "ConvModule", "LinearClassifier", "PixelHead", "UPerHead", "upsample_logits"]


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False`` (mmseg's decode-head default) for the internal
    pyramid merges. ``(B, C, H, W) -> (B, C, *size)``; a no-op when the size already matches."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def upsample_logits(logits: torch.Tensor, size: int | Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """Upsample dense logits ``(B, K, h, w) -> (B, K, *size)`` bilinearly.

    The official SkySense++ predictor takes the UPerHead's 1/4-resolution logits to full HR resolution with
    ``align_corners=True``; that is the default here so predictions match the released model. Pass
    ``align_corners=False`` for mmseg-style fine-tuning, whose ``resize`` uses False.
    """
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


class ConvModule(nn.Module):
    """mmcv-style conv -> BatchNorm2d -> ReLU. ``(B, in_ch, H, W) -> (B, out_ch, H', W')``.

    Attribute names ``conv`` / ``bn`` / ``activate`` follow mmcv's ConvModule so released keys load unchanged.
    The conv has no bias when normalised (the BN shift makes it redundant, and mmcv's ``bias='auto'`` drops it
    too, so a bias key would not exist in the checkpoint). With ``norm=False`` the conv keeps its bias and
    there is no ``bn`` attribute.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: int = 0, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=padding, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(out_ch)
        # not inplace (mmcv uses inplace=False for the lateral convs): a ReLU output that is later resized and
        # summed in the top-down pathway must not be overwritten, and the memory saved here is negligible
        self.activate = nn.ReLU(inplace=False)
        # mmcv's ConvModule.init_weights: kaiming (fan_out, relu) conv, BN weight 1 / bias 0
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return self.activate(x)


class UPerHead(nn.Module):
    """UPerNet decoder (mmseg ``UPerHead``): a pyramid pooling module (PPM) on top of an FPN.

    Two input conventions:

    - **standard mmseg** (``ppm_in_channels=None``): ``in_channels`` lists every level, finest first, and the
      *last* level is the PPM input. There are ``len(in_channels) - 1`` lateral / fpn convs.
    - **SkySense++** (``ppm_in_channels`` given): ``in_channels`` lists the pyramid levels only and the PPM runs
      on a separate map (the fusion output ``F_fus``), passed to ``forward`` as ``ppm_input``. Every pyramid level
      gets a lateral / fpn conv and the PPM branch is one more level on top of the top-down pathway. With the
      official ``in_channels=[704, 704, 1408, 2816]`` and ``ppm_in_channels=1024`` this is exactly mmseg's UPerHead
      over ``[704, 704, 1408, 2816, 1024]``: 4 lateral convs, 4 fpn convs and a ``5 * channels`` fpn_bottleneck,
      so ``head_rec_hr.*`` keys and shapes match the release.

    A single-level pyramid works in both conventions (standard: PPM + bottleneck + fpn_bottleneck on that level).

    Shapes: ``forward(features=[(B, C_i, H_i, W_i)], ppm_input=(B, C_ppm, h, w) | None) -> (B, num_classes, H_0,
    W_0)``, i.e. logits at the finest level's resolution (1/4 of the HR image in SkySense++; see
    ``upsample_logits``). ``ppm_input`` is resized to the coarsest pyramid level if its size differs.

    Note: BatchNorm after the 1x1 global pool (scale 1) needs batch >= 2 in train mode, as in mmseg.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        ppm_in_channels: int | None = None,
    ):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels:
            raise ValueError("UPerHead needs at least one input level")
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.pool_scales = tuple(pool_scales)
        self.separate_ppm = ppm_in_channels is not None
        ppm_ch = int(ppm_in_channels) if self.separate_ppm else in_channels[-1]
        # levels that get a lateral + fpn conv: all pyramid levels, or all but the PPM one (mmseg)
        fpn_in = in_channels if self.separate_ppm else in_channels[:-1]

        # PPM: Sequential(pool, ConvModule) so the keys read psp_modules.k.1.conv/bn as in mmseg's PPM
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(ppm_ch, channels, 1)) for s in self.pool_scales
        )
        self.bottleneck = ConvModule(ppm_ch + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in fpn_in)
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in fpn_in)
        self.fpn_bottleneck = ConvModule((len(fpn_in) + 1) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        # mmseg BaseDecodeHead.init_weights: normal(std=0.01) classifier, zero bias
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PPM + bottleneck: ``(B, C_ppm, h, w) -> (B, channels, h, w)``. Pools are upsampled back with
        align_corners=False and kept in the input's dtype (the official code casts them to bf16 here)."""
        outs = [x] + [_resize(m(x), x.shape[-2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward_features(self, features: Sequence[torch.Tensor], ppm_input: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder features before dropout/classifier: ``(B, channels, H_0, W_0)``."""
        features = list(features)
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature levels, got {len(features)}")
        for i, (f, c) in enumerate(zip(features, self.in_channels, strict=True)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"level {i}: expected (B, {c}, H, W), got {tuple(f.shape)}")
        if self.separate_ppm:
            if ppm_input is None:
                raise ValueError("this UPerHead was built with ppm_in_channels: pass ppm_input")
            # the fusion map lives on the Sentinel grid; align it with the coarsest pyramid level it sits on top of
            top = self.psp_forward(_resize(ppm_input, features[-1].shape[-2:]))
            fpn_feats = features
        else:
            if ppm_input is not None:
                raise ValueError("ppm_input given but this UPerHead uses the last feature level as PPM input")
            top = self.psp_forward(features[-1])
            fpn_feats = features[:-1]

        laterals = [conv(f) for conv, f in zip(self.lateral_convs, fpn_feats, strict=True)] + [top]
        # top-down pathway: each level adds the (upsampled) coarser one; built without in-place ops for autograd
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))

    def forward(self, features: Sequence[torch.Tensor], ppm_input: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` finest first, each ``(B, C_i, H_i, W_i)``; ``ppm_input (B, C_ppm, h, w)`` iff built with
        ``ppm_in_channels``. Returns logits ``(B, num_classes, H_0, W_0)``."""
        return self.conv_seg(self.dropout(self.forward_features(features, ppm_input)))


class LinearClassifier(nn.Module):
    """Scene classifier: masked global pooling -> LayerNorm -> Linear. ``(B, C, H, W) -> (B, num_classes)``.

    BatchNorm-free on purpose: linear probes run with tiny or single-sample batches and under frozen backbones,
    where batch statistics are unreliable. ``pool`` is ``"avg"`` (mean over valid locations) or ``"max"``.

    ``mask (B, H_m, W_m)`` bool, True = valid (e.g. not nodata/cloud). At a different resolution than the
    features it is area-resampled to a per-location valid fraction used as pooling weight (so a feature cell
    with no valid pixel contributes nothing). A sample with no valid location pools to zeros.

    Single-label tasks use cross-entropy on the logits; multi-label tasks (e.g. BigEarthNet) use
    ``BCEWithLogitsLoss`` on the same logits, one independent sigmoid per class.
    """

    def __init__(self, in_dim: int, num_classes: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def pooled(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked global pooling ``(B, C, H, W) -> (B, C)``."""
        if mask is None:
            return features.mean((2, 3)) if self.pool == "avg" else features.amax((2, 3))
        if mask.dim() != 3 or mask.shape[0] != features.shape[0]:
            raise ValueError(f"mask must be (B, H, W) with B={features.shape[0]}, got {tuple(mask.shape)}")
        w = mask.to(features.dtype).unsqueeze(1)
        if tuple(w.shape[-2:]) != tuple(features.shape[-2:]):
            w = F.interpolate(w, size=features.shape[-2:], mode="area")  # valid fraction per feature cell
        if self.pool == "avg":
            # where(), not a bare multiply: masked cells may hold NaN/inf (nodata) and 0 * NaN is still NaN
            num = torch.where(w > 0, features * w, torch.zeros_like(features)).sum((2, 3))
            return num / w.sum((2, 3)).clamp_min(torch.finfo(w.dtype).tiny)
        valid = w > 0
        filled = features.masked_fill(~valid, float("-inf")).amax((2, 3))
        # all-invalid samples would give -inf: zero them (matches the avg path)
        return torch.where(valid.flatten(1).any(1, keepdim=True), filled, torch.zeros_like(filled))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``features (B, C, H, W)``, optional ``mask (B, H, W)`` bool (True = valid) -> logits ``(B, num_classes)``."""
        return self.fc(self.norm(self.pooled(features, mask)))


class ChangeDetectionHead(nn.Module):
    """Bi-temporal change detection from a shared (Siamese) encoder: two feature maps of the same place at two
    dates -> per-pixel change logits.

    The SkySense paper evaluates change detection (DSIFN-CD, 0.3 m) with the backbone applied in Siamese fashion
    to both dates; it does not publish the head, so this design is ours:

    - **single level** (``in_dim`` an int): ``[f1, f2, |f1 - f2|]`` on channels -> ConvModule 3x3 (``fuse``)
      -> ConvModule 3x3 (``refine``) -> 1x1 conv (``conv_seg``). ``(B, C, H, W) x 2 -> (B, num_classes, H, W)``.
    - **multi-scale** (``in_dim`` a sequence, finest first): the same difference fusion per level
      (``fuse_convs.k``, ConvModule 3x3 of ``3 * C_k -> channels``), then a ``UPerHead`` (``decoder``) merges
      the fused levels to the finest one. ``[(B, C_k, H_k, W_k)] x 2 -> (B, num_classes, H_0, W_0)``.

    ``|f1 - f2|`` makes "no change" explicit (zero when the dates agree); keeping ``f1`` and ``f2`` themselves in
    order lets the head learn direction-specific changes (e.g. building appeared vs. demolished), so the output
    is not swap-symmetric in general. Logits are at feature resolution: upsample with ``upsample_logits``.
    """

    def __init__(
        self,
        in_dim: int | Sequence[int],
        channels: int,
        num_classes: int = 2,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.multi_scale = not isinstance(in_dim, int)
        self.num_classes = num_classes
        if self.multi_scale:
            self.in_dims = [int(c) for c in in_dim]
            if not self.in_dims:
                raise ValueError("ChangeDetectionHead needs at least one level")
            self.fuse_convs = nn.ModuleList(ConvModule(3 * c, channels, 3, padding=1) for c in self.in_dims)
            self.decoder = UPerHead([channels] * len(self.in_dims), channels, num_classes, pool_scales, dropout)
        else:
            self.in_dims = [int(in_dim)]
            self.fuse = ConvModule(3 * in_dim, channels, 3, padding=1)
            self.refine = ConvModule(channels, channels, 3, padding=1)
            self.conv_seg = nn.Conv2d(channels, num_classes, 1)
            nn.init.normal_(self.conv_seg.weight, std=0.01)
            nn.init.zeros_(self.conv_seg.bias)

    @staticmethod
    def _pair(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) x 2 -> (B, 3C, H, W)`` = ``[f1, f2, |f1 - f2|]``."""
        if f1.shape != f2.shape:
            raise ValueError(f"f1 and f2 must have the same shape, got {tuple(f1.shape)} and {tuple(f2.shape)}")
        return torch.cat([f1, f2, (f1 - f2).abs()], dim=1)

    def forward(
        self, f1: torch.Tensor | Sequence[torch.Tensor], f2: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """``f1``, ``f2``: date-1 / date-2 features, a tensor ``(B, C, H, W)`` or a list of levels (finest first).
        Returns change logits ``(B, num_classes, H_0, W_0)``."""
        l1 = [f1] if isinstance(f1, torch.Tensor) else list(f1)
        l2 = [f2] if isinstance(f2, torch.Tensor) else list(f2)
        if len(l1) != len(l2) or len(l1) != len(self.in_dims):
            raise ValueError(f"expected {len(self.in_dims)} level(s) per date, got {len(l1)} and {len(l2)}")
        if not self.multi_scale:
            return self.conv_seg(self.refine(self.fuse(self._pair(l1[0], l2[0]))))
        fused = [conv(self._pair(a, b)) for conv, a, b in zip(self.fuse_convs, l1, l2, strict=True)]
        return self.decoder(fused)


class PixelHead(nn.Module):
    """A per-pixel classifier with its input standardisation folded in (ours):
    ``(B, F, h, w) -> (B, K, h, w)`` = [1x1 conv -> GELU ->] 1x1 conv of ``(x - mean) / std``.

    ``mean`` / ``std`` (F,) are buffers set from the training features (:meth:`set_standardisation`), so the
    saved head applies them at inference by itself: feature stacks mix F_fus, token averages and normalised
    bands whose scales differ by orders of magnitude, and an unstandardised linear layer trains on them poorly.
    ``class_weights`` (K,) records the loss weights the head was trained with (they do not change its output).
    ``hidden`` = 0 makes it linear (a probe)."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.register_buffer("class_weights", torch.ones(num_classes))
        self.hidden = hidden
        if hidden:
            self.mlp = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, num_classes, 1))
        else:
            self.mlp = nn.Conv2d(in_dim, num_classes, 1)

    @torch.no_grad()
    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, h, w) -> (B, K, h, w)."""
        return self.forward_parts([x])

    def forward_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The same as ``forward(torch.cat(parts, 1))`` without building the concatenation: each part
        (B, F_i, h, w) goes through its slice of the first layer (standardisation folded into the weights and
        bias) and the results are summed. Feature stacks are ~2,000 channels of which the first layer keeps a
        few: concatenating, permuting and standardising them cost more than the model's fusion (measured)."""
        first = self.mlp[0] if isinstance(self.mlp, nn.Sequential) else self.mlp
        w = first.weight[:, :, 0, 0] / self.std  # (out, F)
        bias = first.bias - w @ self.mean
        out, start = None, 0
        for x in parts:
            n = x.shape[1]
            y = torch.einsum("of,bfhw->bohw", w[:, start:start + n].to(x.dtype), x)
            out = y if out is None else out + y
            start += n
        if start != w.shape[1]:
            raise ValueError(f"the parts have {start} channels, the head takes {w.shape[1]}")
        out = out + bias.view(1, -1, 1, 1).to(out.dtype)
        if isinstance(self.mlp, nn.Sequential):
            out = self.mlp[2](self.mlp[1](out))
        return out

    def forward_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) pixel features -> (N, K) logits: the same 1x1 convolutions as matrix products (a 1x1 conv over
        N images of 1 x 1 pixel pays per-image overhead: ~100x slower in training)."""
        return self.forward_standardised((x - self.mean) / self.std)

    def forward_standardised(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) already standardised pixel features -> (N, K) logits (training standardises its cache once)."""
        layers = list(self.mlp) if isinstance(self.mlp, nn.Sequential) else [self.mlp]
        for layer in layers:
            x = F.linear(x, layer.weight[:, :, 0, 0], layer.bias) if isinstance(layer, nn.Conv2d) else layer(x)
        return x
