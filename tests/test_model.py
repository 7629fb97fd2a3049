"""The SkySense model (preset ``tiny``): shapes, gradients, masking, dates, determinism, presets."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
import torch

import skysense_core
from skysense_core import build_model
from skysense_core.inputs import day_of_year
from skysense_core.model import SemanticInput
from skysense_core.semantic import SemanticPretrainer
from tests.model_inputs import make_batch

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(("hr", "s2", "s1"), r)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_shapes_for_every_modality_subset(tiny, subset):
    cfg = tiny.cfg
    batch = make_batch(subset, batch=2, grid=8, hr_ratio=cfg.hr_ratio)
    with torch.no_grad():
        out = tiny(batch)
    assert out.fused_mm.shape == (2, cfg.fusion_dim, 8, 8)
    assert out.fused.shape == (2, 2 * cfg.fusion_dim, 8, 8)
    # modality completion fills the modalities the batch lacks: every modality has grid tokens
    assert set(out.summary) == {"hr", "s2", "s1"}
    for m, s in out.summary.items():
        assert s.shape == (2, cfg.token_dim, 8, 8), m
    for m in subset:
        t = getattr(batch, m).data.shape[1]
        assert out.tokens[m].shape == (2, t, cfg.token_dim, 8, 8)
    if "hr" in subset:
        strides = [cfg.hr_patch_size * 2**i for i in range(len(cfg.hr_depths))]
        assert [tuple(p.shape[-2:]) for p in out.hr_pyramid] == [(64 // s, 64 // s) for s in strides]
        assert strides[-1] == cfg.hr_ratio  # the HR encoder lands on the Sentinel grid
    assert torch.isfinite(out.fused).all()
    logits = tiny.semantic_logits(out)
    hr_side = 64 if "hr" in subset else 8
    assert logits.shape == (2, cfg.vocab_size, hr_side, hr_side)


def test_without_completion_only_given_modalities_are_fused():
    torch.manual_seed(0)
    model = build_model("tiny", modality_completion=False).eval()
    out = model(make_batch(("s2",), hr_ratio=8))
    assert set(out.summary) == {"s2"} and out.completion is None


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model = build_model("tiny").train()
    trainer = SemanticPretrainer(model)
    g = torch.Generator().manual_seed(1)
    full = make_batch(("hr", "s2", "s1"), hr_ratio=8)
    labels = torch.randint(0, 4, (2, 64, 64), generator=g)
    # SwinV2 starts its res-post-norm LayerNorms at weight 0 (timm and the official init), so at step 0 the
    # attention and MLP weights behind them get exactly zero gradient; one optimiser step opens the path.
    loss, _ = trainer(full, labels, num_classes=4, generator=g)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad(set_to_none=True)
    loss, _ = trainer(full, labels, num_classes=4, generator=g)
    # a batch without HR (grid-level semantic head) and one with HR missing for one sample (completion decoders)
    s_only = make_batch(("s2", "s1"), hr_ratio=8, seed=3)
    loss2, _ = trainer(s_only, torch.randint(0, 4, (2, 8, 8), generator=g), num_classes=4, generator=g)
    part = make_batch(("hr", "s2", "s1"), hr_ratio=8, seed=4)
    part.s1.valid[0] = False
    part.hr.valid[1] = False
    loss3, _ = trainer(part, torch.randint(0, 4, (2, 64, 64), generator=g), num_classes=4, generator=g)
    (loss + loss2 + loss3).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


def test_invalid_dates_do_not_change_the_output(tiny):
    batch = make_batch(("hr", "s2", "s1"), hr_ratio=8, times={"s2": 4, "s1": 3})
    batch.s2.valid[:, 1] = False
    batch.s1.valid[0, 2] = False
    with torch.no_grad():
        ref = tiny(batch).fused
        batch.s2.data[:, 1] = torch.rand_like(batch.s2.data[:, 1]) * 9000
        batch.s2.doy[:, 1] = 366
        batch.s1.data[0, 2] = float("nan")
        other = tiny(batch).fused
    assert torch.equal(ref, other)


def test_masked_pixels_leave_the_fusion_at_that_location():
    """A date whose pixel is masked at one location is not a key there: removing the date entirely or only
    masking it at that location gives the same fused vector at that location when the encoders cannot mix
    locations (1x1 grid patch per token is not available, so compare against an explicitly dropped date)."""
    torch.manual_seed(0)
    model = build_model("tiny", modality_completion=False, modalities=("s2",)).eval()
    batch = make_batch(("s2",), hr_ratio=8, times={"s2": 3})
    batch.s2.mask[:, 2] = False  # date 2 masked everywhere ...
    with torch.no_grad():
        masked = model(batch).fused_mm
        batch.s2.mask[:, 2] = True
        batch.s2.valid[:, 2] = False  # ... equals date 2 invalid
        dropped = model(batch).fused_mm
    torch.testing.assert_close(masked, dropped)


def test_leap_day_encodes():
    assert day_of_year([dt.date(2024, 12, 31)]).item() == 366
    assert day_of_year(["2023-12-31", None, "2024-02-29"]).tolist() == [365, 0, 60]
    torch.manual_seed(0)
    model = build_model("tiny", modality_completion=False, modalities=("s2",)).eval()
    assert model.ctpe.shape[1] == 366
    batch = make_batch(("s2",), hr_ratio=8, times={"s2": 1})
    with torch.no_grad():
        batch.s2.doy[:] = 366
        a = model(batch).fused_mm
        batch.s2.doy[:] = 365
        b = model(batch).fused_mm
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_same_seed_same_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model("tiny").eval()
        with torch.no_grad():
            outs.append(model(make_batch(hr_ratio=8, seed=5)).fused)
    assert torch.equal(outs[0], outs[1])


def test_semantic_tokens_and_masking_change_the_output(tiny):
    batch = make_batch(("hr", "s2"), hr_ratio=8)
    ids = torch.randint(1, 65, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = tiny(batch).fused_mm
        with_labels = tiny(batch, SemanticInput(ids)).fused_mm
        masked = tiny(batch, SemanticInput(ids, torch.ones(2, 2, 2, dtype=torch.bool))).fused_mm
    assert not torch.allclose(plain, with_labels)
    assert not torch.allclose(with_labels, masked)


def test_geo_context_depends_on_location(tiny):
    batch = make_batch(("s2",), hr_ratio=8, lat=[10.0, 10.0], lon=[5.0, 5.0])
    batch.s2.data[1] = batch.s2.data[0]
    with torch.no_grad():
        same = tiny(batch).geo
        batch.lat[1] = -60.0
        moved = tiny(batch).geo
    torch.testing.assert_close(same[0], same[1])
    assert not torch.allclose(moved[0], moved[1])
    with pytest.raises(ValueError, match="lat"):
        tiny(batch.replace(lat=None))


def test_bad_inputs_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="multiple"):
        tiny(make_batch(("hr",), grid=8, hr_ratio=8).replace(
            hr=make_batch(("hr",), grid=8, hr_ratio=8).hr.__class__(
                data=torch.zeros(2, 1, 3, 60, 60), valid=torch.ones(2, 1, dtype=torch.bool),
                doy=torch.ones(2, 1, dtype=torch.long))))
    with pytest.raises(ValueError, match="doy"):
        make_batch(("s2",)).s2.__class__(data=torch.zeros(1, 1, 10, 8, 8), valid=torch.ones(1, 1, dtype=torch.bool),
                                         doy=torch.full((1, 1), 367))
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("gigantic")
    with pytest.raises(TypeError, match="unknown config"):
        build_model("tiny", hr_depth=3)
    with pytest.raises(ValueError, match="hr_ratio"):
        build_model("tiny", hr_ratio=6)


def test_presets_are_data_and_huge_matches_the_paper_layout():
    cfg = skysense_core.get_config("huge")
    assert cfg.hr_dims == (352, 704, 1408, 2816) and cfg.hr_patch_size == 4 and cfg.token_dim == 2816
    assert (cfg.vit_dim, cfg.vit_depth, cfg.vit_heads, cfg.vit_patch_size) == (1024, 24, 16, 4)
    assert (cfg.fusion_dim, cfg.fusion_depth, cfg.geo_regions, cfg.geo_prototypes) == (1024, 24, 4096, 100)
    model = build_model("huge", device="meta")
    swin = model.backbone_hr
    extra = [n for n, _ in swin.named_modules() if n.endswith(".norm3")]
    assert extra == ["layers.2.blocks.5.norm3", "layers.2.blocks.11.norm3", "layers.2.blocks.17.norm3"]
    # mmcls shifts every odd block by half a window at the official 512 px input (last stage 16 x 16 tokens)
    for stage in swin.layers:
        expected = [(0, 0) if i % 2 == 0 else (4, 4) for i in range(len(stage.blocks))]
        assert [b.shift_size for b in stage.blocks] == expected
    assert model.head_s2.decoder[0].weight.shape == (2816 * 16, 1024, 1, 1)
    assert model.glbank.prototypes.shape == (4096, 100, 1024)
    assert not hasattr(model.backbone_s2, "cls_token") or model.backbone_s2.cls_token is None
    n = sum(p.numel() for p in model.parameters()) + model.glbank.prototypes.numel()
    assert 1.9e9 < n < 2.4e9  # the paper: 2.06 B; breakdown in bench/model.py and the README


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny", grad_checkpointing=ckpt).train()
        # dropout-free preset, so train mode is deterministic; BatchNorm-free path (no semantic heads)
        out = model(make_batch(hr_ratio=8, seed=2))
        out.fused.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_autocast_runs(tiny):
    batch = make_batch(hr_ratio=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(batch)
        logits = tiny.semantic_logits(out)
    assert torch.isfinite(out.fused.float()).all() and torch.isfinite(logits.float()).all()
    with torch.no_grad():
        ref = tiny(batch).fused
    # bf16 keeps ~3 significant digits; the fused features agree to that
    assert torch.nn.functional.cosine_similarity(out.fused.float().flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("subset", [("hr", "s2", "s1"), ("s2",)], ids=["all", "s2-completed"])
def test_fusion_on_bare_sequences_equals_the_forward(tiny, subset):
    """The cached fine-tuning path (``fusion_sequence(dated=False)`` then ``fuse_sequence`` per pixel, with the
    geo-context of ``CachedFusionFinetuner``) gives the forward's F_fus exactly, completed modalities included."""
    from skysense_core.segmentation import CachedFusionFinetuner

    batch = make_batch(subset, batch=2, grid=8, hr_ratio=tiny.cfg.hr_ratio)
    with torch.no_grad():
        out = tiny(batch)
        enc = tiny.encode(batch)
        seq, keep, doy = tiny.fusion_sequence(enc, dated=False)
        assert doy is not None and bool((doy > 0).any())
        b, h, w, n_tok, c = seq.shape
        fused = tiny.fuse_sequence(seq.view(-1, n_tok, c), keep.view(-1, n_tok), doy.view(-1, n_tok))
        assert torch.equal(fused.view(b, h, w, -1).permute(0, 3, 1, 2), out.fused_mm)
        probe = CachedFusionFinetuner(tiny, num_classes=3, frozen_dim=0).eval()
        lat = batch.lat[:, None].expand(b, h * w).reshape(-1)
        lon = batch.lon[:, None].expand(b, h * w).reshape(-1)
        feats = probe.features(seq.view(-1, n_tok, c), keep.view(-1, n_tok), doy.view(-1, n_tok), lat, lon,
                               seq.new_zeros(b * h * w, 0))
        torch.testing.assert_close(feats.view(b, h, w, -1).permute(0, 3, 1, 2), out.fused, rtol=1e-5, atol=1e-6)
    for p in tiny.parameters():
        p.requires_grad_(True)


def test_fusing_a_crop_gives_those_locations_of_the_whole(tiny):
    """Inference fuses only the part of a window it keeps (``Encoded.crop``): every stage after the encoders is
    per location, so the crop's features are the whole window's at those locations."""
    from skysense_core.pixel_features import pixel_features

    batch = make_batch(("hr", "s2", "s1"), batch=2, grid=8, hr_ratio=tiny.cfg.hr_ratio)
    ys, xs = slice(1, 6), slice(2, 8)
    with torch.no_grad():
        enc = tiny.encode(batch)
        full = pixel_features("dates+input", tiny.fuse(enc, batch), batch, tiny.cfg.hr_ratio)
        part_in = batch.crop(ys, xs, tiny.cfg.hr_ratio)
        part = pixel_features("dates+input", tiny.fuse(enc.crop(ys, xs), part_in), part_in, tiny.cfg.hr_ratio)
    assert part.shape[-2:] == (5, 6)
    torch.testing.assert_close(part, full[..., ys, xs], rtol=1e-5, atol=1e-6)
