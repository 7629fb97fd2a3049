"""Checkpoints: our own format (safetensors) and the official SkySense++ release layout.

Our format: one ``.safetensors`` file; tensors ``model.<key>`` (the student, geo-context bank included),
``teacher.<key>`` (stage-1 teacher, without the bank it shares with the student) and ``heads.<key>`` (any other
module, e.g. the DINO heads); metadata ``config`` (the ModelConfig as JSON), ``format``, and free ``meta`` JSON.
Tensors load without pickle, so a checkpoint cannot run code.

Official layout (``skysensepp_release.ckpt``, mmcv / mmcls / mmseg names; ``shared/research/skysense.md`` s.7)
-> ours (timm names), key by key:

    any               leading "module." is dropped; "...attn.attn.Wqkv." -> "...attn.attn.in_proj_"
    backbone_hr.      patch_embed.projection.                -> patch_embed.proj.
                      stages.S.downsample.reduction.weight   -> layers.S.downsample.reduction.weight (columns
                                                                 permuted: mmcls merges 2x2 patches with
                                                                 nn.Unfold, channel-major; timm position-major)
                      stages.S.downsample.norm.              -> layers.S.downsample.norm.
                      stages.S.blocks.B.attn.w_msa.X         -> layers.S.blocks.B.attn.X (qkv, q_bias, v_bias,
                                                                 logit_scale, cpb_mlp, proj)
                      stages.S.blocks.B.ffn.layers.0.0.      -> layers.S.blocks.B.mlp.fc1.
                      stages.S.blocks.B.ffn.layers.1.        -> layers.S.blocks.B.mlp.fc2.
                      stages.S.blocks.B.norm1/2/3.           -> layers.S.blocks.B.norm1/2/3.
                      attnK.attn.attn.in_proj_* / out_proj.  -> attnK.attn.in_proj_* / out_proj.
                      relative_coords_table, relative_position_index: skipped (recomputed buffers)
    backbone_s2/s1.   patch_embed.projection.                -> patch_embed.proj.
                      layers.I.ln1. / ln2.                   -> blocks.I.norm1. / norm2.
                      layers.I.attn.attn.in_proj_weight/bias -> blocks.I.attn.qkv.weight/bias
                      layers.I.attn.attn.out_proj.           -> blocks.I.attn.proj.
                      layers.I.ffn.layers.0.0. / 1.          -> blocks.I.mlp.fc1. / fc2.
                      cls_token (SkySense V1 files)          -> dropped, with the class row of pos_embed
    fusion.           layers.I.* as the ViT; porj_linear., cls_token unchanged
    ctpe              [1, 365, C] -> [1, 366, C]: row 366 (31 Dec of leap years) starts as a copy of row 365
    head_s2/s1., modality_vae., head_rec_hr.   unchanged

Names of ours the official model lacks (``head_rec_grid``, ``glbank``) are reported as missing on load; a
release without ``ctpe`` (both released configs have ``use_ctpe: False``) loads with a zero DTPE table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from skysense_core.config import ModelConfig

FORMAT = "skysense-checkpoint/1"

# (official regex, ours template) per sub-model; applied after the prefix is split off.
_SWIN = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^stages\.(\d+)\.downsample\.", r"layers.\1.downsample."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.", r"layers.\1.blocks.\2.attn."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.", r"layers.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.", r"layers.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"layers.\1.blocks.\2."),
    (r"^(attn\d)\.attn\.attn\.", r"\1.attn."),
]
_VIT_BLOCKS = [
    (r"^layers\.(\d+)\.ln1\.", r"{blocks}.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"{blocks}.\1.norm2."),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_weight$", r"{blocks}.\1.attn.qkv.weight"),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_bias$", r"{blocks}.\1.attn.qkv.bias"),
    (r"^layers\.(\d+)\.attn\.attn\.out_proj\.", r"{blocks}.\1.attn.proj."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"{blocks}.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"{blocks}.\1.mlp.fc2."),
]
_VIT = [(r"^patch_embed\.projection\.", "patch_embed.proj.")] + [
    (a, b.replace("{blocks}", "blocks")) for a, b in _VIT_BLOCKS
]
_FUSION = [(a, b.replace("{blocks}", "layers")) for a, b in _VIT_BLOCKS]
_RULES = {"backbone_hr": _SWIN, "backbone_s2": _VIT, "backbone_s1": _VIT, "fusion": _FUSION}

# ours -> official, written out rather than derived so that each direction reads plainly
_SWIN_BACK = [
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^layers\.(\d+)\.downsample\.", r"stages.\1.downsample."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.", r"stages.\1.blocks.\2.attn.w_msa."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.blocks.\2.ffn.layers.0.0."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.blocks.\2.ffn.layers.1."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^(attn\d)\.attn\.", r"\1.attn.attn."),
]
_VIT_BLOCKS_BACK = [
    (r"^{blocks}\.(\d+)\.norm1\.", r"layers.\1.ln1."),
    (r"^{blocks}\.(\d+)\.norm2\.", r"layers.\1.ln2."),
    (r"^{blocks}\.(\d+)\.attn\.qkv\.weight$", r"layers.\1.attn.attn.in_proj_weight"),
    (r"^{blocks}\.(\d+)\.attn\.qkv\.bias$", r"layers.\1.attn.attn.in_proj_bias"),
    (r"^{blocks}\.(\d+)\.attn\.proj\.", r"layers.\1.attn.attn.out_proj."),
    (r"^{blocks}\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
    (r"^{blocks}\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1."),
]
_RULES_BACK = {
    "backbone_hr": _SWIN_BACK,
    "backbone_s2": [(r"^patch_embed\.proj\.", "patch_embed.projection.")]
    + [(a.replace("{blocks}", "blocks"), b) for a, b in _VIT_BLOCKS_BACK],
    "fusion": [(a.replace("{blocks}", "layers"), b) for a, b in _VIT_BLOCKS_BACK],
}
_RULES_BACK["backbone_s1"] = _RULES_BACK["backbone_s2"]
_SKIP = re.compile(r"(relative_coords_table|relative_position_index|attn_mask|k_bias)$")


def _merge_perm(c: int) -> torch.Tensor:
    """Column permutation of a 2x2 patch-merging weight: ours[:, j] = official[:, perm[j]].

    timm concatenates the four neighbours position-major, index (dw * 2 + dh) * C + c; mmcls' nn.Unfold is
    channel-major, index c * 4 + dh * 2 + dw.
    """
    perm = torch.empty(4 * c, dtype=torch.long)
    for dh in range(2):
        for dw in range(2):
            for ch in range(c):
                perm[(dw * 2 + dh) * c + ch] = ch * 4 + dh * 2 + dw
    return perm


def _rename(key: str, rules) -> str:
    for pat, tpl in rules:
        new, n = re.subn(pat, tpl, key)
        if n:
            return new
    return key


def from_official(state: dict[str, torch.Tensor], doy_entries: int = 366) -> dict[str, torch.Tensor]:
    """An official SkySense++ state_dict (or a ``{"model": state_dict}`` container) in our key layout."""
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    out = {}
    for key, value in state.items():
        # atorch FlashAttention stored the packed projection as Wqkv.{weight,bias}; torch calls it in_proj_*
        key = key.removeprefix("module.").replace(".Wqkv.", ".in_proj_")
        if _SKIP.search(key):
            continue
        prefix, _, rest = key.partition(".")
        if prefix in _RULES:
            if prefix.startswith("backbone_s") and rest == "cls_token":
                continue
            new_rest = _rename(rest, _RULES[prefix])
            if prefix == "backbone_hr" and re.match(r"layers\.\d+\.downsample\.reduction\.weight$", new_rest):
                value = value[:, _merge_perm(value.shape[1] // 4)].contiguous()
            key = f"{prefix}.{new_rest}"
        if key == "ctpe" and value.shape[1] < doy_entries:
            pad = value[:, -1:].expand(-1, doy_entries - value.shape[1], -1)
            value = torch.cat([value, pad], dim=1)
        out[key] = value
    for m in ("backbone_s2", "backbone_s1"):  # V1 files: a class-token row at the front of pos_embed
        k = f"{m}.pos_embed"
        if k in out and f"{m}.cls_token" in {x.removeprefix('module.') for x in state}:
            out[k] = out[k][:, 1:]
    return out


def to_official(state: dict[str, torch.Tensor], doy_entries_official: int = 365) -> dict[str, torch.Tensor]:
    """Our state_dict in the official layout (the inverse of ``from_official`` on the keys both have)."""
    inv = _RULES_BACK
    out = {}
    for key, value in state.items():
        if _SKIP.search(key):
            continue
        prefix, _, rest = key.partition(".")
        if prefix in inv:
            new_rest = _rename(rest, inv[prefix])
            if prefix == "backbone_hr" and re.match(r"stages\.\d+\.downsample\.reduction\.weight$", new_rest):
                value = value[:, torch.argsort(_merge_perm(value.shape[1] // 4))].contiguous()
            key = f"{prefix}.{new_rest}"
        if key == "ctpe":
            value = value[:, :doy_entries_official]
        out[key] = value
    return out


def load_official(path: str | Path, model: nn.Module, strict_official: bool = True) -> dict[str, list[str]]:
    """Load an official SkySense++ checkpoint (``.ckpt`` / ``.pth``) into ``model`` with ``weights_only=True``.

    Returns ``{"missing": [...], "unexpected": [...]}``; with ``strict_official`` any unexpected key (an official
    tensor we could not place) or a missing key that the official model has is an error.
    """
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = from_official(raw, model.cfg.doy_entries)
    if "ctpe" not in state:
        # both released configs run with use_ctpe False, so the release may have no DTPE: a zero table keeps the
        # released model's behaviour instead of adding a random encoding to every token
        state["ctpe"] = torch.zeros_like(model.ctpe, device="cpu")
    result = model.load_state_dict(state, strict=False)
    ours_only = re.compile(r"^(glbank\.|head_rec_grid\.)")
    missing = [k for k in result.missing_keys if not ours_only.match(k)]
    if strict_official and (missing or result.unexpected_keys):
        raise KeyError(f"official checkpoint does not fit: missing {missing[:10]}..., "
                       f"unexpected {result.unexpected_keys[:10]}...")
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


# ------------------------------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path, model: nn.Module, teacher: nn.Module | None = None, heads: nn.Module | None = None,
    meta: dict | None = None, student: nn.Module | None = None,
) -> Path:
    """Write model (+ teacher, + other modules) to ``path`` (safetensors) atomically. ``model.*`` is what
    :func:`load_checkpoint` builds; an exported stage-1 run puts the EMA teacher there (the network the papers
    evaluate) and keeps the student under ``student.*`` (without the geo bank, which both share).

    When ``path`` already holds exactly these tensors and metadata, it is left as it is: safetensors writes its
    metadata map in hash order, so the same content saved by another process has other bytes, and consumers
    that pin a checkpoint by its sha256 (fine-tuned heads) would see a new file."""
    path = Path(path)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if teacher is not None:
        tensors.update({f"teacher.{k}": v for k, v in teacher.state_dict().items() if not k.startswith("glbank.")})
    if heads is not None:
        tensors.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    if student is not None:
        tensors.update({f"student.{k}": v for k, v in student.state_dict().items() if not k.startswith("glbank.")})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "config": json.dumps(model.cfg.to_dict()), "meta": json.dumps(meta or {})}
    if path.is_file() and _same_content(path, tensors, metadata):
        return path
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _same_content(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether the safetensors file ``path`` holds exactly ``tensors`` (names, dtypes, values) and ``metadata``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) != metadata or set(f.keys()) != set(tensors):
                return False
            for k, v in tensors.items():
                old = f.get_tensor(k)
                if old.dtype != v.dtype or old.shape != v.shape or not torch.equal(old, v):
                    return False
    except Exception:  # unreadable or partial: rewrite it
        return False
    return True


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], dict]:
    """-> (config, {"model": ..., "teacher": ..., "heads": ..., "student": ...} state dicts, meta)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format {metadata.get('format')!r})")
    tensors = load_file(str(path))
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "teacher": {}, "heads": {}, "student": {}}
    for k, v in tensors.items():
        part, _, rest = k.partition(".")
        parts[part][rest] = v
    return ModelConfig.from_dict(json.loads(metadata["config"])), parts, json.loads(metadata.get("meta", "{}"))


def load_checkpoint(path: str | Path, model: nn.Module | None = None, strict: bool = True):
    """Model from a checkpoint of ours (built from its stored config unless ``model`` is given).
    -> (model, parts, meta) with parts the raw teacher / heads state dicts."""
    cfg, parts, meta = read_checkpoint(path)
    if model is None:
        from skysense_core.model import SkySense

        model = SkySense(cfg)
    model.load_state_dict(parts["model"], strict=strict)
    return model, parts, meta
