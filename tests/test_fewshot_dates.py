"""Few-shot support tiles keep their own days of year when stacked above the query (issue 16)."""

from __future__ import annotations

import torch

from skysense_core import build_model


def test_few_shot_support_keeps_its_own_days_of_year():
    """A support tile stacked above the query is encoded with its own dates (per-pixel day of year on the
    Sentinel grid), and a per-pixel day of year that is the same everywhere gives what the per-date one gives."""
    from skysense_core.inputs import ModalityInput, SkySenseInput
    from skysense_core.semantic import stack_tiles

    def tile(doys):
        t = len(doys)
        return SkySenseInput(s2=ModalityInput(torch.rand(1, t, 10, 8, 8) * 3000, torch.ones(1, t, dtype=torch.bool),
                                              torch.tensor([doys])))

    support, query = tile([40, 200]), tile([100, 250])
    stacked = stack_tiles([support, query])
    assert stacked.s2.doy.shape == (1, 2, 16, 8)
    assert (stacked.s2.doy[0, :, :8] == torch.tensor([40, 200])[:, None, None]).all()  # the support's own dates
    assert (stacked.s2.doy[0, :, 8:] == torch.tensor([100, 250])[:, None, None]).all()  # the query's

    torch.manual_seed(0)
    model = build_model("tiny", modalities=("s2",), geo_context=False).eval()
    x = tile([100, 250])
    per_pixel = SkySenseInput(s2=ModalityInput(x.s2.data, x.s2.valid, x.s2.doy[:, :, None, None].expand(1, 2, 8, 8)))
    with torch.no_grad():
        torch.testing.assert_close(model(per_pixel).fused, model(x).fused)
        other = SkySenseInput(s2=ModalityInput(x.s2.data, x.s2.valid, torch.tensor([[40, 200]])))
        assert not torch.allclose(model(other).fused, model(x).fused)  # the dates do reach the fusion
