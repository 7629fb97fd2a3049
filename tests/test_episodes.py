"""SkySense++ stage-2 episodes: same-class mosaics of cube windows (pipeline.episodes)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.episodes import make_episodes


def _windows(n: int, h: int = 8, r: int = 2, t: int = 3) -> dict[str, np.ndarray]:
    """n windows: window i has grid labels i % 3 on its left half and 5 on its right, S2 data = i, its own
    days of year (10 i + slot), date 2 missing in odd windows; HR at r px per grid px."""
    rng = np.random.default_rng(0)
    lab = np.zeros((n, h, h), np.uint8)
    for i in range(n):
        lab[i, :, : h // 2] = i % 3
        lab[i, :, h // 2:] = 5
    lab[0] = 255  # an unlabelled window is never drawn
    valid = np.ones((n, t), bool)
    valid[1::2, 2] = False
    return {
        "s2": np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None, None], (n, t, 10, h, h)).copy(),
        "s2_valid": valid, "s2_mask": np.ones((n, t, h, h), bool),
        "s2_doy": (10 * np.arange(n)[:, None] + np.arange(t)[None] + 1).astype(np.int64),
        "hr": rng.random((n, 1, 3, h * r, h * r)).astype(np.float32), "hr_valid": np.ones((n, 1), bool),
        "hr_mask": np.ones((n, 1, h * r, h * r), bool), "hr_doy": np.full((n, 1), 100, np.int64),
        "labels": lab.repeat(r, 1).repeat(r, 2), "labels_grid": lab,
        "lat": np.full(n, 45.0), "lon": np.full(n, 9.0),
    }


def test_episodes_are_same_class_mosaics_with_each_windows_own_dates():
    batch = _windows(32)
    ep = make_episodes(batch, np.random.default_rng(1), cell=8)  # crops on window borders, to find them
    assert len(ep["s2"]) == 4  # 32 windows // 8
    assert ep["s2"].shape[1:] == (3, 10, 16, 16)  # half of 4 rows x 2 columns of 8 px
    assert ep["hr"].shape[-2:] == (32, 32) and ep["labels"].shape[-2:] == (32, 32) and ep["hr_mask"].shape[-1] == 32
    assert ep["s2_doy"].shape[1:] == (3, 16, 16)
    for e in range(4):
        c = int(ep["episode_class"][e])
        for y in range(0, 16, 8):
            for x in range(0, 16, 8):
                cell = ep["labels_grid"][e, y:y + 8, x:x + 8]
                assert c in cell, (e, c)  # every window of the episode holds its class
                i = int(ep["s2"][e, 0, 0, y, x])  # the window's index (its data value)
                assert i != 0  # the unlabelled window is never drawn
                # the window keeps its own days of year, and its missing date is masked on its pixels only
                assert (ep["s2_doy"][e, :, y:y + 8, x:x + 8] == (10 * i + np.arange(3) + 1)[:, None, None]).all()
                assert ep["s2_mask"][e, 2, y:y + 8, x:x + 8].all() == (i % 2 == 0)
        assert ep["s2_valid"][e].all()
    # episodes cover the classes evenly, not by pixel share: the rare classes 0-2 get episodes too
    many = make_episodes(_windows(800), np.random.default_rng(2), cell=4)
    counts = np.bincount(many["episode_class"], minlength=6)
    assert set(np.flatnonzero(counts)) == {0, 1, 2, 5} and counts[[0, 1, 2, 5]].min() > 10


def test_episodes_need_a_tiling():
    with pytest.raises(ValueError, match="tile"):
        make_episodes(_windows(8), np.random.default_rng(0), per_episode=6)
