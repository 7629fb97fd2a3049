"""Co-registered multi-modal multi-crop views for DINO-style self-supervised pretraining (SkySense stage 1).

Pure torch, batched, random per sample; every random number comes from an explicit ``torch.Generator``, so the
same generator seed gives identical views.

Geometry: one affine map per sample
    A view is described by ``theta`` (B, 2, 3), the ``F.affine_grid`` matrix (align_corners=False) that maps
    the view's normalised output coordinates (x = column, y = row, both in [-1, 1]) to the SOURCE's normalised
    coordinates. HR and S2/S1 of a sample cover the same ground extent, so the same theta applied to every
    modality keeps them co-registered whatever their pixel sizes. theta composes

        source = D @ F @ R^k @ out + c

    with ``D = diag(half_w, half_h)`` and ``c`` the crop box (half extents and centre in normalised source units),
    ``F = diag(+-1, +-1)`` the horizontal / vertical flips and ``R = [[0, -1], [1, 0]]`` a quarter turn.
    Hence ``view = torch.rot90(flip(crop), k, dims=(-2, -1))``: with row 0 drawn on top, ``k = 1`` turns the
    image counter-clockwise, exactly like ``torch.rot90``.

Order of operations in ``make_view``
    geometry (every modality, data and mask, dates folded into the batch) -> date disturbance -> per-date S2/S1
    gain / offset -> HR colour jitter, grayscale, Gaussian blur, solarisation -> channel-out (S2/S1).
    DINO's order for the RGB ops; where channel-out sits in the official code is not known (ours).

Shapes and units are those of ``skysense_core.inputs`` (HR 0..255, S2 reflectance x 1e4, S1 dB with NaN allowed).
Normalisation is left to the model.

Provenance of the hyper-parameters (``shared/research/skysense.md`` section 3.1): the multi-crop with one shared
crop box, flips, 90-degree rotations, colour jitter + grayscale, per-global-view blur probabilities, solarisation on
the 2nd global view with threshold 130 and channel-out are in the official code (values of DINO where the notes
give none). Marked ``[ours]`` below: everything else -- number of local crops, view sizes, the per-date S2/S1
jitter, date drop and day-of-year shift, channel-out per band, the NaN rule, which modality gets which op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from skysense_core.inputs import MODALITIES, ModalityInput, SkySenseInput

# A quarter turn in normalised (x, y) coordinates, chosen so that warping with it equals torch.rot90(k=1).
_QUARTER_TURN = ((0.0, -1.0), (1.0, 0.0))


# ----------------------------------------------------------------------------------------------------- specs


@dataclass
class ViewSpec:
    """How to draw one view.

    size: output side in Sentinel pixels of the common grid (HR output side = ``size * hr_ratio``).
    scale: range of the crop area as a fraction of the source area (uniform); ratio: range of the crop aspect
    ratio width / height (log-uniform), both as torchvision's RandomResizedCrop. flip_p: probability of each of
    the horizontal and vertical flips; rot90: random k * 90 degrees, k uniform in 0..3.
    blur_p, blur_sigma: Gaussian blur of HR, sigma in HR pixels (DINO: 0.1..2.0).
    solarize_p, solarize_threshold: HR values >= threshold become 255 - value (threshold 130 from the official code).
    jitter_p, brightness, contrast, saturation, hue: HR colour jitter (DINO: p 0.8, 0.4 / 0.4 / 0.2 / 0.1).
    grayscale_p: HR random grayscale (DINO: 0.2).
    s2_gain [ours]: per-date multiplicative gain on S2 reflectance; s1_offset_db [ours]: per-date additive offset
    on S1 dB, uniform in +-s1_offset_db.
    date_drop_p [ours]: each valid date dropped; doy_shift [ours]: each kept date's day of year moves by a
    uniform integer in [-doy_shift, doy_shift], wrapped into 1..366.
    channel_out_p: each S2/S1 band of a sample set to its spatial mean (the official code has "channel-out";
    per band and the value 0.1 are ours).
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rot90: bool = True
    blur_p: float = 0.5
    solarize_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_threshold: float = 130.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    s2_gain: tuple[float, float] = (0.9, 1.1)
    s1_offset_db: float = 1.0
    date_drop_p: float = 0.2
    doy_shift: int = 8
    channel_out_p: float = 0.1


