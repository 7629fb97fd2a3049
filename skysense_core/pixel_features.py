"""Per-pixel feature stacks for dense heads: what a segmentation head sees at each 10 m grid cell.

F_fus alone squeezes every date into one token; on the demo region a probe on it scores 0.41-0.69 mIoU where
per-date tokens binned by month score 0.80 and the raw monthly spectra 0.97 (issue 16's measurements), because
``crop_early`` and ``crop_late`` differ only in *when* they are green. So a head can read, per grid cell:

- ``fused``: F_fus (B, 2D, h, w) (the paper's downstream input);
- ``dates``: F_fus, then the per-date tokens of every dated modality, averaged within each month and laid out in
  calendar order (B, months * C per modality, h, w), then the HR tokens' date mean (B, C, h, w): the time
  series, ordered by date, at the model's own feature width;
- ``dates+input``: ``dates`` plus the input itself as a skip connection (:func:`input_features`: monthly means
  of the normalised S2 and S1 bands, HR mean and standard deviation per grid cell), as U-Net decoders see their
  input. The model's features then add to what the spectra say instead of having to re-derive them.

A month without a usable date takes the modality's all-date value at that pixel (so a head never sees a hole),
and a pixel with no usable date at all gets zeros. Everything is pure torch on the model's device, computed
from one forward's :class:`skysense_core.model.SkySenseOutput` and its input; nothing here is trained.

The month bins are [ours]: SkySense's fusion reads dates through a day-of-year encoding, which is order-aware
only after training; a fixed calendar layout gives a frozen head the order for free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skysense_core.inputs import SkySenseInput, normalise

FEATURE_SETS = ("fused", "dates", "dates+input")
MONTHS = 12
# first day of year of each month in a non-leap year, and 367 as the end (a leap year's Dec 31 is day 366)
_MONTH_START = torch.tensor([1, 32, 60, 91, 121, 152, 182, 213, 244, 274, 305, 335, 367])


def month_of_doy(doy: torch.Tensor) -> torch.Tensor:
    """Day of year 1..366 (int64, any shape) -> month 0..11; padding (0) -> -1. Leap days shift by one day at
    most, which month bins do not resolve anyway."""
    m = torch.bucketize(doy, _MONTH_START.to(doy.device), right=True) - 1
    return torch.where(doy > 0, m.clamp(0, MONTHS - 1), torch.full_like(m, -1))


def monthly(values: torch.Tensor, keep: torch.Tensor, doy: torch.Tensor) -> torch.Tensor:
    """Per-month mean of a time series at every pixel.

    values (B, T, C, h, w), keep (B, T, h, w) bool (the date is usable at that pixel), doy (B, T) int64 ->
    (B, 12 * C, h, w) float32: month 0's C channels first. A month without a usable date takes the all-date
    mean; a pixel without any usable date is 0. One pass over the series: the month sums are a batched matrix
    product of a (B, 12, T) month one-hot with the masked values (a loop over months costs ~10x more)."""
    b, t, c, h, w = values.shape
    if doy.dim() != 2:
        raise ValueError(f"monthly features need one day of year per date, (B, T); got {tuple(doy.shape)}")
    month = month_of_doy(doy)  # (B, T)
    onehot = (month.unsqueeze(-1) == torch.arange(MONTHS, device=doy.device)).to(torch.float32)  # (B, T, 12)
    k = keep.to(torch.float32)
    # Without autograd, in place: every pass over the (B, T, C, h, w) series costs as much as the month sums
    # themselves (2x faster on the demo's windows, measured, the same values).
    in_place = not (torch.is_grad_enabled() and values.requires_grad)
    x = values.float() * k.unsqueeze(2)
    x = x.nan_to_num_() if in_place else torch.nan_to_num(x)
    sums = torch.bmm(onehot.transpose(1, 2), x.reshape(b, t, -1)).view(b, MONTHS, c, h, w)
    counts = torch.bmm(onehot.transpose(1, 2), k.reshape(b, t, -1)).view(b, MONTHS, 1, h, w)
    overall = sums.sum(1) / counts.sum(1).clamp(min=1)  # (B, C, h, w); 0 where nothing is usable
    if not in_place:
        return torch.where(counts > 0, sums / counts.clamp(min=1), overall.unsqueeze(1)).reshape(b, MONTHS * c, h, w)
    sums.div_(counts.clamp(min=1))
    torch.where(counts > 0, sums, overall.unsqueeze(1), out=sums)
    return sums.view(b, MONTHS * c, h, w)


def _usable(x, grid: tuple[int, int]) -> torch.Tensor:
    """(B, T, h, w) bool: the date exists and its mask (if any) says the grid cell is usable."""
    b, t = x.valid.shape
    ok = x.valid[:, :, None, None].expand(b, t, *grid)
    if x.mask is not None:
        m = x.mask.float()
        if tuple(m.shape[-2:]) != grid:  # HR mask: usable if half its HR pixels are
            m = F.adaptive_avg_pool2d(m.flatten(0, 1)[:, None], grid)[:, 0].view(b, t, *grid)
        ok = ok & (m >= 0.5)
    return ok


def input_features(x: SkySenseInput, hr_ratio: int) -> torch.Tensor:
    """The raw-input features of every grid cell, (B, F, h, w) float32: per dated Sentinel modality (S2 then S1)
    the monthly means of its normalised bands (12 * bands channels), then for HR the mean and standard
    deviation of the normalised RGB within the cell, averaged over usable HR dates (6 channels). Modalities the
    batch lacks are left out (their width is then missing: a head is built for one modality mix). This is the
    raw-pixel baseline's feature vector too (``pipeline.baselines``), so model and baseline read the same input.
    """
    grid = x.grid_size(hr_ratio)
    parts = []
    for m in ("s2", "s1"):
        mi = getattr(x, m)
        if mi is None:
            continue
        norm = normalise(m, mi.data)
        keep = _usable(mi, grid) & torch.isfinite(mi.data).all(2)
        parts.append(monthly(norm, keep, mi.doy))
    if x.hr is not None:
        hr = x.hr
        b, t = hr.valid.shape
        norm = normalise("hr", hr.data).flatten(0, 1)  # (B T, 3, H r, W r)
        mean = F.avg_pool2d(norm, hr_ratio)
        std = (F.avg_pool2d(norm * norm, hr_ratio) - mean * mean).clamp(min=0).sqrt()
        stats = torch.cat([mean, std], 1).view(b, t, 6, *grid)
        keep = _usable(hr, grid).unsqueeze(2).float()
        parts.append((stats * keep).sum(1) / keep.sum(1).clamp(min=1))
    return torch.cat(parts, 1)


def pixel_features(kind: str, out, x: SkySenseInput, hr_ratio: int, parts: bool = False):
    """The feature stack ``kind`` (:data:`FEATURE_SETS`) of one forward: ``out`` a SkySenseOutput, ``x`` its
    input. Returns (B, F, h, w) float32, or with ``parts`` the list of its pieces in order (their concatenation;
    ``PixelHead.forward_parts`` reads them without concatenating)."""
    if kind not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {kind!r}; choose one of {FEATURE_SETS}")
    pieces = [out.fused.float()]
    if kind in ("dates", "dates+input"):
        for m in ("s2", "s1"):
            if m in out.tokens and getattr(x, m) is not None:
                pieces.append(monthly(out.tokens[m], out.keep[m], getattr(x, m).doy))
        if "hr" in out.tokens:
            tok, keep = out.tokens["hr"].float(), out.keep["hr"].unsqueeze(2).float()
            pieces.append((tok * keep).sum(1) / keep.sum(1).clamp(min=1))
    if kind == "dates+input":
        pieces.append(input_features(x, hr_ratio))
    return pieces if parts else torch.cat(pieces, 1)


def feature_dim(kind: str, cfg, modalities, bands: dict[str, int] | None = None) -> int:
    """Width F of :func:`pixel_features` for a model config ``cfg`` and the input ``modalities``; ``bands``:
    channels per Sentinel modality (default: the config's)."""
    bands = bands or {"s2": cfg.s2_bands, "s1": cfg.s1_bands}
    fused = cfg.fusion_dim * (2 if cfg.geo_context else 1)
    n = fused
    if kind in ("dates", "dates+input"):
        n += sum(MONTHS * cfg.token_dim for m in ("s2", "s1") if m in modalities)
        n += cfg.token_dim if "hr" in modalities else 0
    if kind == "dates+input":
        n += sum(MONTHS * bands[m] for m in ("s2", "s1") if m in modalities) + (6 if "hr" in modalities else 0)
    return n
