"""What makes inference cheap must not change what the model computes: the bounded HR global attention (exact at
one block, local beyond it, official weights unchanged), modality completion only where a modality is missing,
the last fusion layer for the extra token only, the channels-last UPHead, and the window plan of
``pipeline.inference`` (every core pixel covered, nothing outside core + margin computed)."""

from __future__ import annotations

import pystac
import pytest
import rasterio
import torch
from rasterio.windows import Window

from pipeline.inference import PredictorSpec, window_spans
from skysense_core import build_model
from skysense_core.checkpoint import load_official, to_official
from skysense_core.encoders import ProjectedGlobalAttention, UPHead
from skysense_core.fusion import FusionTransformer, extra_token_layer, pack_kept
from skysense_core.inputs import ModalityInput, SkySenseInput
from tests.model_inputs import make_batch

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _twin(block: int, base: torch.nn.Module | None = None, **kw) -> torch.nn.Module:
    """A tiny model with HR global attention blocks of ``block`` Sentinel px (0 = unbounded), weights of ``base``."""
    torch.manual_seed(0)
    m = build_model("tiny", hr_global_attn_block=block, **kw).eval()
    if base is not None:
        m.load_state_dict(base.state_dict(), strict=not kw)
    return m


# ------------------------------------------------------------------------------------------------------------------
# bounded global attention
# ------------------------------------------------------------------------------------------------------------------
def test_bounded_and_unbounded_agree_exactly_at_one_block(tmp_path):
    """At an input of one block the bounded attention is the unbounded one, bit for bit, and official-layout
    weights loaded into the (bounded) default config give the result they gave before (unbounded)."""
    unbounded = _twin(0)
    x = make_batch(batch=2, grid=8, hr_ratio=8, times={"hr": 1, "s2": 3, "s1": 2})
    with torch.no_grad():
        ref = unbounded(x).fused
        bounded = _twin(8, unbounded)
        assert torch.equal(bounded(x).fused, ref)
        # the official release layout, loaded as a user would, into the preset with its default block (tiny: 4)
        torch.save({"model": to_official(unbounded.state_dict())}, tmp_path / "release.ckpt")
        torch.manual_seed(1)
        official = build_model("tiny", hr_global_attn_block=8).eval()
        load_official(tmp_path / "release.ckpt", official, strict_official=False)
        official.glbank.load_state_dict(unbounded.glbank.state_dict())  # ours, not in the release
        official.ctpe.data.copy_(unbounded.ctpe.data)  # the release has 365 rows; ours 366 (row 366 = row 365)
        assert torch.equal(official(x).fused, ref)


@pytest.mark.parametrize("h, w, block, panels", [(12, 8, 4, (1, 1)), (10, 7, 4, (1, 1)), (16, 8, 4, (2, 1)),
                                                 (8, 16, 4, (1, 2)), (8, 6, 8, (1, 1))])