@dataclass
class AugmentConfig:
    """The multi-crop recipe: ``n_global`` global views, then ``n_local`` local views.

    global_size / local_size [ours]: output sides as fractions of the input's common-grid side (the smaller of h, w),
    rounded to a multiple of ``size_multiple`` (set it to the ViT patch size) and at least one multiple.
    DINO uses 224 / 96 px; 1.0 / 0.5 keeps a 16-px Sentinel tile at 16 / 8 (multiples of the ViT patch 4).
    global_scale / local_scale: crop-area ranges as fractions of the input area. Global 0.4..1 is DINO's;
    local 0.1..0.4 is ours (DINO's default is 0.05..0.4; 0.1 keeps a local crop of a 16-px tile >= 5 x 5 px).
    n_local = 4 [ours] (DINO's default is 8; fewer on CPU).
    global_blur_p: per global view (DINO 1.0, 0.1); later global views use the last entry. local_blur_p 0.5 (DINO).
    global_solarize_p: per global view -- only the 2nd, p 0.2 (DINO / official code); later views get 0.
    The remaining fields are copied into every ViewSpec (see ViewSpec for their provenance).
    """

    n_global: int = 2
    n_local: int = 4
    global_size: float = 1.0
    local_size: float = 0.5
    size_multiple: int = 1
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rot90: bool = True
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    local_blur_p: float = 0.5
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_threshold: float = 130.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    s2_gain: tuple[float, float] = (0.9, 1.1)
    s1_offset_db: float = 1.0
    date_drop_p: float = 0.2
    doy_shift: int = 8
    channel_out_p: float = 0.1

    def _side(self, fraction: float, grid_side: int) -> int:
        m = self.size_multiple
        return max(m, int(round(fraction * grid_side / m)) * m)

    def specs(self, grid_hw: tuple[int, int]) -> list[ViewSpec]:
        """One ViewSpec per view for an input whose common grid is ``grid_hw``: globals first, then locals."""
        side = min(grid_hw)
        shared = dict(
            ratio=self.ratio, flip_p=self.flip_p, rot90=self.rot90, blur_sigma=self.blur_sigma,
            solarize_threshold=self.solarize_threshold, jitter_p=self.jitter_p, brightness=self.brightness,
            contrast=self.contrast, saturation=self.saturation, hue=self.hue, grayscale_p=self.grayscale_p,
            s2_gain=self.s2_gain, s1_offset_db=self.s1_offset_db, date_drop_p=self.date_drop_p,
            doy_shift=self.doy_shift, channel_out_p=self.channel_out_p,
        )
        out = []
        for i in range(self.n_global):
            blur = self.global_blur_p[min(i, len(self.global_blur_p) - 1)]
            sol = self.global_solarize_p[i] if i < len(self.global_solarize_p) else 0.0
            out.append(ViewSpec(size=self._side(self.global_size, side), scale=self.global_scale, blur_p=blur,
                                solarize_p=sol, **shared))
        for _ in range(self.n_local):
            out.append(ViewSpec(size=self._side(self.local_size, side), scale=self.local_scale,
                                blur_p=self.local_blur_p, solarize_p=0.0, **shared))
        return out


@dataclass
class View:
    """One augmented view: the batch, its geometry theta (B, 2, 3) and whether it is a global view."""

    input: SkySenseInput
    theta: torch.Tensor
    is_global: bool


# -------------------------------------------------------------------------------------------------- random


