"""The baselines every quality figure is printed beside.

- Land cover (:func:`raw_pixel_baseline`): the obvious classifier on the raw inputs, with no foundation model:
  per pixel, the monthly medians of the normalised Sentinel-2 and Sentinel-1 bands and the HR mean and standard
  deviation within the 10 m cell (``skysense_core.pixel_features.input_features``: the very vector the model's
  ``dates+input`` head gets as its skip connection), standardised, into scikit-learn's multinomial
  ``LogisticRegression``. It is fitted on the same training pixels as the model's head and scored on the same
  held-out pixels.
- Floods: the per-tile Otsu threshold on Sentinel-1 VV (``pipeline.flood.otsu_flood``).
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
