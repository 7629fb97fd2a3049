"""SkySense stage-1 pretraining on the ``tiny`` preset: EMA teacher, MGCL + alignment losses, prototypes."""

from __future__ import annotations

import pytest
import torch

from skysense_core import build_model
from skysense_core.augment import AugmentConfig
from skysense_core.pretrain import PretrainConfig, SkySensePretrainer, teacher_momentum
from tests.model_inputs import make_batch

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _pretrainer(**kw) -> SkySensePretrainer:
    torch.manual_seed(0)
    cfg = PretrainConfig(head_dim=64, head_hidden=64, head_bottleneck=32, objects=4, max_pixels=256,
                         augment=AugmentConfig(n_local=1), **kw)
    return SkySensePretrainer(build_model("tiny"), cfg)


def test_teacher_is_an_exact_ema_of_the_student():
    pt = _pretrainer()
    with torch.no_grad():
        for p in pt.student.parameters():
            p.add_(torch.randn_like(p))
    s, t = pt._ema_pairs()
    expected = [0.9 * tp.clone() + 0.1 * sp.clone() for sp, tp in zip(s, t, strict=True)]
    pt.update_teacher(0.9)
    for e, (_, tp) in zip(expected, zip(s, t, strict=True), strict=True):
        torch.testing.assert_close(tp, e, rtol=0, atol=1e-6)
    # the teacher has no gradient and shares the single geo-context bank with the student
    assert not any(p.requires_grad for p in pt.teacher.parameters())
    assert pt.teacher.glbank is pt.student.glbank
    pt.train()  # the teacher's targets are never randomised by drop-path
    assert pt.student.training and not pt.teacher.training and not pt.teacher_heads.training
    assert teacher_momentum(0, 100) == pytest.approx(0.996) and teacher_momentum(100, 100) == pytest.approx(1.0)


def test_stage1_losses_are_finite_and_cover_every_granularity_and_source():
    pt = _pretrainer()
    loss, logs = pt(make_batch(grid=8, hr_ratio=8), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    for src in ("hr", "s2", "s1", "fused"):
        for g in ("pixel", "object", "image"):
            assert f"loss/{src}_{g}" in logs, (src, g)
    assert logs["loss/align"] > 0
    loss.backward()
    for name in ("student_heads", "align_proj"):
        params = [p for p in getattr(pt, name).parameters() if p.requires_grad]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name


def test_stage1_overfits_one_batch_every_loss_decreases():
    """Against a fixed teacher and centre (no EMA step, centre momentum 1) every loss is a function of the
    student alone, so optimising the student on one batch (the same views every step) must lower each of them.
    With a moving teacher the targets move too and single terms need not fall monotonically."""
    pt = _pretrainer(center_momentum=1.0)
    batch = make_batch(grid=8, hr_ratio=8)
    opt = torch.optim.AdamW([p for p in pt.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(20):
        loss, logs = pt(batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logs)
    first, last = history[0], history[-1]
    for k in first:
        if k.startswith("loss"):
            assert last[k] < first[k], (k, first[k], last[k])


def test_prototypes_update_in_training_only():
    pt = _pretrainer()
    bank = pt.student.glbank.prototypes
    before = bank.clone()
    pt.eval()
    with torch.no_grad():
        pt(make_batch(grid=8, hr_ratio=8), torch.Generator().manual_seed(0))
    assert torch.equal(bank, before)
    pt.train()
    pt(make_batch(grid=8, hr_ratio=8), torch.Generator().manual_seed(0))
    changed = (bank != before).flatten(1).any(1)
    # only the regions of the batch's two tile centres move
    regions = pt.student.glbank.region_index(torch.tensor([45.0, 55.0]), torch.tensor([9.0, -41.0]))
    assert set(changed.nonzero().flatten().tolist()) == set(regions.tolist())
