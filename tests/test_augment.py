"""Co-registered multi-modal views (skysense_core.augment): geometry, alignment, photometric and date ops."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from skysense_core.augment import (
    AugmentConfig,
    View,
    ViewSpec,
    _color_jitter,
    align,
    compose_theta,
    invert_theta,
    make_view,
    make_views,
    random_theta,
    theta_from_params,
    warp,
)
from skysense_core.inputs import ModalityInput, SkySenseInput

pytestmark = pytest.mark.usefixtures("torch_one_thread")


R = 4  # HR pixels per Sentinel pixel in these tests
H = 16  # Sentinel grid side


def quiet_spec(size: int, **kw) -> ViewSpec:
    """A spec with every photometric / date op switched off: pure geometry."""
    base = dict(size=size, scale=(1.0, 1.0), flip_p=0.0, rot90=False, blur_p=0.0, solarize_p=0.0, jitter_p=0.0,
                grayscale_p=0.0, s2_gain=(1.0, 1.0), s1_offset_db=0.0, date_drop_p=0.0, doy_shift=0,
                channel_out_p=0.0)
    base.update(kw)
    return ViewSpec(**base)


def quiet_config(**kw) -> AugmentConfig:
    base = dict(global_blur_p=(0.0, 0.0), local_blur_p=0.0, global_solarize_p=(0.0, 0.0), jitter_p=0.0,
                grayscale_p=0.0, s2_gain=(1.0, 1.0), s1_offset_db=0.0, date_drop_p=0.0, doy_shift=0,
                channel_out_p=0.0)
    base.update(kw)
    return AugmentConfig(**base)


def smooth_field(b: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Low-frequency random field in about [-1, 1], sampled at pixel centres of an h x w grid over [-1, 1]^2."""
    g = torch.Generator().manual_seed(seed)
    ys = (torch.arange(h) + 0.5) / h * 2 - 1
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    out = torch.zeros(b, c, h, w)
    for _ in range(3):
        fx, fy, ph = (torch.rand(b, c, 1, 1, generator=g) * 2 for _ in range(3))
        out += torch.sin(math.pi * (fx * xx + fy * yy) + math.pi * ph) / 3
    return out


def make_batch(b: int = 2, t_s2: int = 3, t_s1: int = 2, seed: int = 0, nan_s1: bool = True) -> SkySenseInput:
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 1, 3, H * R, H * R, generator=g) * 255
    s2 = torch.rand(b, t_s2, 10, H, H, generator=g) * 4000
    s1 = torch.randn(b, t_s1, 2, H, H, generator=g) * 3 - 15
    if nan_s1:
        s1[:, :, :, 2:7, 4:10] = float("nan")  # a swath gap
    ones = lambda t: torch.ones(b, t, dtype=torch.bool)  # noqa: E731
    doy = lambda t: torch.randint(1, 367, (b, t), generator=g)  # noqa: E731
    return SkySenseInput(
        hr=ModalityInput(hr, ones(1), doy(1), torch.rand(b, 1, H * R, H * R, generator=g) > 0.1),
        s2=ModalityInput(s2, ones(t_s2), doy(t_s2), torch.rand(b, t_s2, H, H, generator=g) > 0.2),
        s1=ModalityInput(s1, ones(t_s1), doy(t_s1), torch.isfinite(s1).all(dim=2)),
        lat=torch.linspace(-40, 40, b), lon=torch.linspace(10, 20, b),
    )


def identity(b: int) -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(b, 2, 3).clone()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that treats NaN == NaN."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def inputs_equal(x: SkySenseInput, y: SkySenseInput) -> bool:
    for m in ("hr", "s2", "s1"):
        a, b = getattr(x, m), getattr(y, m)
        if not (same(a.data, b.data) and torch.equal(a.valid, b.valid) and torch.equal(a.doy, b.doy)):
            return False
        if (a.mask is None) != (b.mask is None) or (a.mask is not None and not torch.equal(a.mask, b.mask)):
            return False
    return True


# ------------------------------------------------------------------------------------------------ geometry


def test_identity_theta_reproduces_input_exactly():
    batch = make_batch()
    view = make_view(batch, identity(2), H, R, quiet_spec(H), torch.Generator().manual_seed(0))
    assert inputs_equal(view, batch)
    assert torch.equal(view.lat, batch.lat) and torch.equal(view.lon, batch.lon)