def _rand(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device (torch requires it), then moved to where it is used."""
    x = torch.rand(shape, generator=generator, device=generator.device)
    return x if device is None else x.to(device)


def _uniform(shape, lo: float, hi: float, generator: torch.Generator, device=None) -> torch.Tensor:
    return lo + (hi - lo) * _rand(shape, generator, device)


# ------------------------------------------------------------------------------------------------ geometry


def theta_from_params(
    center: torch.Tensor, half: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Compose crop, flips and rotation into theta (B, 2, 3).

    center (B, 2) and half (B, 2): the crop box as (x, y) centre and half extents in normalised source units
    (the whole source is centre 0, half 1). hflip, vflip (B,) bool; k (B,) int quarter turns (torch.rot90 sense).
    """
    b = center.shape[0]
    dev, dt = center.device, center.dtype
    r = torch.tensor(_QUARTER_TURN, device=dev, dtype=dt)
    rots = torch.stack([torch.linalg.matrix_power(r, i) for i in range(4)])  # exact: entries are 0 / +-1
    rk = rots[k.long().to(dev) % 4]  # (B, 2, 2)
    sign = torch.stack([1.0 - 2.0 * hflip.to(dev, dt), 1.0 - 2.0 * vflip.to(dev, dt)], dim=-1)  # (B, 2)
    lin = (half * sign).unsqueeze(-1) * rk  # diag(half) @ diag(sign) @ R^k, row-scaling
    return torch.cat([lin, center.reshape(b, 2, 1)], dim=-1)


def random_theta(
    batch_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_p: float,
    rot90: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random resized crop (inside the source) + flips + k*90 degree rotation, per sample -> theta (B, 2, 3).

    The crop area is uniform in ``scale`` (fraction of the source area) and its aspect ratio log-uniform in
    ``ratio``, both relative to the source's own extent. A side that would exceed the source is clamped to it
    (torchvision retries 10 times instead; clamping is ours and keeps the draw count fixed, hence determinism).
    Returned on the generator's device, float32.
    """
    b = batch_size
    area = _uniform(b, scale[0], scale[1], generator)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator)
    # half extents in normalised units: the source spans 2, so the fractions of its side are half extents
    half = torch.stack([torch.sqrt(area * torch.exp(log_r)), torch.sqrt(area / torch.exp(log_r))], dim=-1)
    half = half.clamp(max=1.0)
    center = (2.0 * _rand((b, 2), generator) - 1.0) * (1.0 - half)  # keeps the box inside the source
    hflip = _rand(b, generator) < flip_p
    vflip = _rand(b, generator) < flip_p
    k = torch.randint(0, 4, (b,), generator=generator, device=generator.device)
    if not rot90:
        k = torch.zeros_like(k)
    return theta_from_params(center, half, hflip, vflip, k)


def invert_theta(theta: torch.Tensor) -> torch.Tensor:
    """Inverse affine map (B, 2, 3): [A | t] -> [A^-1 | -A^-1 t], by the 2x2 cofactor formula."""
    a, b_, c = theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2]
    d, e, f = theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2]
    det = a * e - b_ * d
    ia, ib, id_, ie = e / det, -b_ / det, -d / det, a / det
    tx = -(ia * c + ib * f)
    ty = -(id_ * c + ie * f)
    return torch.stack([torch.stack([ia, ib, tx], -1), torch.stack([id_, ie, ty], -1)], dim=1)


def compose_theta(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """outer o inner as (B, 2, 3): first ``inner``, then ``outer`` (3x3 homogeneous product)."""
    lin = outer[:, :, :2] @ inner[:, :, :2]
    t = outer[:, :, :2] @ inner[:, :, 2:] + outer[:, :, 2:]
    return torch.cat([lin, t], dim=-1)


def _grid(theta: torch.Tensor, n: int, c: int, out_hw: tuple[int, int]) -> torch.Tensor:
    return F.affine_grid(theta.float(), [n, c, out_hw[0], out_hw[1]], align_corners=False)


def _inside(grid: torch.Tensor) -> torch.Tensor:
    """(N, h, w) bool: the output pixel centre maps into the source extent [-1, 1]^2."""
    return (grid.abs() <= 1.0).all(dim=-1)


def warp(
    x: torch.Tensor,
    theta: torch.Tensor,
    out_hw: tuple[int, int],
    mode: str,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Resample x (N, C, H, W) through theta (N, 2, 3) onto an ``out_hw`` grid -> (N, C, *out_hw).

    mode "bicubic" (HR): border padding -- random crops stay inside the source, but the 4x4 bicubic support
    reaches past the edge and zero padding would darken a rim; NaN is not expected in HR and becomes 0.
    ``clamp`` (e.g. (0, 255)) cuts the bicubic overshoot.
    mode "bilinear" (S2/S1): NaN-safe normalised interpolation: NaN -> 0, the finite indicator is warped too and
    the result divided by it; where less than half of the interpolation weight is finite the output is NaN
    again (the 0.5 is ours), so NaN areas stay invalid and never leak into finite pixels.
    mode "nearest" (masks, bool or float): zero padding, so anything outside the source is False / 0.
    A sample whose sampling positions all fall on source pixel centres (identity, flips, quarter turns, integer
    shifts at 1:1 scale) is copied exactly (nearest), whatever the mode.
    """
    n, c = x.shape[:2]
    grid = _grid(theta.to(x.device), n, c, out_hw)
    if mode == "nearest":
        out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return out > 0.5 if x.dtype == torch.bool else out.to(x.dtype)
    if mode == "bicubic":
        out = F.grid_sample(torch.nan_to_num(x.float()), grid, mode="bicubic", padding_mode="border",
                            align_corners=False)
    elif mode == "bilinear":
        finite = torch.isfinite(x)
        if bool(finite.all()):  # the common case: no division needed
            out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        else:
            pair = torch.cat([torch.where(finite, x.float(), 0.0), finite.float()], dim=1)
            pair = F.grid_sample(pair, grid, mode="bilinear", padding_mode="border", align_corners=False)
            val, weight = pair[:, :c], pair[:, c:]
            out = torch.where(weight > 0.5, val / weight.clamp(min=1e-6), float("nan"))
    else:
        raise ValueError(f"unknown warp mode {mode!r}; expected 'bicubic', 'bilinear' or 'nearest'")
    # Pixel-aligned maps (identity, flips, quarter turns, integer shifts at 1:1 scale) should copy pixels, but
    # affine_grid's float32 coordinates miss the centres by ~1e-5 px, which interpolation turns into ~1e-6
    # relative noise. Those samples are read with nearest instead, so such views are bit-exact.
    aligned = _pixel_aligned(grid, x.shape[-2:])
    if bool(aligned.any()):
        exact = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        out = torch.where(aligned.view(-1, 1, 1, 1), exact, out)
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    return out


def _pixel_aligned(grid: torch.Tensor, hw, tol: float = 1e-3) -> torch.Tensor:
    """(N,) bool: every sampling position of the sample lies on a source pixel centre inside the source."""
    h, w = hw
    px = ((grid[..., 0] + 1.0) * w - 1.0) / 2.0  # align_corners=False unnormalisation
    py = ((grid[..., 1] + 1.0) * h - 1.0) / 2.0
    rx, ry = px.round(), py.round()
    ok = ((px - rx).abs() < tol) & ((py - ry).abs() < tol) & (rx >= 0) & (rx <= w - 1) & (ry >= 0) & (ry <= h - 1)
    return ok.flatten(1).all(dim=1)


def align(
    feat_b: torch.Tensor, theta_b: torch.Tensor, theta_a: torch.Tensor, out_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample view b's feature map onto view a's pixel grid -> (B, C, *out_hw), valid (B, *out_hw) bool.

    For each pixel of view a (normalised centre u): the source position is theta_a u, and its position in view b
    is theta_b^-1 (theta_a u). Bilinear sampling there (border padding so the half-pixel rim inside view b
    is defined); ``valid`` is True where that position lies inside view b ([-1, 1]^2), i.e. where both views see
    the same ground. feat_b may have any resolution (it is addressed in normalised coordinates).
    """
    b, c = feat_b.shape[:2]
    theta_ba = compose_theta(invert_theta(theta_b.to(feat_b.device).float()), theta_a.to(feat_b.device).float())
    grid = _grid(theta_ba, b, c, out_hw)
    out = F.grid_sample(feat_b, grid.to(feat_b.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out, _inside(grid)


# ------------------------------------------------------------------------------------------- photometric


def _gray(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W), ITU-R 601 luma as torchvision."""
    r, g, b = rgb.unbind(dim=-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in 0..1 -> hue, saturation, value in 0..1."""
    r, g, b = rgb.unbind(dim=1)
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), 0.0)
    safe = torch.where(delta > 0, delta, 1.0)
    h = torch.where(maxc == r, ((g - b) / safe) % 6.0,
                    torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > 0, h / 6.0, 0.0) % 1.0
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(dim=1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # the six hue sectors, each a permutation of (v, t, p, q)
    table = torch.stack([
        torch.stack([v, t, p], 1), torch.stack([q, v, p], 1), torch.stack([p, v, t], 1),
        torch.stack([p, q, v], 1), torch.stack([t, p, v], 1), torch.stack([v, p, q], 1),
    ], dim=1)  # (N, 6, 3, H, W)
    idx = i.unsqueeze(1).unsqueeze(2).expand(-1, 1, 3, -1, -1)
    return table.gather(1, idx).squeeze(1)


def _color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """HR (N, 3, H, W) 0..255; factors (N, 4) = brightness, contrast, saturation multipliers and hue shift.

    Fixed order brightness, contrast, saturation, hue (torchvision permutes the order at random; a fixed order is
    ours, it batches). Clamped to 0..255 after each op, as torchvision; hue is rotated in HSV as torchvision.
    """
    n = x.shape[0]
    bri, con, sat, hue = (f.view(n, 1, 1, 1) for f in factors.unbind(dim=1))
    x = (x * bri).clamp(0, 255)
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)  # contrast pivots on the image's mean luma
    x = (con * x + (1 - con) * mean).clamp(0, 255)
    x = (sat * x + (1 - sat) * _gray(x)).clamp(0, 255)
    hsv = _rgb_to_hsv(x / 255.0)
    hsv = torch.cat([(hsv[:, :1] + hue) % 1.0, hsv[:, 1:]], dim=1)
    return (_hsv_to_rgb(hsv) * 255.0).clamp(0, 255)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable blur of (N, C, H, W) with one sigma per image (N,); replicate padding (any image size)."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3.0 * max_sigma))
    offs = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kern = torch.exp(-0.5 * (offs / sigma.view(n, 1).clamp(min=1e-3)) ** 2)
    kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, K)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, kern.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, kern.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def _hr_photometric(data: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
    """HR (B, T, 3, H, W) 0..255: colour jitter, grayscale, blur, solarisation (DINO order).

    Each is decided and parametrised per sample and shared by that sample's HR dates (ours: one "look" per view;
    the per-date disturbance is reserved for S2/S1). Every random number is drawn whatever the probabilities, so
    the generator stream never depends on outcomes; an op is computed only when some sample needs it.
    """
    b, t = data.shape[:2]
    dev = data.device
    x = data.flatten(0, 1).float()

    def per_sample(values: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B*T, ...) with dates of a sample sharing
        return values.repeat_interleave(t, dim=0)

    do_jitter = per_sample(_rand(b, generator, dev) < spec.jitter_p)
    lo = torch.tensor([1 - spec.brightness, 1 - spec.contrast, 1 - spec.saturation, -spec.hue], device=dev)
    hi = torch.tensor([1 + spec.brightness, 1 + spec.contrast, 1 + spec.saturation, spec.hue], device=dev)
    factors = per_sample(lo + (hi - lo) * _rand((b, 4), generator, dev))
    do_gray = per_sample(_rand(b, generator, dev) < spec.grayscale_p)
    do_blur = per_sample(_rand(b, generator, dev) < spec.blur_p)
    sigma = per_sample(_uniform(b, spec.blur_sigma[0], spec.blur_sigma[1], generator, dev))
    do_sol = per_sample(_rand(b, generator, dev) < spec.solarize_p)

    def where(flag: torch.Tensor, new, old: torch.Tensor) -> torch.Tensor:
        return torch.where(flag.view(-1, 1, 1, 1), new(), old) if bool(flag.any()) else old

    x = where(do_jitter, lambda: _color_jitter(x, factors), x)
    x = where(do_gray, lambda: _gray(x).expand_as(x), x)
    x = where(do_blur, lambda: _gaussian_blur(x, sigma, spec.blur_sigma[1]), x)
    x = where(do_sol, lambda: torch.where(x >= spec.solarize_threshold, 255.0 - x, x), x)
    return x.view(data.shape)


def _date_jitter(name: str, data: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
    """[ours] Each date gets its own radiometric disturbance: S2 gain (reflectance x g), S1 offset (dB + o).

    Stands in for residual calibration / atmosphere differences between acquisitions. HR is left alone here.
    """
    b, t = data.shape[:2]
    if name == "s2":
        gain = _uniform((b, t), spec.s2_gain[0], spec.s2_gain[1], generator, data.device)
        return data * gain.view(b, t, 1, 1, 1)
    if name == "s1":
        off = _uniform((b, t), -spec.s1_offset_db, spec.s1_offset_db, generator, data.device)
        return data + off.view(b, t, 1, 1, 1)
    return data


def _channel_out(data: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each band of a sample (shared by its dates) replaced, with probability p, by its spatial mean per date.

    NaN pixels stay NaN (they mark invalid S1 data) and are left out of the mean.
    """
    b, t, c = data.shape[:3]
    drop = (_rand((b, c), generator, data.device) < p).view(b, 1, c, 1, 1)
    if not bool(drop.any()):
        return data
    mean = torch.nanmean(data, dim=(-2, -1), keepdim=True)
    return torch.where(drop & torch.isfinite(data), mean.expand_as(data), data)


def _disturb_dates(m: ModalityInput, spec: ViewSpec, generator: torch.Generator) -> ModalityInput:
    """[ours] Drop each valid date with ``date_drop_p`` but keep at least one per sample that has any (a random
    one of its valid dates is restored); shift each kept day of year by a uniform integer in +-``doy_shift``,
    wrapped into 1..366. Dropped dates become padding: valid False, doy 0, mask False (data left as is)."""
    b, t = m.valid.shape
    dev = m.valid.device
    drop_u = _rand((b, t), generator, dev)
    pick_u = _rand((b, t), generator, dev)
    shift = torch.randint(-spec.doy_shift, spec.doy_shift + 1, (b, t), generator=generator, device=generator.device)
    shift = shift.to(dev)
    valid = m.valid.bool()
    kept = valid & (drop_u >= spec.date_drop_p)
    lost = valid.any(dim=1) & ~kept.any(dim=1)
    choice = torch.where(valid, pick_u, -1.0).argmax(dim=1)
    kept = kept | (lost.unsqueeze(1) & F.one_hot(choice, t).bool())
    doy = torch.where(kept, (m.doy - 1 + shift) % 366 + 1, torch.zeros_like(m.doy))
    mask = None if m.mask is None else m.mask & kept.view(b, t, 1, 1)
    return ModalityInput(data=m.data, valid=kept, doy=doy, mask=mask)


def _warp_modality(m: ModalityInput, theta: torch.Tensor, out_hw: tuple[int, int], mode: str,
                   clamp: tuple[float, float] | None) -> ModalityInput:
    """Geometry for one modality: dates folded into the batch, the sample's theta repeated for each date."""
    b, t, c, h, w = m.data.shape
    th = theta.to(m.data.device).repeat_interleave(t, dim=0)
    data = warp(m.data.flatten(0, 1), th, out_hw, mode, clamp).view(b, t, c, *out_hw)
    if m.mask is not None:
        # masks may live on another grid than the data (e.g. an HR mask on the Sentinel grid): keep the ratio
        mh, mw = m.mask.shape[-2:]
        mask_hw = (max(1, round(mh * out_hw[0] / h)), max(1, round(mw * out_hw[1] / w)))
        flat = m.mask.flatten(0, 1).bool().unsqueeze(1)
        mask = warp(flat, th, mask_hw, "nearest")[:, 0]
        # nearest rounding still hits the edge pixel up to half a pixel outside: be strict about the extent
        mask = (mask & _inside(_grid(th, b * t, 1, mask_hw).to(mask.device))).view(b, t, *mask_hw)
        nan = torch.isnan(data)
        if bool(nan.any()):  # a pixel whose interpolation was mostly NaN is unusable
            finite = (~nan.any(dim=2)).float()
            if tuple(mask_hw) != tuple(out_hw):
                finite = F.interpolate(finite, size=mask_hw, mode="nearest")
            mask = mask & (finite > 0.5)
    else:
        inside = _inside(_grid(th, b * t, 1, out_hw)).to(data.device)
        # no mask to carry it: create one only if the view reaches outside the source (never for random_theta)
        mask = None if bool(inside.all()) else inside.view(b, t, *out_hw)
    return ModalityInput(data=data, valid=m.valid, doy=m.doy, mask=mask)


# ---------------------------------------------------------------------------------------------------- views

_WARP_MODE = {"hr": ("bicubic", (0.0, 255.0)), "s2": ("bilinear", None), "s1": ("bilinear", None)}


def make_view(
    batch: SkySenseInput,
    theta: torch.Tensor,
    size: int,
    hr_ratio: int,
    spec: ViewSpec,
    generator: torch.Generator,
) -> SkySenseInput:
    """One view of every present modality: geometry through theta (B, 2, 3), then the random ops of ``spec``.

    Output shapes: HR (B, T_hr, 3, size*hr_ratio, size*hr_ratio), S2/S1 (B, T, C, size, size); masks on their
    own grid scaled like the data, False where the view samples outside the source or where S1 became NaN.
    lat / lon are kept. ``size`` overrides ``spec.size`` (they normally agree).
    """
    if theta.dim() != 3 or tuple(theta.shape) != (batch.batch_size, 2, 3):
        raise ValueError(f"theta must be (B, 2, 3) = ({batch.batch_size}, 2, 3), got {tuple(theta.shape)}")
    out = {}
    for name in batch.modalities:
        m: ModalityInput = getattr(batch, name)
        side = size * hr_ratio if name == "hr" else size
        mode, clamp = _WARP_MODE[name]
        out[name] = _warp_modality(m, theta, (side, side), mode, clamp)
    # random ops, in a fixed modality order so the generator stream is reproducible
    for name in MODALITIES:
        if name in out:
            out[name] = _disturb_dates(out[name], spec, generator)
    for name in ("s2", "s1"):
        if name in out:
            out[name].data = _date_jitter(name, out[name].data, spec, generator)
    if "hr" in out:
        out["hr"].data = _hr_photometric(out["hr"].data, spec, generator)
    for name in ("s2", "s1"):
        if name in out:
            out[name].data = _channel_out(out[name].data, spec.channel_out_p, generator)
    return SkySenseInput(**out, lat=batch.lat, lon=batch.lon)


def make_views(batch: SkySenseInput, hr_ratio: int, cfg: AugmentConfig, generator: torch.Generator) -> list[View]:
    """All views of a batch: ``cfg.n_global`` global views first, then ``cfg.n_local`` local views.

    Each view draws its own theta (per sample) and its own photometric / date randomness; all modalities of a
    sample share the view's theta, so they stay co-registered. theta is returned on the batch's device.
    """
    b = batch.batch_size
    device = getattr(batch, batch.modalities[0]).data.device
    views = []
    for i, spec in enumerate(cfg.specs(batch.grid_size(hr_ratio))):
        theta = random_theta(b, spec.scale, spec.ratio, spec.flip_p, spec.rot90, generator).to(device)
        views.append(View(input=make_view(batch, theta, spec.size, hr_ratio, spec, generator), theta=theta,
                          is_global=i < cfg.n_global))
    return views
