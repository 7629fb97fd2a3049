"""Scoring a class-map product (a COG from ``jobs/infer.py``) against a reference raster: confusion matrix,
per-class IoU, mIoU and pixel accuracy.

    score = score_product("out/demo/landcover.tif", "out/demo/region/truth/landcover_10m.tif")

The reference may be in any CRS and resolution: GDAL warps it onto the product's grid (nearest neighbour,
``rasterio.vrt.WarpedVRT``) block by block, so memory stays flat for a country-scale product. Pixels that are
nodata in either raster, or whose reference class is outside ``[0, num_classes)``, are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from pipeline.labels import NODATA


@dataclass
class ProductScore:
    """confusion: (C, C) int64, rows = reference class, columns = predicted class. iou: per class, NaN for a class
    absent from both rasters (left out of ``miou``). pixels: the pixels counted."""

    confusion: np.ndarray
    iou: list[float]
    miou: float
    pixel_accuracy: float
    pixels: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["confusion"] = self.confusion.tolist()
        d["iou"] = [None if np.isnan(v) else round(v, 4) for v in self.iou]
        d["miou"], d["pixel_accuracy"] = round(self.miou, 4), round(self.pixel_accuracy, 4)
        return d


def confusion_to_score(cm: np.ndarray) -> ProductScore:
    """IoU per class = TP / (TP + FP + FN) from a (C, C) confusion matrix (rows reference, columns prediction)."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = int(cm.sum())
    return ProductScore(confusion=cm, iou=[float(v) for v in iou],
                        miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
                        pixel_accuracy=float(tp.sum() / total) if total else float("nan"), pixels=total)


def score_product(product: str | Path, reference: str | Path, *, num_classes: int | None = None,
                  windows: Sequence[Window] | None = None) -> ProductScore:
    """Score the class map ``product`` (band 1, nodata from its profile, 255 by default) against ``reference``.

    num_classes: default the product's ``class_names`` tag, else 1 + the largest class in either raster's block.
    windows: only these windows of the product (e.g. the held-out tiles' cores); default: the whole product,
    block by block."""
    import json

    with rasterio.open(product) as src, rasterio.open(reference) as ref:
        nd = src.nodata if src.nodata is not None else NODATA
        ref_nd = ref.nodata if ref.nodata is not None else NODATA
        if num_classes is None and src.tags().get("class_names"):
            num_classes = 1 + max(int(k) for k in json.loads(src.tags()["class_names"]))
        if num_classes is None:
            raise ValueError(f"{product} has no class_names tag: pass num_classes")
        with WarpedVRT(ref, crs=src.crs, transform=src.transform, width=src.width, height=src.height,
                       resampling=Resampling.nearest, nodata=ref_nd) as vrt:
            cm = np.zeros((num_classes, num_classes), np.int64)
            for w in windows if windows is not None else (w for _, w in src.block_windows(1)):
                pred = src.read(1, window=w)
                truth = vrt.read(1, window=w)
                ok = (pred != nd) & (truth != ref_nd) & (truth < num_classes) & (pred < num_classes)
                idx = truth[ok].astype(np.int64) * num_classes + pred[ok].astype(np.int64)
                cm += np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return confusion_to_score(cm)
