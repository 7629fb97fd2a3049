"""Checkpoints: our safetensors format and the official SkySense++ release layout (round trips)."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from torch import nn

from skysense_core import build_model
from skysense_core.checkpoint import (
    _merge_perm,
    from_official,
    load_checkpoint,
    load_official,
    read_checkpoint,
    save_checkpoint,
    to_official,
)
from skysense_core.pretrain import PretrainConfig, SkySensePretrainer
from tests.model_inputs import make_batch

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model("tiny")
    with torch.no_grad():  # non-trivial values everywhere, the bank included
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        m.glbank.prototypes.add_(torch.randn_like(m.glbank.prototypes))
    return m.eval()


def test_own_format_round_trip(tmp_path, model):
    pt = SkySensePretrainer(model, PretrainConfig(head_dim=16, head_hidden=16, head_bottleneck=8))
    path = save_checkpoint(tmp_path / "ck.safetensors", model, teacher=pt.teacher, heads=pt.student_heads,
                           meta={"step": 7})
    loaded, parts, meta = load_checkpoint(path)
    assert meta == {"step": 7} and loaded.cfg == model.cfg
    ref = model.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # prototypes included
    assert set(parts["heads"]) == set(pt.student_heads.state_dict())
    assert not any(k.startswith("glbank.") for k in parts["teacher"])  # the shared bank is stored once
    batch = make_batch(hr_ratio=8)
    with torch.no_grad():
        assert torch.equal(model(batch).fused, loaded.eval()(batch).fused)


def _as_release(state: dict[str, torch.Tensor]) -> dict:
    """Our state in the official layout, dressed as the release file: atorch FlashAttention's ``Wqkv`` names,
    a DDP ``module.`` prefix and the trainer's container dict."""
    off = to_official(state)
    release = {}
    for k, v in off.items():
        k = re.sub(r"attn\.attn\.in_proj_(weight|bias)$", r"attn.attn.Wqkv.\1", k)
        release[f"module.{k}"] = v
    return {"model": release, "current_iteration": 30000}


def test_official_layout_round_trip(tmp_path, model):
    state = model.state_dict()
    off = to_official(state)
    # spot checks of the official names (shared/research/skysense.md section 7)
    expected = [
        "backbone_hr.patch_embed.projection.weight", "backbone_hr.stages.1.downsample.reduction.weight",
        "backbone_hr.stages.0.blocks.0.attn.w_msa.qkv.weight", "backbone_hr.stages.0.blocks.0.attn.w_msa.q_bias",
        "backbone_hr.stages.0.blocks.0.attn.w_msa.cpb_mlp.0.weight", "backbone_hr.stages.2.blocks.1.norm3.weight",
        "backbone_hr.stages.0.blocks.0.ffn.layers.0.0.weight", "backbone_hr.attn1.attn.attn.in_proj_weight",
        "backbone_hr.norm0.weight", "backbone_hr.vocabulary_token", "backbone_s2.patch_embed.projection.weight",
        "backbone_s2.layers.0.ln1.weight", "backbone_s2.layers.0.attn.attn.in_proj_weight",
        "backbone_s2.layers.0.attn.attn.out_proj.weight", "backbone_s2.layers.1.ffn.layers.1.weight",
        "head_s2.decoder.0.weight", "modality_vae.vae_hr.conv1.weight", "fusion.porj_linear.weight",
        "fusion.cls_token", "fusion.layers.0.ln1.weight", "fusion.layers.1.attn.attn.in_proj_bias",
        "head_rec_hr.psp_modules.0.1.conv.weight", "head_rec_hr.conv_seg.weight",
    ]
    for key in expected:
        assert key in off, key
    assert off["ctpe"].shape[1] == 365
    path = tmp_path / "skysensepp_release.ckpt"
    torch.save(_as_release(state), path)
    torch.manual_seed(1)
    fresh = build_model("tiny")
    report = load_official(path, fresh)
    assert not report["unexpected"]
    got = fresh.state_dict()
    ours_only = ("glbank.", "head_rec_grid.")
    for k, v in state.items():
        if k.startswith(ours_only):
            continue
        if k == "ctpe":  # 365 official rows; row 366 starts as a copy of row 365
            assert torch.equal(got[k][:, :365], v[:, :365]) and torch.equal(got[k][:, 365], v[:, 364])
            continue
        assert torch.equal(got[k], v), k
    back = from_official(to_official(state))
    assert set(back) == set(state) - {k for k in state if re.search(r"k_bias$", k)}


def test_release_without_dtpe_loads_with_a_zero_table(tmp_path, model):
    """Both released configs run with use_ctpe False: a file without ``ctpe`` must not leave a random DTPE."""
    release = _as_release(model.state_dict())
    del release["model"]["module.ctpe"]
    torch.save(release, tmp_path / "no_ctpe.ckpt")
    fresh = build_model("tiny")
    load_official(tmp_path / "no_ctpe.ckpt", fresh)
    assert not fresh.ctpe.any()


def test_a_release_missing_official_tensors_is_an_error(tmp_path, model):
    release = _as_release(model.state_dict())
    del release["model"]["module.backbone_hr.attn1.proj_in.weight"]
    torch.save(release, tmp_path / "partial.ckpt")
    with pytest.raises(KeyError, match="proj_in"):
        load_official(tmp_path / "partial.ckpt", build_model("tiny"))


def test_patch_merging_permutation_matches_mmcls_unfold():
    """mmcls merges 2x2 neighbours with nn.Unfold (channel-major); timm concatenates them position-major.
    The converted weight must give the same output."""
    torch.manual_seed(0)
    c, out = 3, 5
    official = torch.randn(out, 4 * c)
    x = torch.randn(2, c, 4, 6)  # NCHW
    unfold = nn.Unfold(kernel_size=2, stride=2)(x).transpose(1, 2)  # (B, L, 4C) channel-major
    ref = unfold @ official.t()
    from timm.models.swin_transformer_v2 import PatchMerging

    pm = PatchMerging(c, out, norm_layer=nn.Identity)
    with torch.no_grad():
        pm.reduction.weight.copy_(official[:, _merge_perm(c)])
    got = pm(x.permute(0, 2, 3, 1)).reshape(2, -1, out)
    torch.testing.assert_close(got, ref)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_official_loading_refuses_pickled_code(tmp_path, model):
    path = tmp_path / "evil.ckpt"
    torch.save({"model": model.state_dict(), "extra": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_official(path, model)


def test_load_rejects_other_files(tmp_path, model):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_saving_the_same_content_keeps_the_file(tmp_path, model):
    """Heads pin their encoder by sha256: re-exporting unchanged weights (a resumed run with nothing left to do)
    must not write a new file, whose metadata safetensors would order differently."""
    path = save_checkpoint(tmp_path / "ck.safetensors", model, meta={"steps": 20})
    before = path.stat().st_ino, path.read_bytes()
    save_checkpoint(path, model, meta={"steps": 20})
    assert (path.stat().st_ino, path.read_bytes()) == before
    save_checkpoint(path, model, meta={"steps": 21})  # other metadata: rewritten
    assert path.stat().st_ino != before[0] and read_checkpoint(path)[2]["steps"] == 21
    with torch.no_grad():
        model.glbank.prototypes.add_(1.0)
    ino = path.stat().st_ino
    save_checkpoint(path, model, meta={"steps": 21})  # other values: rewritten
    assert path.stat().st_ino != ino
    assert torch.equal(read_checkpoint(path)[1]["model"]["glbank.prototypes"], model.glbank.prototypes)
