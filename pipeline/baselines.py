"""The baselines every quality figure is printed beside.

- Land cover (:func:`raw_pixel_baseline`): the obvious classifier on the raw inputs, with no foundation model:
  per pixel, the monthly medians of the normalised Sentinel-2 and Sentinel-1 bands and the HR mean and standard
  deviation within the 10 m cell (``skysense_core.pixel_features.input_features``: the very vector the model's
  ``dates+input`` head gets as its skip connection), standardised, into scikit-learn's multinomial
  ``LogisticRegression``. It is fitted on the same training pixels as the model's head and scored on the same
  held-out pixels.
- Floods (:func:`otsu_baseline`): the per-tile Otsu threshold on Sentinel-1 VV (``pipeline.flood.otsu_flood``)
  on the series up to the event date, scored on tile cores against a flood truth raster.
"""

from __future__ import annotations

import time

import numpy as np


def raw_pixel_baseline(x_train, y_train, x_test, y_test, num_classes: int, max_iter: int = 300,
                       seed: int = 0) -> dict:
    """Fit the raw-pixel classifier on (N, F) features / (N,) labels and score it on the test pixels: ``miou``,
    ``per_class_iou`` (None for a class in neither truth nor prediction), ``pixel_accuracy``, ``seconds``.
    Accepts numpy arrays or torch tensors."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.finetune import confusion, scores

    def np_(a):
        return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    t0 = time.perf_counter()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    clf.fit(np_(x_train), np_(y_train))
    pred = clf.predict(np_(x_test))
    cm = confusion(torch.from_numpy(np.asarray(pred, np.int64)), torch.from_numpy(np_(y_test).astype(np.int64)),
                   num_classes)
    return {**scores(cm), "classifier": "sklearn StandardScaler + LogisticRegression", "features": "raw inputs",
            "train_pixels": int(len(y_train)), "seconds": time.perf_counter() - t0}


def otsu_baseline(cube: str, labels: str, tiles, until_doy: int | None = None, num_classes: int = 3) -> dict:
    """The Otsu flood classes (dry / flood water / permanent water) of ``tiles``, from each tile's Sentinel-1 VV
    series up to ``until_doy`` (the event is the last date kept), scored on the tile cores against ``labels``
    (the flood truth on the 10 m grid): ``miou``, ``per_class_iou``, ``pixel_accuracy``, ``pixels``. Pixels Otsu
    leaves nodata (no usable event or baseline observation) count as dry, as a map reader would take them."""
    import torch

    from pipeline import zarr_cube
    from pipeline.datasource import until
    from pipeline.finetune import confusion, scores
    from pipeline.flood import NODATA as FLOOD_NODATA
    from pipeline.flood import otsu_flood
    from pipeline.inference import read_tiles_local

    grid = zarr_cube.cube_config(zarr_cube.open_cube(str(cube))).grid
    c0, n = grid.halo_px, grid.tile_px
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    t0 = time.perf_counter()
    for batch in read_tiles_local(cube, list(tiles), modalities=("s1",), labels=labels):
        b = until(batch, until_doy)
        doy = np.asarray(b["s1_doy"][0])
        res = otsu_flood(np.asarray(b["s1"][0][:, 0]), np.asarray(b["s1_mask"][0]), np.asarray(b["s1_valid"][0]),
                         [f"doy {d}" for d in doy])
        pred = res.classes[c0:c0 + n, c0:c0 + n].astype(np.int64)
        truth = np.asarray(b["labels_grid"][0])[c0:c0 + n, c0:c0 + n].astype(np.int64)
        pred[pred == FLOOD_NODATA] = 0  # no usable observation: shown as not flooded, scored as dry
        cm += confusion(torch.from_numpy(pred.ravel()), torch.from_numpy(truth.ravel()), num_classes)
    return {**scores(cm), "classifier": "per-tile Otsu threshold on Sentinel-1 VV (pipeline.flood)",
            "seconds": time.perf_counter() - t0}
