"""SkySense++ stage 2 (masked semantic learning) and few-shot in-context segmentation, preset ``tiny``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skysense_core import build_model
from skysense_core.losses import class_balanced_cross_entropy
from skysense_core.semantic import (
    IGNORE,
    SemanticPretrainer,
    block_mask,
    few_shot_segment,
    remap_labels,
    semantic_mask,
    stack_tiles,
)
from tests.model_inputs import make_batch

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_label_ids_are_redrawn_every_call_and_consistent_within_one():
    labels = torch.tensor([[[0, 1, 2], [2, IGNORE, 1]]])
    g = torch.Generator().manual_seed(0)
    ids_a, table_a = remap_labels(labels, 3, g)
    ids_b, table_b = remap_labels(labels, 3, g)
    assert not torch.equal(table_a, table_b)  # a new random identity each forward
    for ids, table in ((ids_a, table_a), (ids_b, table_b)):
        assert len(set(table.tolist())) == 3 and all(1 <= i <= 64 for i in table.tolist())
        assert ids[0, 1, 1] == 0  # unlabelled -> id 0
        for c in range(3):
            assert bool((ids[labels == c] == table[c]).all())
    ids, table = remap_labels(labels, 3, g, background=0)
    assert table[0] == 0 and bool((ids[labels == 0] == 0).all())
    with pytest.raises(ValueError, match="vocabulary"):
        remap_labels(labels, 65)


def test_masks_follow_the_official_recipe():
    g = torch.Generator().manual_seed(0)
    m = block_mask(64, 8, 4, g)
    assert bool((m.flatten(1).sum(1) == 16).all())  # exactly 50 % of the 8 x 4 cells
    sm = semantic_mask(2000, 8, 4, g)
    bottom = torch.zeros(8, 4, dtype=torch.bool)
    bottom[4:] = True
    share = (sm == bottom).flatten(1).all(1).float().mean().item()
    assert 0.27 < share < 0.33  # bottom half with probability 0.3 (block masks almost never equal it)


def test_class_balanced_cross_entropy_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :1] = 3
    ce = F.cross_entropy(logits, target, reduction="none")
    expected = 0.5 * ce[target > 0].mean() + 0.5 * ce[target == 0].mean()
    torch.testing.assert_close(class_balanced_cross_entropy(logits, target), expected)
    only_bg = torch.zeros_like(target)
    torch.testing.assert_close(class_balanced_cross_entropy(logits, only_bg), F.cross_entropy(logits, only_bg))


def test_stage2_overfits_one_batch():
    torch.manual_seed(0)
    trainer = SemanticPretrainer(build_model("tiny")).train()
    batch = make_batch(("hr", "s2", "s1"), grid=8, hr_ratio=8)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    labels[:, 40:, :20] = 2
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    first = last = None
    for _ in range(15):
        loss, logs = trainer(batch, labels, 3, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or logs
        last = logs
    for k in ("loss/semantic", "loss/completion", "loss"):
        assert torch.isfinite(torch.tensor(last[k])) and last[k] < first[k], k


def _tile(seed, modalities=("hr", "s2")):
    return make_batch(modalities, batch=1, grid=8, hr_ratio=8, seed=seed)


def test_stack_tiles_puts_the_query_at_the_bottom():
    a, b = _tile(1), _tile(2)
    s = stack_tiles([a, b])
    assert s.hr.data.shape == (1, 1, 3, 128, 64) and s.s2.data.shape == (1, 3, 10, 16, 8)
    assert torch.equal(s.s2.data[0, :, :, 8:], b.s2.data[0]) and torch.equal(s.hr.data[0, :, :, :64], a.hr.data[0])


@pytest.mark.parametrize("modalities", [("hr", "s2"), ("s2", "s1")])
def test_few_shot_returns_a_class_map_for_the_query(modalities):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    hr = "hr" in modalities
    side = 64 if hr else 8
    support = [_tile(1, modalities), _tile(2, modalities)]
    labels = [torch.randint(0, 3, (side, side), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    query = _tile(3, modalities)
    cls, probs = few_shot_segment(model, support, labels, query, 3, torch.Generator().manual_seed(0))
    assert cls.shape == (side, side) and probs.shape == (3, side, side)
    torch.testing.assert_close(probs.sum(0), torch.ones(side, side))
    assert int(cls.max()) < 3
    again, _ = few_shot_segment(model, support, labels, query, 3, torch.Generator().manual_seed(0))
    assert torch.equal(cls, again)
    # k 1-shot runs averaged == the mean of the single runs with the same id draws
    avg_cls, avg = few_shot_segment(model, support, labels, query, 3, torch.Generator().manual_seed(5), "average")
    g = torch.Generator().manual_seed(5)
    runs = [few_shot_segment(model, [support[i]], [labels[i]], query, 3, g)[1] for i in range(2)]
    torch.testing.assert_close(avg, (runs[0] + runs[1]) / 2)
    with pytest.raises(ValueError, match="support"):
        few_shot_segment(model, support, labels[:1], query, 3)


def test_stage2_recipe_freezes_and_decays_as_the_official_code():
    """SkySense++ stage 2 (configs/pretrain_skysensepp.yml): patch embeddings and the first 12 of 24 Swin blocks
    (and of each ViT) frozen, fusion layers from the third on frozen, layer-wise lr decay 0.7 over the blocks."""
    from skysense_core import build_model
    from skysense_core.semantic import STAGE2_RECIPE, stage2_param_groups

    model = build_model("huge", device="meta")
    cfg = model.cfg
    assert sum(cfg.hr_depths) == 24 and STAGE2_RECIPE["layer_decay"] == 0.7 and STAGE2_RECIPE["lr"] == 2e-4
    groups = stage2_param_groups(model, 0.04)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    swin_blocks = [(s, b) for s, d in enumerate(cfg.hr_depths) for b in range(d)]
    for i, (s, b) in enumerate(swin_blocks):  # block i + 1 of 24
        assert any(n.startswith(f"backbone_hr.layers.{s}.blocks.{b}.") for n in trained) == (i >= 12), (s, b)
    assert not any(n.startswith(("backbone_hr.patch_embed", "backbone_s2.patch_embed", "glbank.")) for n in trained)
    vit = cfg.vit_depth
    assert all(any(n.startswith(f"backbone_s2.blocks.{i}.") for n in trained) == (i >= vit // 2) for i in range(vit))
    fused = {int(n.split(".")[2]) for n in trained if n.startswith("fusion.layers.")}
    assert fused == {0, 1} and "fusion.cls_token" in trained and "fusion.porj_linear.weight" in trained
    # the lr scale of the last Swin block is 0.7 ** 1, of block 13 (the first trained) 0.7 ** 12; 1 outside
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    s_last, b_last = swin_blocks[-1]
    s13, b13 = swin_blocks[12]
    last = next(p for n, p in named.items() if n.startswith(f"backbone_hr.layers.{s_last}.blocks.{b_last}."))
    first = next(p for n, p in named.items() if n.startswith(f"backbone_hr.layers.{s13}.blocks.{b13}."))
    assert scale[id(last)] == pytest.approx(0.7) and scale[id(first)] == pytest.approx(0.7 ** 12)
    assert scale[id(named["fusion.cls_token"])] == 1.0
    assert {g["weight_decay"] for g in groups} == {0.0, 0.04}
