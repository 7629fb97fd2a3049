"""pipeline.evaluate: a class map scored against a reference raster in another CRS and resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from pipeline.evaluate import confusion_to_score, score_product


def _write(path, data, crs, transform, tags=None, nodata=255):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype="uint8", crs=CRS.from_user_input(crs), transform=transform, nodata=nodata,
                       tiled=True, blockxsize=16, blockysize=16) as dst:
        dst.write(data, 1)
        if tags:
            dst.update_tags(**tags)


def test_confusion_to_score_by_hand():
    cm = np.array([[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # rows reference, columns predicted
    s = confusion_to_score(cm)
    assert s.iou[0] == pytest.approx(3 / 4) and s.iou[1] == pytest.approx(2 / 5)
    assert s.iou[2] == 0.0 and np.isnan(s.iou[3])  # predicted but absent / absent from both (left out)
    assert s.miou == pytest.approx((3 / 4 + 2 / 5 + 0) / 3) and s.pixel_accuracy == pytest.approx(5 / 8)
    assert s.pixels == 8 and s.to_dict()["iou"][3] is None


def test_reference_on_another_grid_is_warped_and_nodata_left_out(tmp_path):
    """Product: 32 x 32 px of 10 m in UTM 32N; reference: the same classes at 5 m on an aligned grid, so
    nearest-neighbour warping is exact. One quadrant of the product is wrong, a strip of the reference is nodata."""
    x0, y0 = 500_000.0, 5_000_320.0
    truth10 = (np.arange(32)[None, :] // 8 % 3).repeat(32, 0).astype(np.uint8)  # classes 0..2 in stripes
    pred = truth10.copy()
    pred[:16, :16] = (pred[:16, :16] + 1) % 3  # every pixel of the top-left quadrant wrong
    _write(tmp_path / "pred.tif", pred, "EPSG:32632", Affine(10, 0, x0, 0, -10, y0),
           tags={"class_names": json.dumps({"0": "a", "1": "b", "2": "c"})})
    ref = truth10.repeat(2, 0).repeat(2, 1)
    ref[:, -8:] = 255  # the last 4 product columns have no reference
    _write(tmp_path / "ref.tif", ref, "EPSG:32632", Affine(5, 0, x0, 0, -5, y0))
    s = score_product(tmp_path / "pred.tif", tmp_path / "ref.tif")
    assert s.pixels == 32 * 28
    assert s.confusion.trace() == 32 * 28 - 16 * 16
    assert s.pixel_accuracy == pytest.approx(1 - 256 / (32 * 28))
    # only the windows of the right half: everything agrees
    right = score_product(tmp_path / "pred.tif", tmp_path / "ref.tif",
                          windows=[rasterio.windows.Window(16, 0, 16, 32)])
    assert right.pixel_accuracy == 1.0 and right.pixels == 32 * 12
    # the reference in geographic coordinates: still scored on the product's grid
    with rasterio.open(tmp_path / "ref.tif") as src:
        from rasterio.warp import calculate_default_transform, reproject

        t, w, h = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        out = np.full((h, w), 255, np.uint8)
        reproject(src.read(1), out, src_transform=src.transform, src_crs=src.crs, dst_transform=t,
                  dst_crs="EPSG:4326", src_nodata=255, dst_nodata=255)
    _write(tmp_path / "ref4326.tif", out, "EPSG:4326", t)
    geo = score_product(tmp_path / "pred.tif", tmp_path / "ref4326.tif")
    assert geo.pixels > 0.8 * 32 * 28 and geo.confusion[0, 1] + geo.confusion[1, 2] + geo.confusion[2, 0] > 0
    with pytest.raises(ValueError, match="num_classes"):
        _write(tmp_path / "untagged.tif", pred, "EPSG:32632", Affine(10, 0, x0, 0, -10, y0))
        score_product(tmp_path / "untagged.tif", tmp_path / "ref.tif")
