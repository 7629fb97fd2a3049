"""Fine-tuning on labelled cube tiles (real local Ray, real cube, the demo truth COG as labels): the recipe of
pipeline.finetune, its head file, and inference applying it as validation did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cube import CubeConfig
from pipeline.finetune import (
    FinetuneConfig,
    class_weights,
    confusion,
    file_sha256,
    finetune,
    iou_from_confusion,
    load_head,
    read_head_info,
    run_finetune,
    split_tiles,
)
from pipeline.grid import TileGrid
from skysense_core import build_model
from skysense_core.checkpoint import save_checkpoint
from skysense_core.heads import PixelHead
from skysense_core.pixel_features import feature_dim
from tests.demo_cube import ingest_2x2_tiles

REPO = Path(__file__).resolve().parents[1]
CFG = CubeConfig(grid=TileGrid(32, 8), t_s2=3, t_s1=2, t_hr=1, hr_ratio=8)


@pytest.fixture(scope="module")
def labelled_cube(demo_region, ray_local, tmp_path_factory):
    """2 x 2 tiles inside the demo region, its 10 m land-cover truth and a tiny checkpoint."""
    catalog, dcfg = demo_region
    tmp = tmp_path_factory.mktemp("ft")
    ingest_2x2_tiles(catalog, dcfg, CFG, tmp / "cube.zarr")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / "tiny.safetensors", build_model("tiny"), meta={"what": "random init"})
    return {"cube": str(tmp / "cube.zarr"), "labels": str(catalog.parent / "truth" / "landcover_10m.tif"),
            "checkpoint": str(ckpt), "tmp": tmp}


def test_metrics_by_hand():
    truth = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    cm = confusion(pred, truth, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # the nodata pixel is not counted
    assert iou_from_confusion(cm) == [pytest.approx(1 / 3), pytest.approx(2 / 3), 0.0]
    assert iou_from_confusion(torch.zeros(2, 2, dtype=torch.long)) == [None, None]
    assert split_tiles(["d", "a", "c", "b"], 4) == (["a", "b", "c"], ["d"])
    with pytest.raises(ValueError, match="at least 2"):
        split_tiles(["a"], 4)


def _cfg(cube, **kw) -> FinetuneConfig:
    return FinetuneConfig(cube=cube["cube"], labels=cube["labels"], checkpoint=cube["checkpoint"],
                          **{"steps": 30, "threads": 1, **kw})


@pytest.fixture(scope="module")
def finetuned(labelled_cube):
    """The recipe's default run (frozen encoder, 'dates+input' features, linear head by L-BFGS) and its cached
    pixels."""
    out = labelled_cube["tmp"] / "run-default"
    metrics, feats = finetune(_cfg(labelled_cube, out=str(out)), log=lambda s: None)
    return out, metrics, feats


def test_finetune_reports_held_out_miou_and_describes_its_head(labelled_cube, finetuned):
    out, metrics, feats = finetuned
    assert len(metrics["val_tiles"]) == 1 and len(metrics["train_tiles"]) == 3
    assert not set(metrics["val_tiles"]) & set(metrics["train_tiles"])
    assert metrics["num_classes"] == 7  # the demo classes, from the label raster's class_names tag
    assert metrics["val_pixels"] == 32 * 32  # the held-out tile's core, every pixel labelled
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["steps"] == 30 and metrics["best_step"] > 0
    assert json.loads((out / "metrics.json").read_text())["miou"] == metrics["miou"]
    # the head describes itself for jobs/infer.py: its encoder (path + sha256), preset, features, classes, colours
    info = read_head_info(out)
    assert info.kind == "linear" and info.features == "dates+input" and info.num_classes == 7
    assert info.in_dim == feats["train"].x.shape[1] == feature_dim("dates+input", build_model("tiny").cfg,
                                                                   ("hr", "s2", "s1"))
    assert info.encoder == str(Path(labelled_cube["checkpoint"]).resolve())
    assert info.encoder_sha256 == file_sha256(labelled_cube["checkpoint"]) and info.preset == "tiny"
    assert info.class_names[0] == "water" and len(info.colormap) >= 7 and len(info.colormap[0]) == 4
    # standardisation and class weights travel inside the head file
    state = load_file(str(out / "head.safetensors"))
    torch.testing.assert_close(state["mean"], feats["train"].x.mean(0))
    torch.testing.assert_close(state["std"], feats["train"].x.std(0).clamp(min=1e-6))
    counts = torch.bincount(feats["train"].y, minlength=7)
    assert torch.equal(state["class_weights"], torch.from_numpy(class_weights(counts.numpy())))
    assert (state["class_weights"][counts > 0] > 0).all() and (state["class_weights"][counts == 0] == 0).all()
    module, _ = load_head(out)
    assert not module.training and isinstance(module, PixelHead)


def test_confidence_temperature_lowers_the_held_out_calibration_error(labelled_cube, finetuned):
    """The confidence's temperature is fitted on the selection tiles and stored in the head; on the held-out tile
    the calibrated expected calibration error is lower than the uncalibrated one (the class-balanced head is
    miscalibrated as trained), recomputed here from the cached pixels. Without selection tiles (the default
    split of 4 tiles has none) the temperature stays 1 and says so."""
    from pipeline.calibration import expected_calibration_error
    from pipeline.finetune import pixel_logits

    assert finetuned[1]["calibration"]["temperature"] == 1.0 and finetuned[1]["calibration"]["fit_pixels"] == 0
    assert finetuned[1]["calibration"]["fitted_on"].startswith("nothing")
    out = labelled_cube["tmp"] / "run-calibrated"
    metrics, feats = finetune(_cfg(labelled_cube, out=str(out), select_every=2), log=lambda s: None)
    assert len(metrics["select_tiles"]) == 1 and len(metrics["val_tiles"]) == 1
    cal = metrics["calibration"]
    print(f"\ncalibration: T {cal['temperature']:.3f} on {cal['fit_pixels']} selection pixels; held-out ECE "
          f"{cal['ece_uncalibrated']:.4f} uncalibrated -> {cal['ece_calibrated']:.4f} calibrated")
    assert cal["fitted_on"] == "selection tiles" and cal["fit_pixels"] == len(feats["select"].y) > 0
    assert read_head_info(out).temperature == pytest.approx(cal["temperature"])
    head, _ = load_head(out)
    z = pixel_logits(head, feats["held_out"].x)
    y = feats["held_out"].y
    before = expected_calibration_error(torch.softmax(z, 1), y)
    after = expected_calibration_error(torch.softmax(z / cal["temperature"], 1), y)
    assert before == pytest.approx(cal["ece_uncalibrated"]) and after == pytest.approx(cal["ece_calibrated"])
    assert after < before


def test_expected_calibration_error_by_hand():
    """Two bins' worth of pixels: confident and right, unsure and half right."""
    from pipeline.calibration import expected_calibration_error, fit_temperature

    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 0, 1])
    # bin of 0.95: accuracy 1, confidence 0.95 -> gap 0.05; bin of 0.55: accuracy 0.5 -> gap 0.05
    assert expected_calibration_error(probs, labels) == pytest.approx(0.05)
    # logits twice as sharp as the truth: the fitted temperature undoes it
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 4, generator=g) * 2
    y = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g)[:, 0]
    assert fit_temperature(true_logits * 2, y) == pytest.approx(2.0, rel=0.05)