def test_quarter_turns_and_flips_match_torch():
    """Direction convention: k quarter turns == torch.rot90(x, k, dims=(-2, -1)) (counter-clockwise on screen)."""
    x = torch.arange(4.0).view(1, 1, 2, 2)
    one = theta_from_params(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([False]), torch.tensor([False]),
                            torch.tensor([1]))
    assert torch.equal(one, torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]]))
    assert torch.equal(warp(x, one, (2, 2), "bilinear"), torch.tensor([[[[1.0, 3.0], [0.0, 2.0]]]]))

    img = torch.rand(1, 3, 12, 12) * 255
    no = torch.tensor([False])
    for k in range(4):
        th = theta_from_params(torch.zeros(1, 2), torch.ones(1, 2), no, no, torch.tensor([k]))
        for mode in ("bicubic", "bilinear", "nearest"):
            assert torch.equal(warp(img, th, (12, 12), mode), torch.rot90(img, k, dims=(-2, -1)))
    hf = theta_from_params(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([True]), no, torch.tensor([0]))
    vf = theta_from_params(torch.zeros(1, 2), torch.ones(1, 2), no, torch.tensor([True]), torch.tensor([0]))
    assert torch.equal(warp(img, hf, (12, 12), "bicubic"), torch.flip(img, dims=(-1,)))
    assert torch.equal(warp(img, vf, (12, 12), "bilinear"), torch.flip(img, dims=(-2,)))
    # composition order: view = rot90(flip(crop), k)
    both = theta_from_params(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([True]), no, torch.tensor([1]))
    assert torch.equal(warp(img, both, (12, 12), "nearest"), torch.rot90(torch.flip(img, dims=(-1,)), 1, (-2, -1)))


def test_random_theta_stays_inside_source_and_inverts():
    g = torch.Generator().manual_seed(1)
    th = random_theta(256, (0.1, 1.0), (3 / 4, 4 / 3), 0.5, True, g)
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]).T
    assert (th @ corners).abs().max() <= 1 + 1e-6  # the crop box lies inside the source
    lin = th[:, :, :2]
    area = (lin[:, 0, 0] * lin[:, 1, 1] - lin[:, 0, 1] * lin[:, 1, 0]).abs()  # quarter of the normalised area
    assert area.min() >= 0.1 - 1e-5 and area.max() <= 1 + 1e-5
    assert torch.allclose(compose_theta(invert_theta(th), th), identity(256), atol=1e-5)
    assert not torch.equal(th, random_theta(256, (0.1, 1.0), (3 / 4, 4 / 3), 0.5, True, g))


def _hr_from_s2(s2_band: torch.Tensor) -> torch.Tensor:
    """(B, T, h, w) -> HR (B, T, 3, h*R, w*R) by nearest upsampling."""
    up = s2_band.repeat_interleave(R, dim=-2).repeat_interleave(R, dim=-1)
    return up.unsqueeze(2).expand(-1, -1, 3, -1, -1).contiguous()


def _coreg_batch(s2_band: torch.Tensor, mask: torch.Tensor) -> SkySenseInput:
    b = s2_band.shape[0]
    s2 = s2_band.unsqueeze(2).expand(-1, -1, 10, -1, -1).contiguous()
    one = torch.ones(b, 1, dtype=torch.bool)
    doy = torch.full((b, 1), 100)
    hr_mask = mask.repeat_interleave(R, dim=-2).repeat_interleave(R, dim=-1)
    return SkySenseInput(hr=ModalityInput(_hr_from_s2(s2_band), one, doy, hr_mask),
                         s2=ModalityInput(s2, one, doy, mask))


