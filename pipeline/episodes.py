"""SkySense++ stage-2 episodes: same-class mosaics of cube windows (the official recipe, adapted to time series).

The official loader (``lib/datasets/loader/pretraining_loader.py``; ``shared/research/skysense.md`` section 3.2.1)
builds each training sample as an *episode*: pick a (dataset, class), sample 8 images that contain the class,
recolour their label maps with random colours, tile them 2 columns x 4 rows, and cut a random part (a
random-resized crop, scale 0.3-1, to half the mosaic: HR 1024 x 512 from 2048 x 1024). In-context learning then
has to read the class identity from the other images of the episode, since the colours carry none.

Here, per Ray Data batch of cube windows (the datasource's row schema, ``labels`` included):

1. episodes: ``len(batch) // per_episode`` of them; each picks a class present in the batch's labels
   (uniformly over the classes present, so rare classes get episodes as often as common ones) and draws
   ``per_episode`` windows whose grid labels contain it (with replacement when fewer do);
2. mosaic: the windows tiled ``rows`` x ``cols`` (official 4 x 2) for every modality, mask and label raster;
   date slot t holds each window's own t-th date, so the day of year becomes per pixel (``*_doy`` (T, H, W) on
   the Sentinel grid, ``skysense_core.inputs``); a slot is valid where any window has it, and each window's
   pixels are masked on the dates it lacks;
3. crop: a random ``rows / 2`` x ``cols`` windows' part of the mosaic, at a ``mask_cell``-aligned offset. The
   official random *resized* crop is a plain crop here [ours]: resampling the multi-spectral time series and
   its masks would change what a pixel means.

The random recolouring is the stage-2 module's own (``skysense_core.semantic.remap_labels`` draws a new
permutation of label ids every forward), so the episodes keep class ids.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MODALITIES = ("hr", "s2", "s1")  # = skysense_core.inputs.MODALITIES
IGNORE = 255  # label nodata (pipeline.labels.NODATA)
PER_EPISODE, ROWS, COLS = 8, 4, 2  # official: 8 images, 2 columns x 4 rows


def _tile(arrays: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """``rows * cols`` arrays (..., H, W) -> one (..., rows H, cols W), row-major."""
    return np.concatenate([np.concatenate(arrays[r * cols:(r + 1) * cols], axis=-1) for r in range(rows)], axis=-2)


def make_episodes(batch: Mapping[str, np.ndarray], rng: np.random.Generator, per_episode: int = PER_EPISODE,
                  rows: int = ROWS, cols: int = COLS, cell: int = 4) -> dict[str, np.ndarray]:
    """A batch of N cube windows (all the same size, with ``labels`` and ``labels_grid``) -> a batch of
    N // per_episode episodes (module docstring), each ``rows // 2 * H`` x ``cols * W`` Sentinel pixels. Windows
    whose grid labels hold no class are never drawn; a batch without any labelled window gives no episode."""
    if rows * cols != per_episode or rows % 2:
        raise ValueError(f"{per_episode} windows do not tile {rows} x {cols} (an even number of rows)")
    n = len(batch["labels_grid"])
    lab = np.asarray(batch["labels_grid"])
    present = [set(np.unique(lab[i][lab[i] != IGNORE]).tolist()) for i in range(n)]
    classes = sorted(set().union(*present)) if n else []
    mods = [m for m in MODALITIES if m in batch]
    h, w = lab.shape[-2:]
    out: dict[str, list] = {}
    for _ in range(n // per_episode if classes else 0):
        c = classes[rng.integers(len(classes))]
        pool = [i for i in range(n) if c in present[i]]
        pick = rng.choice(pool, per_episode, replace=len(pool) < per_episode)
        ep: dict[str, np.ndarray] = {}
        for m in mods:
            data, valid = np.asarray(batch[m])[pick], np.asarray(batch[f"{m}_valid"])[pick]  # (8, T, ...), (8, T)
            ep[m] = _tile(list(data), rows, cols)
            ep[f"{m}_valid"] = valid.any(0)
            mask = np.asarray(batch[f"{m}_mask"])[pick] if f"{m}_mask" in batch else \
                np.ones((per_episode, data.shape[1], *data.shape[-2:]), bool)
            ep[f"{m}_mask"] = _tile(list(mask & valid[:, :, None, None]), rows, cols)
            doy = np.asarray(batch[f"{m}_doy"])[pick]  # (8, T): each window's own dates, per pixel of the grid
            ep[f"{m}_doy"] = _tile([np.broadcast_to(d[:, None, None], (len(d), h, w)) for d in doy], rows, cols)
        ep["labels"] = _tile(list(np.asarray(batch["labels"])[pick]), rows, cols)
        ep["labels_grid"] = _tile(list(lab[pick]), rows, cols)
        # the crop: half the rows, every column, at a cell-aligned offset
        ch, cw = rows // 2 * h, cols * w
        y0 = int(rng.integers((rows * h - ch) // cell + 1)) * cell
        r = ep["labels"].shape[-1] // (cols * w)  # HR pixels per Sentinel pixel
        for k, v in list(ep.items()):
            if k.endswith("_valid"):
                continue
            s = r if (k == "labels" or k == "hr" or (k == "hr_mask" and v.shape[-1] == cols * w * r)) else 1
            ep[k] = v[..., y0 * s:(y0 + ch) * s, :cw * s]
        for k in ("lat", "lon"):
            if k in batch:
                ep[k] = np.asarray(batch[k])[pick[0]]
        ep["episode_class"] = np.int64(c)
        for k, v in ep.items():
            out.setdefault(k, []).append(v)
    if not out:
        return {}
    return {k: np.stack(v) for k, v in out.items()}


class EpisodeMaker:
    """Ray Data ``map_batches`` UDF: cube windows -> stage-2 episodes (:func:`make_episodes`), with its own
    random stream per actor (``seed`` + the actor's pid, so restarted actors do not repeat episodes)."""

    def __init__(self, seed: int = 0, per_episode: int = PER_EPISODE, cell: int = 4):
        import os

        self.rng = np.random.default_rng([seed, os.getpid()])
        self.per_episode = per_episode
        self.cell = cell

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return make_episodes(batch, self.rng, self.per_episode, cell=self.cell)
