"""SkySense++ stage 2 (masked semantic learning) and few-shot in-context segmentation.

Labels enter the model as a second token stream: class ids are remapped every forward pass to random ids of a
65-entry vocabulary (id 0 = background / unlabelled), so a class has no fixed identity and the model must
read what a region *is* from the labelled context. Parts of the label tokens are masked and the UPerNet head
predicts the ids of every pixel (official recipe, ``shared/research/skysense.md`` section 3.2):

* masking: with probability 0.3 the bottom half of the cell grid (exactly the in-context inference layout),
  else BEiT block masking of 50 % of the cells (blocks of >= 4 cells, aspect 0.3..3.3);
* loss: class-balanced cross-entropy over the ids of all pixels + the modality-completion loss.

Few-shot: k labelled support tiles and a query tile are stacked vertically (supports on top, the query at the
bottom, as the official 1-shot predictor does for k = 1), the query's label tokens are all masked, and the
predicted ids of the query rows are mapped back to classes through that forward's id table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from skysense_core.inputs import MODALITIES, ModalityInput, SkySenseInput
from skysense_core.losses import class_balanced_cross_entropy
from skysense_core.model import SemanticInput, SkySense

IGNORE = 255  # label value of unlabelled pixels in the cube's label maps


def remap_labels(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None, vocab_size: int = 65,
    background: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids -> random label ids, redrawn at every call and shared by the whole batch.

    labels (B, H, W) int64 class ids 0..num_classes-1, ``IGNORE`` (255) = unlabelled.
    Returns ids (B, H, W) in 0..vocab_size-1 and table (num_classes,) with table[c] = id of class c.
    Unlabelled pixels and the ``background`` class (if given; the binary few-shot masks' black) get id 0; the
    other classes a random permutation of 1..vocab_size-1.
    """
    if num_classes > vocab_size - 1:
        raise ValueError(f"{num_classes} classes do not fit a {vocab_size}-entry vocabulary (id 0 is reserved)")
    perm = torch.randperm(vocab_size - 1, generator=generator)[:num_classes] + 1
    table = perm.to(labels.device)
    if background is not None:
        table[background] = 0
    ids = torch.zeros_like(labels)
    ok = (labels >= 0) & (labels < num_classes)
    ids[ok] = table[labels[ok]]
    return ids, table