def test_coregistration_pixel_aligned_crops_is_exact():
    g = torch.Generator().manual_seed(2)
    b = 8
    band = torch.rand(b, 1, H, H, generator=g) * 255
    mask = torch.rand(b, 1, H, H, generator=g) > 0.5
    batch = _coreg_batch(band, mask)
    # 8 x 8 Sentinel-pixel boxes at integer offsets (1:1 scale), every flip / quarter-turn combination
    size = 8
    offset = torch.randint(0, H - size + 1, (b, 2), generator=g).float()
    center = (2 * offset + size) / H - 1
    half = torch.full((b, 2), size / H)
    hflip, vflip = torch.arange(b) % 2 == 1, torch.arange(b) % 4 >= 2
    theta = theta_from_params(center, half, hflip, vflip, torch.arange(b) % 4)
    view = make_view(batch, theta, size, R, quiet_spec(size), g)
    hr_down = F.avg_pool2d(view.hr.data[:, 0, :1], R)
    assert torch.allclose(hr_down, view.s2.data[:, 0, :1], atol=1e-3)
    assert torch.equal(view.hr.mask[:, :, ::R, ::R], view.s2.mask)
    # and it is really the crop: sample 0 has no flip, no turn
    oy, ox = offset[0].long().tolist()[::-1]
    assert torch.equal(view.s2.data[0, 0, 0], band[0, 0, oy:oy + size, ox:ox + size])


