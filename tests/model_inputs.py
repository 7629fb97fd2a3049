"""Synthetic model inputs in physical units (shapes as ``skysense_core.inputs`` documents)."""

from __future__ import annotations

import torch

from skysense_core.inputs import ModalityInput, SkySenseInput

T_DEFAULT = {"hr": 1, "s2": 3, "s1": 2}
BANDS = {"hr": 3, "s2": 10, "s1": 2}


def make_batch(
    modalities=("hr", "s2", "s1"), batch: int = 2, grid: int = 8, hr_ratio: int = 8, seed: int = 0,
    times: dict | None = None, lat=None, lon=None,
) -> SkySenseInput:
    """A batch with a smooth random field per band (so crops and rotations are meaningful), all dates valid,
    days of year spread over the year, and masks all True."""
    g = torch.Generator().manual_seed(seed)
    times = {**T_DEFAULT, **(times or {})}
    kw = {}
    for m in modalities:
        t = times[m]
        size = grid * hr_ratio if m == "hr" else grid
        base = torch.rand((batch, t, BANDS[m], max(size // 4, 2), max(size // 4, 2)), generator=g)
        field = torch.nn.functional.interpolate(base.flatten(0, 1), size=(size, size), mode="bilinear",
                                                align_corners=False).view(batch, t, BANDS[m], size, size)
        if m == "hr":
            data = field * 255
        elif m == "s2":
            data = field * 4000 + 200
        else:
            data = field * 20 - 25
        doy = torch.linspace(20, 340, t).round().long().expand(batch, t).clone()
        kw[m] = ModalityInput(
            data=data, valid=torch.ones(batch, t, dtype=torch.bool), doy=doy,
            mask=torch.ones(batch, t, size, size, dtype=torch.bool),
        )
    kw["lat"] = torch.tensor(lat if lat is not None else [45.0 + 10 * i for i in range(batch)][:batch])
    kw["lon"] = torch.tensor(lon if lon is not None else [9.0 - 50 * i for i in range(batch)][:batch])
    return SkySenseInput(**kw)
