"""Fine-tuning a head on labelled cube tiles (real local Ray, real cube, the demo truth COG as labels)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cube import CubeConfig
from pipeline.finetune import (
    FinetuneConfig,
    confusion,
    file_sha256,
    iou_from_confusion,
    load_head,
    read_head_info,
    run_finetune,
    split_tiles,
)
from pipeline.grid import TileGrid
from skysense_core import build_model
from skysense_core.checkpoint import save_checkpoint
from tests.demo_cube import ingest_2x2_tiles

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


@pytest.mark.parametrize("head", ["linear", "upernet"])
def test_finetune_reports_validation_miou_on_held_out_tiles(labelled_cube, head, torch_one_thread):
    out = labelled_cube["tmp"] / f"run-{head}"
    metrics = run_finetune(FinetuneConfig(
        cube=labelled_cube["cube"], labels=labelled_cube["labels"], checkpoint=labelled_cube["checkpoint"],
        out=str(out), head=head, epochs=2, batch_size=4, window=16, lr=5e-3,
    ), log=lambda s: None)
    assert len(metrics["val_tiles"]) == 1 and len(metrics["train_tiles"]) == 3
    assert not set(metrics["val_tiles"]) & set(metrics["train_tiles"])
    assert metrics["num_classes"] == 7  # the demo classes present in the training tiles go up to crop_late (6)
    assert metrics["val_pixels"] == 48 * 48  # one whole held-out tile (32 + 2 x 8 px), every pixel labelled
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["steps"] > 0
    assert json.loads((out / "metrics.json").read_text())["miou"] == metrics["miou"]
    assert load_file(str(out / "head.safetensors"))
    # the head describes itself for jobs/infer.py: its encoder (path + sha256), preset, classes and colours
    info = read_head_info(out)
    assert info.kind == head and info.num_classes == 7 and info.in_dim == 64 and info.window == 16
    assert info.encoder == str(Path(labelled_cube["checkpoint"]).resolve())
    assert info.encoder_sha256 == file_sha256(labelled_cube["checkpoint"]) and info.preset == "tiny"
    assert info.class_names[0] == "water" and len(info.colormap) >= 7 and len(info.colormap[0]) == 4
    module, _ = load_head(out)
    assert not module.training and sum(p.numel() for p in module.parameters()) > 0


def test_job_rejects_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "jobs/finetune.py", "--cube", str(tmp_path / "nope.zarr"), "--labels", "x",
                        "--checkpoint", "y", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