def test_coregistration_random_crops_flips_rotations():
    g = torch.Generator().manual_seed(3)
    b = 16
    band = (smooth_field(b, 1, H, H, seed=3) + 1) * 100  # 0..200, smooth at the Sentinel scale
    mask = smooth_field(b, 1, H, H, seed=4) > 0
    batch = _coreg_batch(band, mask)
    theta = random_theta(b, (0.3, 1.0), (3 / 4, 4 / 3), 0.5, True, g)
    size = 12
    view = make_view(batch, theta, size, R, quiet_spec(size), g)
    hr_down = F.avg_pool2d(view.hr.data[:, 0, :1], R)
    err = (hr_down - view.s2.data[:, 0, :1]).abs()
    # HR is a nearest (blocky) upsampling, S2 interpolates bilinearly: they agree to a few percent of the range
    assert err.mean() < 3.0 and err.max() < 25.0
    # masks: the HR mask at each Sentinel pixel's centre agrees with the S2 mask except along blob boundaries
    agree = (view.hr.mask[:, :, R // 2::R, R // 2::R] == view.s2.mask).float().mean()
    assert agree > 0.93
    # every view pixel is inside the source: no mask was cleared for being outside
    assert view.hr.mask.sum() > 0


def test_outside_source_clears_masks_and_creates_one_when_absent():
    batch = make_batch(b=1, nan_s1=False)
    batch.s2.mask = None
    # a box whose right half hangs outside the source
    theta = theta_from_params(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([False]),
                              torch.tensor([False]), torch.tensor([0]))
    view = make_view(batch, theta, 8, R, quiet_spec(8), torch.Generator().manual_seed(0))
    assert not view.s1.mask[..., 4:].any() and not view.hr.mask[..., 4 * R:].any()
    assert view.s2.mask is not None and view.s2.mask[..., :4].all() and not view.s2.mask[..., 4:].any()


# ---------------------------------------------------------------------------------------------------- align


def test_align_resamples_view_b_onto_view_a():
    g = torch.Generator().manual_seed(5)
    b, out = 16, (24, 24)
    field = smooth_field(b, 2, 64, 64, seed=5)
    theta_a = random_theta(b, (0.3, 1.0), (3 / 4, 4 / 3), 0.5, True, g)
    theta_b = random_theta(b, (0.3, 1.0), (3 / 4, 4 / 3), 0.5, True, g)
    view_a = warp(field, theta_a, out, "bilinear")
    view_b = warp(field, theta_b, (20, 20), "bilinear")  # another resolution: align works in normalised units
    aligned, valid = align(view_b, theta_b, theta_a, out)
    assert aligned.shape == (b, 2, *out) and valid.shape == (b, *out) and valid.dtype == torch.bool
    assert valid.float().mean() > 0.2
    mae = (aligned - view_a).abs().mean(dim=1)[valid].mean()
    assert mae < 0.03, mae

    # valid is exactly "view a's pixel centre is seen by view b"
    grid_a = F.affine_grid(theta_a, [b, 1, *out], align_corners=False)  # source coordinates of a's pixels
    in_b = F.affine_grid(compose_theta(invert_theta(theta_b), theta_a), [b, 1, *out], align_corners=False)
    assert torch.equal(valid, (in_b.abs() <= 1).all(dim=-1))
    assert grid_a.shape[:3] == valid.shape


def test_align_identical_and_disjoint_views():
    g = torch.Generator().manual_seed(6)
    theta = random_theta(4, (0.2, 0.6), (3 / 4, 4 / 3), 0.5, True, g)
    feat = torch.randn(4, 3, 8, 8, generator=g)
    aligned, valid = align(feat, theta, theta, (8, 8))
    assert valid.all() and torch.allclose(aligned, feat, atol=1e-4)
    no, k0 = torch.tensor([False]), torch.tensor([0])
    left = theta_from_params(torch.tensor([[-0.6, 0.0]]), torch.tensor([[0.4, 1.0]]), no, no, k0)  # x in -1..-0.2
    right = theta_from_params(torch.tensor([[0.6, 0.0]]), torch.tensor([[0.4, 1.0]]), torch.tensor([True]), no,
                              torch.tensor([3]))  # x in 0.2..1
    _, valid = align(torch.randn(1, 3, 8, 8), right, left, (8, 8))
    assert not valid.any()
    # half overlap: view a spans x in -1..1, view b x in 0..1 -> exactly a's right half is valid
    full = theta_from_params(torch.zeros(1, 2), torch.ones(1, 2), no, no, k0)
    half = theta_from_params(torch.tensor([[0.5, 0.0]]), torch.tensor([[0.5, 1.0]]), no, no, k0)
    _, valid = align(torch.randn(1, 3, 8, 8), half, full, (8, 8))
    assert not valid[..., :4].any() and valid[..., 4:].all()


# ------------------------------------------------------------------------------------------ dates and values


def test_date_disturbance():
    g = torch.Generator().manual_seed(7)
    b, t = 64, 5
    valid = torch.rand(b, t, generator=g) > 0.3
    valid[:4] = False  # samples without this modality
    valid[4:8] = False
    valid[4:8, 2] = True  # samples with a single date
    doy = torch.where(valid, torch.randint(1, 367, (b, t), generator=g), 0)
    doy[8:12] = torch.where(valid[8:12], 1, 0)  # near the wrap-around
    doy[12:16] = torch.where(valid[12:16], 366, 0)
    s2 = ModalityInput(torch.rand(b, t, 10, 4, 4, generator=g) * 1000, valid, doy, torch.ones(b, t, 4, 4, dtype=bool))
    batch = SkySenseInput(s2=s2)
    view = make_view(batch, identity(b), 4, R, quiet_spec(4, date_drop_p=0.5, doy_shift=8), g)
    out = view.s2
    had = valid.any(dim=1)
    assert torch.equal(out.valid.any(dim=1), had)  # >= 1 date kept where there was one, absent stays absent
    assert not (out.valid & ~valid).any()  # never invents a date
    dropped = valid & ~out.valid
    assert dropped.sum() > 10
    assert not out.mask[dropped].any() and (out.doy[dropped] == 0).all()
    assert ((out.doy[out.valid] >= 1) & (out.doy[out.valid] <= 366)).all() and (out.doy[~out.valid] == 0).all()
    diff = (out.doy - doy)[out.valid]
    circular = torch.minimum(diff % 366, (-diff) % 366)
    assert circular.max() <= 8 and (diff != 0).any()
    assert (out.doy[8:16][out.valid[8:16]] > 300).any()  # some wrapped


def test_solarization_only_on_second_global_view():
    cfg = AugmentConfig()
    specs = cfg.specs((H, H))
    assert [s.solarize_p for s in specs] == [0.0, 0.2, 0.0, 0.0, 0.0, 0.0]
    assert [s.blur_p for s in specs] == [1.0, 0.1, 0.5, 0.5, 0.5, 0.5]
    assert [s.size for s in specs] == [16, 16, 8, 8, 8, 8]

    batch = make_batch(b=3)
    cfg = quiet_config(global_solarize_p=(0.0, 1.0), global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                       rot90=False, n_local=2)
    views = make_views(batch, R, cfg, torch.Generator().manual_seed(8))
    hr = batch.hr.data
    assert [v.is_global for v in views] == [True, True, False, False]
    assert torch.equal(views[0].input.hr.data, hr) and (views[0].input.hr.data > 130).any()
    assert torch.equal(views[1].input.hr.data, torch.where(hr >= 130, 255 - hr, hr))
    assert views[1].input.hr.data.max() < 130
    for v in views[2:]:
        assert (v.input.hr.data > 130).any()


def test_s1_nan_never_reaches_usable_pixels():
    batch = make_batch(b=8)
    views = make_views(batch, R, AugmentConfig(), torch.Generator().manual_seed(9))
    saw_nan = False
    for v in views:
        s1 = v.input.s1
        nan = torch.isnan(s1.data).any(dim=2)
        saw_nan |= bool(nan.any())
        assert not (nan & s1.mask).any()
        assert not torch.isinf(s1.data).any()
        assert torch.isfinite(v.input.s2.data).all() and torch.isfinite(v.input.hr.data).all()
        assert s1.mask.any()
    assert saw_nan  # the gap is carried, not silently filled
    # a sub-pixel shift next to the gap: interpolated values are finite wherever the output is not NaN
    x = batch.s1.data[:1, 0]
    shift = identity(1)
    shift[0, 0, 2] = 0.5 / H  # a quarter pixel
    y = warp(x, shift, (H, H), "bilinear")
    assert torch.isnan(y).any() and torch.isfinite(y[~torch.isnan(y)]).all()
    assert torch.isnan(y).sum() <= torch.isnan(x).sum() + 2 * 5  # at most one extra column of the 5-row gap


def test_photometric_ranges_and_channel_out():
    batch = make_batch(b=4)
    spec = ViewSpec(size=H, scale=(1.0, 1.0), flip_p=0.0, rot90=False, blur_p=1.0, jitter_p=1.0, grayscale_p=0.0,
                    channel_out_p=1.0, date_drop_p=0.0)
    view = make_view(batch, identity(4), H, R, spec, torch.Generator().manual_seed(10))
    hr = view.hr.data
    assert hr.min() >= 0 and hr.max() <= 255 and not torch.equal(hr, batch.hr.data)
    # channel-out with p = 1: every S2 band is constant per date
    s2 = view.s2.data
    assert torch.allclose(s2, s2.mean(dim=(-2, -1), keepdim=True).expand_as(s2), rtol=1e-5)
    # per-date gain: each date's mean moves by its own factor within 0.9..1.1
    ratio = s2.mean(dim=(-3, -2, -1)) / batch.s2.data.mean(dim=(-3, -2, -1))
    assert ((ratio > 0.9 - 1e-4) & (ratio < 1.1 + 1e-4)).all() and ratio.std() > 0
    gray = make_view(batch, identity(4), H, R, dataclasses.replace(spec, grayscale_p=1.0, channel_out_p=0.0),
                     torch.Generator().manual_seed(10))
    assert torch.allclose(gray.hr.data[:, :, 0], gray.hr.data[:, :, 2])
    # neutral jitter factors are the identity (HSV round trip), a hue shift of 1/3 turns red into green
    img = torch.rand(2, 3, 8, 8) * 255
    assert torch.allclose(_color_jitter(img, torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)), img, atol=1e-3)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 200.0
    green = _color_jitter(red, torch.tensor([[1.0, 1.0, 1.0, 1 / 3]]))
    assert torch.allclose(green, torch.roll(red, 1, dims=1), atol=1e-3)


# ----------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_views_different_seed_different_views():
    batch = make_batch(b=3)
    cfg = AugmentConfig(n_local=2)
    a = make_views(batch, R, cfg, torch.Generator().manual_seed(11))
    b = make_views(batch, R, cfg, torch.Generator().manual_seed(11))
    c = make_views(batch, R, cfg, torch.Generator().manual_seed(12))
    assert len(a) == 4 and all(isinstance(v, View) for v in a)
    for va, vb in zip(a, b, strict=True):
        assert torch.equal(va.theta, vb.theta) and inputs_equal(va.input, vb.input)
    assert not any(torch.equal(va.theta, vc.theta) for va, vc in zip(a, c, strict=True))
    assert not inputs_equal(a[0].input, c[0].input)
    # the input batch is left untouched
    assert inputs_equal(batch, make_batch(b=3))