def test_class_weights_balance_by_inverse_square_root_frequency():
    w = class_weights(np.array([900, 100, 0]))
    assert w[2] == 0 and w[1] / w[0] == pytest.approx(3.0)  # sqrt(900 / 100)
    assert (np.array([0.9, 0.1]) * w[:2]).sum() == pytest.approx(1.0)  # the average pixel weighs 1


def test_finetune_beats_the_same_run_on_noise_features(labelled_cube):
    """The encoder's own features ('dates': F_fus and the per-date tokens by month, no input skip) against the same
    run with them replaced by noise, on the held-out tile: the encoder must carry the signal."""
    kw = {"features": "dates", "steps": 40}
    real = run_finetune(_cfg(labelled_cube, out=str(labelled_cube["tmp"] / "run-dates"), **kw), log=lambda s: None)
    noise = run_finetune(_cfg(labelled_cube, out=str(labelled_cube["tmp"] / "run-noise"), noise_features=True, **kw),
                         log=lambda s: None)
    print(f"held-out mIoU: encoder features {real['miou']:.3f}, noise {noise['miou']:.3f}")
    assert real["miou"] > noise["miou"] + 0.1


def test_infer_applies_the_head_as_validation_did(labelled_cube, finetuned, ray_local):
    """Predicting the held-out tile through jobs/infer.py gives the classes the validation gave: the head's
    standardisation, feature set and window plan are applied at inference exactly as in fine-tuning."""
    import rasterio
    import ray

    from pipeline.inference import tile_path

    out, metrics, feats = finetuned
    head, _ = load_head(out)
    with torch.inference_mode():
        val_pred = head.forward_pixels(feats["held_out"].x).argmax(1)
    tile = metrics["val_tiles"][0]
    product = labelled_cube["tmp"] / "products" / "landcover.tif"
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "infer.py"), "--ray-address",
                        ray.get_runtime_context().gcs_address, "--cube", labelled_cube["cube"], "--checkpoint",
                        str(out), "--task", "landcover", "--out", str(product)],
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    with rasterio.open(tile_path(product.parent / "landcover.tiles", tile)) as src:
        pred = torch.from_numpy(src.read(1).astype(np.int64)).flatten()[feats["held_out"].pixel]
    agree = float((pred == val_pred).float().mean())
    assert agree >= 0.999, agree