def block_mask(
    batch: int, hc: int, wc: int, generator: torch.Generator | None = None, ratio: float = 0.5, min_cells: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """BEiT block-wise masking of ``ratio`` of an ``hc x wc`` cell grid, per sample. -> (batch, hc, wc) bool."""
    out = torch.zeros(batch, hc, wc, dtype=torch.bool)
    target = int(round(ratio * hc * wc))
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def rand() -> float:
        return float(torch.rand((), generator=generator))

    for b in range(batch):
        m = out[b]
        for _ in range(100):
            done = int(m.sum())
            if done >= target:
                break
            max_cells = target - done
            area = min_cells + rand() * (max(max_cells, min_cells) - min_cells)
            ar = math.exp(log_aspect[0] + rand() * (log_aspect[1] - log_aspect[0]))
            h = min(max(int(round(math.sqrt(area * ar))), 1), hc)
            w = min(max(int(round(math.sqrt(area / ar))), 1), wc)
            top = int(rand() * (hc - h + 1))
            left = int(rand() * (wc - w + 1))
            block = m[top:top + h, left:left + w]
            new = int((~block).sum())
            if 0 < new <= max_cells:
                block[:] = True
        # finish with single cells so that the ratio is exact
        free = (~m).flatten().nonzero().flatten()
        short = target - int(m.sum())
        if short > 0:
            pick = free[torch.randperm(len(free), generator=generator)[:short]]
            m.view(-1)[pick] = True
    return out


def semantic_mask(
    batch: int, hc: int, wc: int, generator: torch.Generator | None = None, p_bottom: float = 0.3,
    ratio: float = 0.5,
) -> torch.Tensor:
    """The stage-2 mask: bottom half of the cell grid with probability ``p_bottom``, else block masking.
    -> (batch, hc, wc) bool, True = masked."""
    out = block_mask(batch, hc, wc, generator, ratio)
    for b in range(batch):
        if float(torch.rand((), generator=generator)) < p_bottom:
            out[b] = False
            out[b, hc // 2:] = True
    return out


@dataclass(frozen=True)
class SemanticConfig:
    """Stage-2 settings (official values)."""

    p_bottom: float = 0.3
    mask_ratio: float = 0.5
    completion_weight: float = 1.0


class SemanticPretrainer(nn.Module):
    """Masked semantic learning. ``forward(batch, labels, num_classes, generator) -> (loss, logs)``.

    labels (B, H, W) class ids at HR resolution (or at grid resolution for batches without HR), IGNORE = 255.
    """

    def __init__(self, model: SkySense, cfg: SemanticConfig | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg or SemanticConfig()

    def forward(self, batch: SkySenseInput, labels: torch.Tensor, num_classes: int,
                generator: torch.Generator | None = None):
        mc = self.model.cfg
        h, w = batch.grid_size(mc.hr_ratio)
        if h % mc.mask_cell or w % mc.mask_cell:
            raise ValueError(f"grid {(h, w)} is not a multiple of mask_cell {mc.mask_cell}")
        ids, _ = remap_labels(labels, num_classes, generator, mc.vocab_size)
        mask = semantic_mask(batch.batch_size, h // mc.mask_cell, w // mc.mask_cell, generator,
                             self.cfg.p_bottom, self.cfg.mask_ratio).to(labels.device)
        out = self.model(batch, SemanticInput(ids, mask), geo=False)
        logits = self.model.semantic_logits(out, out_size=tuple(ids.shape[-2:]))
        l_rec = class_balanced_cross_entropy(logits, ids)
        loss = l_rec
        logs = {"loss/semantic": float(l_rec.detach())}
        if out.completion is not None and self.cfg.completion_weight:
            l_vae = self.model.modality_vae.loss(out.completion, out.extras["summary_in"], out.extras["present"])
            loss = loss + self.cfg.completion_weight * l_vae
            logs["loss/completion"] = float(l_vae.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs


# ------------------------------------------------------------------------------------------------------------------
# the official stage-2 optimisation
# ------------------------------------------------------------------------------------------------------------------
# configs/pretrain_skysensepp.yml (shared/research/skysense.md section 3.2.6): AdamW lr 2e-4, betas (0.9, 0.999),
# weight decay 0.04, layer-wise lr decay 0.7 (Swin counted over its blocks), grad clip L2 5, 1k warm-up then
# linear decay over 30k iterations; frozen: the patch embeddings plus the first 12 of 24 blocks of Swin and of each
# ViT (half), and the fusion layers from the third on (layers 0-1, the projection and the cls token train).
STAGE2_RECIPE = {
    "lr": 2e-4, "betas": (0.9, 0.999), "weight_decay": 0.04, "layer_decay": 0.7, "grad_clip": 5.0,
    "frozen_block_fraction": 0.5, "trained_fusion_layers": 2, "warmup": 1000, "iterations": 30000,
}


def _backbone_layer(name: str, cfg) -> tuple[str, int, int] | None:
    """(backbone, layer id, layers) of an encoder parameter for layer-wise decay, mmseg's numbering: 0 = patch
    embedding, 1..N = the blocks in order, N + 1 = what follows the last block; None outside the encoders and
    for the stage-2 label tokens (new parameters of this stage, trained at the full rate)."""
    parts = name.split(".")
    if parts[0] == "backbone_hr":
        n = sum(cfg.hr_depths)
        if parts[1] == "patch_embed":
            return "hr", 0, n
        if parts[1] == "layers":
            before = sum(cfg.hr_depths[: int(parts[2])])  # blocks of the earlier stages
            if parts[3] == "blocks":
                return "hr", before + int(parts[4]) + 1, n
            return "hr", before + 1, n  # a stage's downsample goes with its first block
        if parts[1] in ("mask_token", "vocabulary_token", "vocabulary_weight"):
            return None
        return "hr", n + 1, n  # per-stage norms and the global attention after the stages
    if parts[0] in ("backbone_s2", "backbone_s1"):
        n = cfg.vit_depth
        if parts[1] in ("patch_embed", "pos_embed", "cls_token"):
            return parts[0], 0, n
        if parts[1] == "blocks":
            return parts[0], int(parts[2]) + 1, n
        if parts[1] in ("mask_token", "vocabulary_token", "vocabulary_weight"):
            return None
        return parts[0], n + 1, n
    return None


def stage2_param_groups(model: SkySense, weight_decay: float, recipe: dict | None = None) -> list[dict]:
    """Freeze what the official stage 2 freezes and return AdamW parameter groups with an ``lr_scale`` each
    (layer-wise decay: ``layer_decay ** (N + 1 - layer_id)`` inside each encoder, 1 elsewhere); 1-D parameters
    (norms, biases, tokens) without weight decay. The caller sets ``lr = base_lr * lr_scale`` per group."""
    r = {**STAGE2_RECIPE, **(recipe or {})}
    cfg = model.cfg
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if name.startswith("glbank."):
            p.requires_grad_(False)  # the geo bank is frozen downstream (the official freeze list's "glbank.")
            continue
        scale, frozen = 1.0, False
        where = _backbone_layer(name, cfg)
        if where is not None:
            _, layer, n = where
            frozen = layer <= int(n * r["frozen_block_fraction"])
            scale = r["layer_decay"] ** (n + 1 - layer)
        elif name.startswith("fusion.layers."):
            frozen = int(name.split(".")[2]) >= r["trained_fusion_layers"]
        p.requires_grad_(not frozen)
        if frozen:
            continue
        wd = weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr_scale": sc, "weight_decay": wd} for (sc, wd), ps in sorted(groups.items())]


# ------------------------------------------------------------------------------------------------------------------
# few-shot in-context segmentation
# ------------------------------------------------------------------------------------------------------------------
def stack_tiles(tiles: list[SkySenseInput]) -> SkySenseInput:
    """Stack single-tile inputs vertically into one sample (first tile on top).

    Date slot t of the stacked sample holds the t-th date slot of every tile. Sentinel modalities (on the grid)
    get a per-pixel day of year, (1, T, h_total, w): every tile keeps its own dates, so a support tile observed
    on other days than the query is encoded with its own seasons. HR (whose grid the stacker does not know)
    keeps one day per slot, the last tile's (the query's) where valid, else the first valid one. Pixel masks
    keep each tile's own validity, so in the fusion every location only uses dates its own tile had.
    Modalities present in some tiles only are zero with a False mask in the others.
    """
    kw = {}
    for m in MODALITIES:
        parts = [getattr(t, m) for t in tiles]
        if all(p is None for p in parts):
            continue
        ref = next(p for p in parts if p is not None)
        t_max = max(p.data.shape[1] for p in parts if p is not None)
        datas, masks, valids, doys = [], [], [], []
        for p in parts:
            c, hh, ww = ref.data.shape[2:]
            data = ref.data.new_zeros((1, t_max, c, hh, ww))
            mask = torch.zeros((1, t_max, hh, ww), dtype=torch.bool, device=ref.data.device)
            valid = torch.zeros((1, t_max), dtype=torch.bool, device=ref.data.device)
            doy = torch.zeros((1, t_max), dtype=torch.long, device=ref.data.device)
            if p is not None:
                t = p.data.shape[1]
                data[:, :t] = p.data[:1]
                valid[:, :t] = p.valid[:1]
                doy[:, :t] = p.doy[:1]
                pm = p.mask[:1] if p.mask is not None else p.valid[:1, :, None, None].expand(1, t, hh, ww)
                mask[:, :t] = pm & p.valid[:1, :, None, None]
            datas.append(data)
            masks.append(mask)
            valids.append(valid)
            doys.append(doy)
        valid = torch.stack(valids).any(0)
        if m == "hr":
            doy = torch.zeros_like(doys[0])
            for d, v in zip(doys, valids, strict=True):  # later tiles (the query last) win
                doy = torch.where(v, d, doy)
        else:  # each tile's own days of year, on its own rows of the grid
            hh, ww = ref.data.shape[-2:]
            doy = torch.cat([d[:, :, None, None].expand(1, t_max, hh, ww) for d in doys], dim=2)
        kw[m] = ModalityInput(torch.cat(datas, dim=3), valid, doy, torch.cat(masks, dim=2))
    first = tiles[-1]
    return SkySenseInput(**kw, lat=None if first.lat is None else first.lat[:1],
                         lon=None if first.lon is None else first.lon[:1])


@torch.no_grad()
def few_shot_segment(
    model: SkySense, support: list[SkySenseInput], support_labels: list[torch.Tensor], query: SkySenseInput,
    num_classes: int, generator: torch.Generator | None = None, mode: str = "stack", background: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ``query`` (one tile) from k labelled ``support`` tiles. Labels (H, W) class ids at HR resolution
    (grid resolution when the tiles have no HR), 255 = unlabelled.

    mode "stack": all k supports above the query in one forward (the official 1-shot layout, extended to k);
    mode "average": k 1-shot forwards, class probabilities averaged. The class probability of class c is the
    softmax probability of its id in that forward's table (renormalised over the classes).
    Returns (class map (H, W) int64, class probabilities (num_classes, H, W)) for the query.
    """
    if len(support) != len(support_labels) or not support:
        raise ValueError("give at least one support tile and exactly one label map per support tile")
    mc = model.cfg
    groups = [list(range(len(support)))] if mode == "stack" else [[i] for i in range(len(support))]
    if mode not in ("stack", "average"):
        raise ValueError(f"mode must be 'stack' or 'average', not {mode!r}")
    probs_sum = None
    for group in groups:
        tiles = [support[i] for i in group] + [query]
        stacked = stack_tiles(tiles)
        lab_h, lab_w = support_labels[group[0]].shape
        query_lab = torch.full((lab_h, lab_w), IGNORE, dtype=torch.long, device=support_labels[0].device)
        labels = torch.cat([support_labels[i].long() for i in group] + [query_lab], dim=0)[None]
        ids, table = remap_labels(labels, num_classes, generator, mc.vocab_size, background)
        h, w = stacked.grid_size(mc.hr_ratio)
        hc, wc = h // mc.mask_cell, w // mc.mask_cell
        tile_cells = hc // len(tiles)
        cell_mask = torch.zeros((1, hc, wc), dtype=torch.bool, device=ids.device)
        cell_mask[:, hc - tile_cells:] = True  # the query's label tokens are all masked
        model.eval()
        out = model(stacked, SemanticInput(ids, cell_mask, panels=len(tiles)), geo=False)
        logits = model.semantic_logits(out, out_size=tuple(ids.shape[-2:]))[0]
        q = logits[:, -lab_h:].float().softmax(0)  # the query rows
        cls = q[table]  # (num_classes, H, W)
        cls = cls / cls.sum(0, keepdim=True).clamp(min=1e-12)
        probs_sum = cls if probs_sum is None else probs_sum + cls
    probs = probs_sum / len(groups)
    return probs.argmax(0), probs


__all__ = [
    "IGNORE", "STAGE2_RECIPE", "SemanticConfig", "SemanticPretrainer", "block_mask", "few_shot_segment",
    "remap_labels", "semantic_mask", "stack_tiles", "stage2_param_groups",
]