def test_blocks_attend_only_within_their_block_and_across_panels(h, w, block, panels):
    """The blocked attention equals the plain attention run on each block (the same block of every panel
    together), ragged edge blocks included; an input that fits one block per panel is the unbounded path."""
    torch.manual_seed(0)
    m = ProjectedGlobalAttention(8, 8, 2).eval()
    x = torch.randn(2, h, w, 8)
    pv, ph = panels
    hp, wp = h // pv, w // ph
    with torch.no_grad():
        out = m(x, block, panels)
        z = m.proj_in(x)
        ref = torch.zeros_like(z)
        if hp <= block and wp <= block:
            ref = m.attn(z.reshape(2, h * w, -1)).view_as(z)
        else:
            for by in range(0, hp, block):
                for bx in range(0, wp, block):
                    cells = [(py * hp + y, px * wp + xx) for py in range(pv) for px in range(ph)
                             for y in range(by, min(by + block, hp)) for xx in range(bx, min(bx + block, wp))]
                    ys, xs = zip(*cells, strict=True)
                    tok = z[:, list(ys), list(xs)]  # (2, n, C)
                    ref[:, list(ys), list(xs)] = m.attn(tok)
        ref = m.proj_out(z + ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _demo_hr(catalog, y0: int, x0: int, size: int) -> torch.Tensor:
    """(1, 1, 3, size, size) HR pixels of the demo region's first HR date at (y0, x0)."""
    cat = pystac.Catalog.from_file(str(catalog))
    item = next(i for i in cat.get_items(recursive=True) if i.collection_id == "hr-rgb")
    with rasterio.open(item.assets["image"].get_absolute_href()) as src:
        rgb = src.read(window=Window(x0, y0, size, size))
    return torch.from_numpy(rgb).float()[None, None]


def _hr_only(hr: torch.Tensor) -> SkySenseInput:
    t = hr.shape[1]
    return SkySenseInput(hr=ModalityInput(data=hr, valid=torch.ones(1, t, dtype=torch.bool),
                                          doy=torch.full((1, t), 150)), lat=torch.tensor([45.1]),
                         lon=torch.tensor([9.0]))


def test_hr_features_away_from_the_window_edge_stop_depending_on_the_window(demo_region):
    """On a real demo tile: the HR encoder's last-stage features of the centre 16 x 16 Sentinel px, computed
    from a 32 px window around them and from a 64 px one. Unbounded, every feature attends to the whole window,
    so the larger window changes them; with blocks (the lattice of both windows aligned) only the Swin
    receptive field near the small window's edge differs."""
    catalog, _ = demo_region
    r = 8  # hr_ratio of the tiny preset and of the demo region
    big = _demo_hr(catalog, 200, 200, 64 * r)
    small = big[..., 16 * r:48 * r, 16 * r:48 * r]
    changes = {}
    unbounded = _twin(0)
    for block in (0, 4):
        m = _twin(block, unbounded)
        with torch.no_grad():
            f_small = m.backbone_hr(small[:, 0] / 255.0)[-1][..., 8:24, 8:24]
            f_big = m.backbone_hr(big[:, 0] / 255.0)[-1][..., 24:40, 24:40]
        changes[block] = float((f_small - f_big).norm() / f_big.norm())
    print(f"\nrelative change of the centre features, 32 -> 64 px window: unbounded {changes[0]:.4f}, "
          f"blocks of 4 px {changes[4]:.4f}")
    assert changes[4] < changes[0] / 5, changes
    assert changes[4] < 0.05, changes


# ------------------------------------------------------------------------------------------------------------------
# no work whose result is thrown away
# ------------------------------------------------------------------------------------------------------------------
def _vae_calls(model) -> list[int]:
    calls: list[int] = []
    model.modality_vae.register_forward_hook(lambda mod, args, out: calls.append(args[0][next(iter(args[0]))].shape[0]))
    return calls


def test_completion_is_skipped_when_nothing_is_missing_and_still_fills_a_missing_modality():
    """Eval: no modality missing -> the VAEs do not run, and the output is what running them gave (present
    features pass through untouched); one sample lacking S1 -> the VAEs run on that sample alone, with the
    output of the whole-batch run (train mode with no dropout in tiny = the former eval path)."""
    model = _twin(4)
    calls = _vae_calls(model)
    full = make_batch(batch=3, grid=8, hr_ratio=8, times={"hr": 1, "s2": 3, "s1": 2})
    with torch.no_grad():
        out = model(full)
        assert calls == [] and out.completion is None
        model.train()  # the reference: every sample through the VAEs (the former behaviour)
        ref = model(full)
        model.eval()
        assert calls == [3]
        torch.testing.assert_close(out.fused, ref.fused, rtol=0, atol=0)

        calls.clear()
        s1 = full.s1
        lacking = SkySenseInput(hr=full.hr, s2=full.s2, lat=full.lat, lon=full.lon,
                                s1=ModalityInput(s1.data, s1.valid.clone(), s1.doy, s1.mask))
        lacking.s1.valid[1] = False  # sample 1 has no S1 date
        out = model(lacking)
        assert calls == [1] and bool(out.completion.completed["s1"].all())
        model.train()
        ref = model(lacking)
        model.eval()
        assert bool(ref.completion.completed["s1"][1]) and not bool(ref.completion.completed["s1"][0])
        torch.testing.assert_close(out.fused, ref.fused, rtol=1e-5, atol=1e-5)
        # the completed modality did reach the fusion: without completion sample 1 differs, the others not
        plain = _twin(4, model, modality_completion=False)
        other = plain(lacking).fused
        assert not torch.allclose(other[1], out.fused[1], atol=1e-4)
        torch.testing.assert_close(other[[0, 2]], out.fused[[0, 2]], rtol=1e-5, atol=1e-5)


def test_last_fusion_layer_computes_the_extra_token_alone():
    torch.manual_seed(0)
    f = FusionTransformer(64, 32, 3, 2).eval()
    x, keep = torch.randn(50, 12, 64), torch.rand(50, 12) > 0.3
    with torch.no_grad():
        out = f(x, keep)
        seq = torch.cat([f.cls_token.expand(50, -1, -1), f.porj_linear(x)], 1)
        mask = torch.cat([keep.new_ones(50, 1), keep], 1)[:, None, None, :]
        for layer in f.layers:
            seq = layer(seq, attn_mask=mask)
        torch.testing.assert_close(out, seq[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(extra_token_layer(f.layers[-1], seq, mask), f.layers[-1](seq, attn_mask=mask)[:, 0],
                                   rtol=1e-5, atol=1e-5)
    # in training too, every parameter of the last layer still gets a gradient
    f.train()
    f(x, keep).sum().backward()
    assert all(p.grad is not None for p in f.layers[-1].parameters())


def test_fusion_drops_the_tokens_it_does_not_keep():
    """Packed (each sequence's kept tokens only, sequences taken by kept count, in several CPU chunks) equals the
    whole padded sequence through every layer; a token that is not kept gets no gradient."""
    torch.manual_seed(0)
    f = FusionTransformer(16, 32, 2, 2).eval()
    s, n = 3000, 20
    x = torch.randn(s, n, 16)
    keep = torch.rand(s, n) < torch.rand(s, 1)  # 0 to 20 kept per sequence
    keep[:7], keep[7:14] = False, True
    packed, pkeep = pack_kept(x, keep)
    assert packed.shape[1] == n and pkeep.sum() == keep.sum()  # some sequence keeps all: nothing to cut
    part, pkeep = pack_kept(x[14:], keep[14:] & (torch.arange(n) < 15))
    assert part.shape[1] == 15 and torch.equal(pkeep.sum(1), (keep[14:] & (torch.arange(n) < 15)).sum(1))
    with torch.no_grad():
        whole = f._forward(x, keep)  # one pass, nothing packed
        torch.testing.assert_close(f(x, keep), whole, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    f.train()
    f(x, keep).sum().backward()
    assert torch.all(x.grad[~keep] == 0) and torch.all(x.grad[keep].abs().sum(-1) > 0)


def test_uphead_is_the_conv_and_pixel_shuffle():
    torch.manual_seed(0)
    head = UPHead(32, 16, 4)
    x = torch.randn(3, 32, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(head(x), head.decoder(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# the window plan
# ------------------------------------------------------------------------------------------------------------------
def test_window_spans_cover_the_span_and_nothing_more():
    assert window_spans(8, 152, 160, 4, size=160) == [(8, 144)]  # one window: the core and its margin
    assert window_spans(8, 152, 64, 4, size=160) == [(8, 64), (68, 64), (128, 24)]  # the last one cut short
    assert window_spans(0, 40, 16, 4, size=40) == [(0, 16), (12, 16), (24, 16)]
    assert window_spans(4, 14, 16, 4, size=40) == [(4, 12)]  # rounded up to the patch
    assert window_spans(8, 152, 32, 4, fixed=True, size=160)[-1] == (120, 32)  # few-shot: all 32, anchored
    assert window_spans(8, 24, 32, 4, fixed=True, size=40) == [(0, 32)]  # centred, kept in the sample
    with pytest.raises(ValueError, match="overlap"):
        window_spans(0, 40, 16, 16)
    for start, end, w, o in [(8, 152, 32, 4), (16, 144, 48, 8), (0, 40, 16, 4), (4, 36, 12, 0)]:
        spans = window_spans(start, end, w, o, size=end + start)
        covered = set()
        for a, n in spans:
            assert n % 4 == 0 and n <= w and a >= 0
            covered |= set(range(a, a + n))
        assert set(range(start, end)) <= covered and min(covered) == start


def test_tile_windows_cover_core_plus_margin():
    spec = PredictorSpec(task="landcover", encoder="", head=None, window=64, overlap=4, batch_size=4, size=160,
                         core=(16, 128), hr_ratio=8, modalities=("s2",), num_classes=7, margin=8)
    cells = set()
    for y, x, h, w in spec.windows():
        cells |= {(yy, xx) for yy in range(y, y + h) for xx in range(x, x + w)}
    assert cells == {(y, x) for y in range(8, 152) for x in range(8, 152)}
