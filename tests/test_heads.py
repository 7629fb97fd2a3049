"""skysense_core.heads: UPerHead (mmseg layout, SkySense++ separate PPM input), LinearClassifier,
ChangeDetectionHead and upsample_logits. Tiny channel counts, CPU, fixed seeds."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from skysense_core.heads import ChangeDetectionHead, ConvModule, LinearClassifier, UPerHead, upsample_logits

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CH = [6, 8, 10, 12]  # 4-level pyramid, strides 1, 2, 4, 8 relative to the finest


def pyramid(b: int = 2, size: int = 16, chans=CH, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, size >> i, size >> i, generator=g) for i, c in enumerate(chans)]


def test_conv_module_layout():
    m = ConvModule(3, 5, 3, padding=1)
    assert set(m.state_dict()) == {
        "conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    }
    assert isinstance(m.bn, torch.nn.BatchNorm2d) and not isinstance(m.bn, torch.nn.SyncBatchNorm)
    plain = ConvModule(3, 5, 1, norm=False)
    assert set(plain.state_dict()) == {"conv.weight", "conv.bias"}
    y = m(torch.randn(2, 3, 7, 7))
    assert y.shape == (2, 5, 7, 7) and (y >= 0).all()


def test_uperhead_standard_shapes_and_keys():
    torch.manual_seed(0)
    head = UPerHead(CH, 16, 5)
    feats = pyramid()
    assert head(feats).shape == (2, 5, 16, 16)
    keys = set(head.state_dict())
    for k in ("psp_modules.0.1.conv.weight", "psp_modules.0.1.bn.running_mean", "psp_modules.3.1.bn.weight",
              "bottleneck.conv.weight", "bottleneck.bn.weight", "lateral_convs.0.conv.weight",
              "lateral_convs.2.bn.running_var", "fpn_convs.0.conv.weight", "fpn_convs.2.conv.weight",
              "fpn_bottleneck.conv.weight", "fpn_bottleneck.bn.bias", "conv_seg.weight", "conv_seg.bias"):
        assert k in keys, k
    # mmseg: the last level is the PPM input, so it has no lateral / fpn conv
    assert "lateral_convs.3.conv.weight" not in keys and "fpn_convs.3.conv.weight" not in keys
    allowed = re.compile(
        r"^(psp_modules\.\d\.1|bottleneck|lateral_convs\.\d|fpn_convs\.\d|fpn_bottleneck)\."
        r"(conv\.weight|bn\.(weight|bias|running_mean|running_var|num_batches_tracked))$|^conv_seg\.(weight|bias)$"
    )
    assert all(allowed.match(k) for k in keys), sorted(k for k in keys if not allowed.match(k))
    assert head.bottleneck.conv.weight.shape == (16, CH[-1] + 4 * 16, 3, 3)
    assert head.fpn_bottleneck.conv.weight.shape == (16, 4 * 16, 3, 3)
    assert "bias" not in dict(head.bottleneck.conv.named_parameters())


@pytest.mark.parametrize("ppm_size", [2, 3, 5])
def test_uperhead_separate_ppm_input(ppm_size):
    torch.manual_seed(0)
    head = UPerHead(CH, 16, 5, ppm_in_channels=7)
    feats = pyramid()
    ppm = torch.randn(2, 7, ppm_size, ppm_size)  # coarsest level is 2x2; other sizes are resized to it
    assert head(feats, ppm).shape == (2, 5, 16, 16)
    keys = set(head.state_dict())
    # SkySense++: every pyramid level gets lateral + fpn convs, the PPM branch is one extra level
    assert {f"lateral_convs.{i}.conv.weight" for i in range(4)} <= keys
    assert {f"fpn_convs.{i}.conv.weight" for i in range(4)} <= keys
    assert "lateral_convs.4.conv.weight" not in keys
    assert head.psp_modules[0][1].conv.weight.shape == (16, 7, 1, 1)
    assert head.bottleneck.conv.weight.shape == (16, 7 + 4 * 16, 3, 3)
    assert head.fpn_bottleneck.conv.weight.shape == (16, 5 * 16, 3, 3)
    with pytest.raises(ValueError):
        head(feats)


def test_uperhead_official_channel_layout():
    """in_channels [704, 704, 1408, 2816] + PPM 1024 reproduces the released head_rec_hr parameter shapes."""
    with torch.device("meta"):
        head = UPerHead([704, 704, 1408, 2816], 512, 65, ppm_in_channels=1024)
    sd = head.state_dict()
    assert sd["psp_modules.0.1.conv.weight"].shape == (512, 1024, 1, 1)
    assert sd["bottleneck.conv.weight"].shape == (512, 1024 + 4 * 512, 3, 3)
    assert sd["lateral_convs.3.conv.weight"].shape == (512, 2816, 1, 1)
    assert sd["fpn_bottleneck.conv.weight"].shape == (512, 5 * 512, 3, 3)
    assert sd["conv_seg.weight"].shape == (65, 512, 1, 1)


def test_uperhead_single_level():
    torch.manual_seed(0)
    head = UPerHead([6], 8, 3)
    x = torch.randn(2, 6, 10, 10)
    assert head([x]).shape == (2, 3, 10, 10)
    assert len(head.lateral_convs) == 0 and len(head.fpn_convs) == 0
    assert head.fpn_bottleneck.conv.weight.shape == (8, 8, 3, 3)
    sep = UPerHead([6], 8, 3, ppm_in_channels=4)
    assert sep([x], torch.randn(2, 4, 5, 5)).shape == (2, 3, 10, 10)


@pytest.mark.parametrize("ppm", [False, True])
def test_uperhead_gradients_reach_every_parameter(ppm):
    torch.manual_seed(0)
    head = UPerHead(CH, 8, 3, ppm_in_channels=5 if ppm else None).train()
    feats = [f.requires_grad_() for f in pyramid()]
    extra = torch.randn(2, 5, 2, 2, requires_grad=True) if ppm else None
    out = head(feats, extra)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    if ppm:
        assert extra.grad.abs().sum() > 0


def test_uperhead_eval_deterministic_and_train_updates_bn():
    torch.manual_seed(0)
    head = UPerHead(CH, 8, 3)
    feats = pyramid()
    before = head.bottleneck.bn.running_mean.clone()
    head.train()(feats)
    assert not torch.equal(before, head.bottleneck.bn.running_mean)
    head.eval()
    with torch.no_grad():
        a, b = head(feats), head(feats)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_uperhead_overfits_random_target():
    torch.manual_seed(0)
    head = UPerHead(CH, 16, 3)
    feats = pyramid()
    target = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    head.train()
    for _ in range(150):
        loss = F.cross_entropy(head(feats), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        acc = (head(feats).argmax(1) == target).float().mean().item()
    assert acc > 0.95, acc


def test_linear_classifier_shapes_and_masked_pooling():
    torch.manual_seed(0)
    clf = LinearClassifier(6, 4).eval()
    x = torch.randn(3, 6, 8, 8)
    assert clf(x).shape == (3, 4)
    mask = torch.ones(3, 8, 8, dtype=torch.bool)
    mask[:, :, 4:] = False
    mask[1] = False  # a sample with nothing valid pools to zeros and stays finite
    out = clf(x, mask)
    y = x.clone()
    y[:, :, :, 4:] = torch.randn(3, 6, 8, 4) * 100
    y[1, :, 0, 0] = float("nan")  # nodata in a masked cell must not leak
    assert torch.allclose(clf(y, mask), out)
    assert torch.isfinite(out).all()
    # avg over valid == plain mean over the valid half
    assert torch.allclose(clf.pooled(x, mask)[0], x[0, :, :, :4].mean((1, 2)), atol=1e-6)
    # a mask at pixel resolution (4x the feature grid) is area-resampled
    hr_mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.allclose(clf(y, hr_mask), out, atol=1e-6)

    mx = LinearClassifier(6, 4, pool="max").eval()
    assert torch.allclose(mx(y, mask), mx(x, mask))
    assert torch.allclose(mx.pooled(x, mask)[0], x[0, :, :, :4].amax((1, 2)))
    with pytest.raises(ValueError):
        LinearClassifier(6, 4, pool="median")


def test_change_head_single_level_properties():
    torch.manual_seed(0)
    head = ChangeDetectionHead(6, 8).eval()
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 6, 12, 12, generator=g), torch.randn(2, 6, 12, 12, generator=g)
    with torch.no_grad():
        out, swapped = head(f1, f2), head(f2, f1)
        assert out.shape == swapped.shape == (2, 2, 12, 12)
        # order dependence comes only from the [f1, f2] slots: tie their weights and the head is swap-invariant
        w = head.fuse.conv.weight
        w[:, 6:12] = w[:, 0:6]
        assert torch.allclose(head(f1, f2), head(f2, f1), atol=1e-6)
        # f1 == f2: |f1 - f2| = 0, so the difference slot's weights cannot matter
        same = head(f1, f1)
        w[:, 12:18] = torch.randn_like(w[:, 12:18])
        assert torch.equal(head(f1, f1), same)
        assert torch.isfinite(same).all()


def test_change_head_multi_scale_lists():
    torch.manual_seed(0)
    head = ChangeDetectionHead([4, 6, 8], 8, num_classes=3)
    a, b = pyramid(chans=[4, 6, 8], seed=0), pyramid(chans=[4, 6, 8], seed=1)
    out = head.train()(a, b)
    assert out.shape == (2, 3, 16, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    assert {"fuse_convs.2.conv.weight", "decoder.conv_seg.weight"} <= set(head.state_dict())
    head.eval()
    with torch.no_grad():
        for conv, c in zip(head.fuse_convs, [4, 6, 8], strict=True):
            conv.conv.weight[:, c:2 * c] = conv.conv.weight[:, :c]
        assert torch.allclose(head(a, b), head(b, a), atol=1e-6)
    with pytest.raises(ValueError):
        head(a[:2], b[:2])


def test_change_head_overfits_synthetic_change():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    f1 = torch.randn(2, 6, 16, 16, generator=g)
    f2 = f1 + 0.1 * torch.randn(2, 6, 16, 16, generator=g)  # unchanged: same content, small noise
    f2[:, :, 4:11, 3:9] = torch.randn(2, 6, 7, 6, generator=g)  # the fixed changed region
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:11, 3:9] = 1
    head = ChangeDetectionHead(6, 8)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    head.train()
    for _ in range(150):
        loss = F.cross_entropy(head(f1, f2), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        acc = (head(f1, f2).argmax(1) == target).float().mean().item()
    assert acc > 0.95, acc


def test_bf16_autocast_cpu_runs():
    torch.manual_seed(0)
    feats = pyramid()
    heads = [
        (UPerHead(CH, 8, 3).eval(), lambda h: h(feats)),
        (UPerHead(CH, 8, 3, ppm_in_channels=5).eval(), lambda h: h(feats, torch.randn(2, 5, 3, 3))),
        (ChangeDetectionHead(6, 8).eval(), lambda h: h(feats[0], feats[0] + 1)),
        (ChangeDetectionHead(CH, 8).eval(), lambda h: h(feats, [f * 2 for f in feats])),
        (LinearClassifier(6, 3).eval(), lambda h: h(feats[0], torch.rand(2, 16, 16) > 0.5)),
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for head, call in heads:
            out = call(head)
            assert torch.isfinite(out.float()).all()


def test_upsample_logits():
    x = torch.randn(2, 3, 4, 4)
    y = upsample_logits(x, (16, 16))
    assert y.shape == (2, 3, 16, 16)
    # align_corners=True keeps the corner logits exactly (official predictor behaviour)
    assert torch.allclose(y[..., 0, 0], x[..., 0, 0]) and torch.allclose(y[..., -1, -1], x[..., -1, -1])
    assert torch.allclose(upsample_logits(x, 16), y)
    assert upsample_logits(x, (4, 4)) is x
    assert not torch.allclose(upsample_logits(x, 16, align_corners=False), y)