def test_fusion_trains_on_cached_encoder_outputs(labelled_cube):
    """--train fusion: the encoders run once per tile (their outputs cached), the fusion and date encoding are
    trained on pixels of every training tile, only they change in the written model, and the head is fitted on
    and scored with that model's features."""
    from pipeline.finetune_fusion import cache_sequences
    from pipeline.inference import feature_spec
    from skysense_core.checkpoint import load_checkpoint, read_checkpoint

    out = labelled_cube["tmp"] / "run-fusion"
    cfg = _cfg(labelled_cube, out=str(out), train="fusion", model_steps=6, batch_size=256, pixels_per_tile=512,
               steps=10)
    metrics = run_finetune(cfg, log=lambda s: None)
    model_path = out / "model" / "model.safetensors"
    assert metrics["train"] == "fusion" and metrics["encoder"] == str(model_path.resolve())
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["model_cached_pixels"] > 0
    assert [c["step"] for c in metrics["model_curve"]][-1] == 6
    trained, before = read_checkpoint(model_path)[1]["model"], read_checkpoint(cfg.checkpoint)[1]["model"]
    changed = {k.split(".")[0] for k in trained if not torch.equal(trained[k], before[k])}
    assert changed == {"fusion", "ctpe"}, changed
    assert read_head_info(out).encoder == str(model_path.resolve()) and read_head_info(out).train == "fusion"

    # the cache holds what the model computes: a cached pixel's F_fus is the full forward's at that pixel
    model = load_checkpoint(model_path)[0].eval()
    spec = feature_spec(cfg.cube, model_path, "fused")
    tile = metrics["train_tiles"][0]
    cached = cache_sequences(model, cfg.cube, cfg.labels, [tile], spec, "fused", sample=64, log=lambda s: None)
    from skysense_core.segmentation import CachedFusionFinetuner

    probe = CachedFusionFinetuner(model, 9, 0).eval()
    with torch.inference_mode():
        feats = probe.features(*cached.inputs(slice(None), torch.device("cpu")))
    assert feats.shape == (64, 2 * model.cfg.fusion_dim) and torch.isfinite(feats).all()


def test_job_rejects_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "jobs/finetune.py", "--cube", str(tmp_path / "nope.zarr"), "--labels", "x",
                        "--checkpoint", "y", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_until_drops_the_dates_after_the_event():
    """An as-of product (the flood of an event date) sees nothing observed later."""
    from pipeline.datasource import until

    batch = {"s1_valid": np.array([[True, True, True, False]]), "s1_doy": np.array([[100, 296, 320, 0]]),
             "s2_valid": np.array([[True, True]]), "s2_doy": np.array([[290, 297]]), "s1": np.zeros((1, 4, 2, 2, 2))}
    out = until(batch, 296)
    assert out["s1_valid"].tolist() == [[True, True, False, False]] and out["s2_valid"].tolist() == [[True, False]]
    assert out["s1"] is batch["s1"] and until(batch, None)["s1_valid"] is batch["s1_valid"]
