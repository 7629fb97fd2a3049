"""The SkySense / SkySense++ model: factorized multi-modal spatio-temporal encoder with geo-context.

    HR (B, T_hr, 3, H r, W r) --SwinV2 per date--> pyramid; last stage (C, h, w)  ---.
    S2 (B, T_s2, 10, h, w)   --ViT per date--> (D_vit, h/4, w/4) --UPHead--> (C, h, w) --+--> [completion of
    S1 (B, T_s1, 2, h, w)    --ViT per date--> (D_vit, h/4, w/4) --UPHead--> (C, h, w) --'    missing modalities]
        -> per location: [extra] + HR dates + S2 dates + S1 dates (+ DTPE by day of year) -> fusion transformer
        -> F_fus^mm (B, D, h, w) --attend to the region's geo prototypes--> concat -> F_fus (B, 2D, h, w)

h x w is the Sentinel pixel grid, which is the HR grid at stride ``hr_ratio``. The submodule names are the
official state_dict prefixes (``backbone_hr``, ``backbone_s2``, ``head_s2``, ``backbone_s1``, ``head_s1``,
``modality_vae``, ``fusion``, ``ctpe``, ``head_rec_hr``; ``glbank`` is the prefix the official freeze list
reserves for the geo-context bank), so released weights load through ``skysense_core.checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from skysense_core.completion import CompletionOutput, ModalityCompletion
from skysense_core.config import ModelConfig
from skysense_core.encoders import SentinelViT, SwinV2Encoder, UPHead
from skysense_core.fusion import FusionTransformer, doy_index
from skysense_core.heads import UPerHead, upsample_logits
from skysense_core.inputs import MODALITIES, ModalityInput, SkySenseInput, normalise
from skysense_core.prototypes import GeoContextPrototypes


@dataclass
class SemanticInput:
    """Label tokens for SkySense++ masked semantic learning and in-context segmentation.

    ids        (B, H, W) int64 label ids 0..vocab-1, at HR resolution (H = h * hr_ratio) or at grid resolution
               (H = h); the other resolution is derived (HR -> grid by the centre pixel of each HR block, as the
               official loader does; grid -> HR by repetition).
    cell_mask  (B, h / mask_cell, w / mask_cell) bool, True = this cell's label tokens are replaced by the mask
               token (the cells to predict).
    panels     the sample is this many equal tiles stacked vertically (few-shot: supports above the query); the
               bounded HR global attention lets the same block of every tile attend together.
    """

    ids: torch.Tensor
    cell_mask: torch.Tensor | None = None
    panels: int = 1


@dataclass
class SkySenseOutput:
    """What a forward pass returns. h x w = the common grid; C = ``cfg.token_dim``; D = ``cfg.fusion_dim``.

    tokens      m -> (B, T_m, C, h, w) per-date features on the grid (zeros for invalid dates)
    keep        m -> (B, T_m, h, w) bool, the date token takes part in the fusion at that location
    summary     m -> (B, C, h, w) mean over kept dates; after completion for the modalities a sample lacks
    hr_pyramid  per Swin stage (B, C_i, H/s_i, W/s_i) of each sample's first valid HR date, or None
    completion  the modality-completion output (for its loss), or None; outside training it covers only the
                samples that lacked a modality (None when none did: the VAEs did not run)
    fused_mm    (B, D, h, w) the extra-token output of the fusion, F_fus^mm
    geo         (B, D, h, w) attention of F_fus^mm to the sample's region prototypes, or None
    """

    tokens: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]
    completed_summary: dict[str, torch.Tensor]
    fused_mm: torch.Tensor
    hr_pyramid: list[torch.Tensor] | None = None
    completion: CompletionOutput | None = None
    geo: torch.Tensor | None = None
    semantic_on_hr: bool = False
    extras: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, torch.Tensor]:
        """m -> (B, C, h, w): ``completed_summary`` where completion ran, else the masked date mean, computed on
        first access (inference never reads it: one pass less over every date token)."""
        for m in self.tokens:
            if m not in self.completed_summary:
                self.completed_summary[m] = _masked_mean(self.tokens[m], self.keep[m])
        return self.completed_summary

    @property
    def fused(self) -> torch.Tensor:
        """F_fus (B, 2D, h, w) = [F_fus^mm, geo-context]; F_fus^mm alone when geo-context is off."""
        return self.fused_mm if self.geo is None else torch.cat([self.fused_mm, self.geo], dim=1)


@dataclass
class Encoded:
    """What :meth:`SkySense.encode` makes (the encoders and the completion), before the date encoding and fusion:
    ``tokens``, ``keep``, ``summary``, ``pyramid``, ``completion`` as in :class:`SkySenseOutput`; ``doys`` m ->
    (B, T_m) or (B, T_m, h, w) day of year of each token (0 for completed tokens); ``semantic``: label tokens
    were fed."""

    tokens: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]
    doys: dict[str, torch.Tensor]
    summary: dict[str, torch.Tensor]
    pyramid: list[torch.Tensor] | None
    completion: CompletionOutput | None
    semantic: bool
    extras: dict

    def crop(self, ys: slice, xs: slice) -> Encoded:
        """The encoders' output over grid rows ``ys`` and columns ``xs`` (views). Everything after the encoders
        (date encoding, fusion, geo-context, per-pixel features) is per location, so fusing a crop gives exactly
        those locations of the whole: inference fuses only the pixels it keeps (a window's part in the tile
        core). The HR pyramid and the completion output are dropped (the dense heads read whole windows)."""
        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[..., ys, xs]

        return Encoded(
            tokens={m: cut(t) for m, t in self.tokens.items()}, keep={m: cut(k) for m, k in self.keep.items()},
            doys={m: d if d.dim() == 2 else cut(d) for m, d in self.doys.items()},
            summary={m: cut(f) for m, f in self.summary.items()}, pyramid=None, completion=None,
            semantic=self.semantic, extras={k: v for k, v in self.extras.items() if k == "present"},
        )


def _masked_mean(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T, C, h, w), (B, T, h, w) -> (B, C, h, w); 0 where nothing is kept."""
    w = keep.unsqueeze(2).to(tokens.dtype)
    return (tokens * w).sum(1) / w.sum(1).clamp(min=1)


class SkySense(nn.Module):
    """SkySense (CVPR'24) with the SkySense++ additions; see the module docstring for the data flow."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.token_dim
        if "hr" in cfg.modalities:
            self.backbone_hr = SwinV2Encoder(cfg)
        for m, bands in (("s2", cfg.s2_bands), ("s1", cfg.s1_bands)):
            if m in cfg.modalities:
                self.add_module(f"backbone_{m}", SentinelViT(cfg, bands))
                self.add_module(f"head_{m}", UPHead(cfg.vit_dim, c, cfg.vit_patch_size))
        self.modality_vae = (
            ModalityCompletion(
                c, modalities=cfg.modalities, conv_dim=cfg.vae_conv_dim, z_dim=cfg.vae_conv_dim,
                codebook_size=cfg.vae_codebook, temperature=cfg.vae_temperature,
            )
            if cfg.modality_completion and len(cfg.modalities) > 1
            else None
        )
        self.ctpe = nn.Parameter(torch.zeros(1, cfg.doy_entries, c))
        nn.init.trunc_normal_(self.ctpe, std=0.02)
        self.fusion = FusionTransformer(
            c, cfg.fusion_dim, cfg.fusion_depth, cfg.fusion_heads, cfg.fusion_mlp_ratio, cfg.fusion_drop_path
        )
        self.glbank = (
            GeoContextPrototypes(
                cfg.fusion_dim, cfg.geo_lat_bands, cfg.geo_lon_bands, cfg.geo_prototypes, cfg.geo_temperature,
                cfg.geo_momentum, cfg.geo_sinkhorn_epsilon, cfg.geo_sinkhorn_iterations,
            )
            if cfg.geo_context
            else None
        )
        # SkySense++ semantic decoders over 65 label ids: on the HR pyramid (official) and, ours, on the grid for
        # tiles without HR imagery (S2/S1-only few-shot maps).
        if "hr" in cfg.modalities:
            dims = list(cfg.hr_dims)
            pyramid = [2 * d if i < cfg.hr_merge_stages - 1 else d for i, d in enumerate(dims)]
            self.head_rec_hr = UPerHead(
                pyramid, cfg.uper_channels, cfg.vocab_size, cfg.uper_pool_scales, ppm_in_channels=cfg.fusion_dim
            )
        self.head_rec_grid = UPerHead(
            [c], cfg.uper_channels, cfg.vocab_size, cfg.uper_pool_scales, ppm_in_channels=cfg.fusion_dim
        )
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    # ----------------------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in every transformer block (Swin stages, ViT blocks, fusion layers)."""
        for name in ("backbone_hr", "backbone_s2", "backbone_s1"):
            if hasattr(self, name):
                getattr(self, name).set_grad_checkpointing(enable)
        self.fusion.grad_checkpointing = enable

    @property
    def device(self) -> torch.device:
        return self.ctpe.device

    # ----------------------------------------------------------------------------------------------------------
    def _encode_dates(self, m: str, x: ModalityInput, grid: tuple[int, int], sem: SemanticInput | None):
        """Encode the valid dates of one modality. Returns tokens (B, T, C, h, w), keep (B, T, h, w) and, for HR,
        the pyramid of every valid date [(N, C_i, H_i, W_i)] with the (b, t) index of each row."""
        b, t = x.valid.shape
        h, w = grid
        idx = x.valid.nonzero(as_tuple=False)  # (N, 2): only valid dates are encoded, so padding costs nothing
        c = self.cfg.token_dim
        tokens = None
        keep = torch.zeros((b, t, h, w), dtype=torch.bool, device=x.data.device)
        pyramid = None
        if len(idx):
            data = normalise(m, x.data[idx[:, 0], idx[:, 1]])
            ids = tmask = None
            if sem is not None:
                ids, tmask = self._semantic_for(m, sem, idx[:, 0], grid)
            if m == "hr":
                pyramid = self.backbone_hr(data, ids, tmask, panels=sem.panels if sem is not None else 1)
                feat = pyramid[-1]
                if feat.shape[1] != c:  # merged stages can only be < all stages, so the last is single width
                    raise RuntimeError("HR last stage has an unexpected width")
            else:
                feat = getattr(self, f"head_{m}")(getattr(self, f"backbone_{m}")(data, ids, tmask))
            if tuple(feat.shape[-2:]) != (h, w):
                raise ValueError(f"{m} lands on a {tuple(feat.shape[-2:])} grid, other modalities on {(h, w)}")
            if len(idx) == b * t:  # every date valid: nonzero() lists (b, t) in row-major order
                tokens = feat.to(self.ctpe.dtype).reshape(b, t, c, h, w)
            else:
                tokens = x.data.new_zeros((b, t, c, h, w), dtype=self.ctpe.dtype)
                tokens = tokens.index_put((idx[:, 0], idx[:, 1]), feat.to(tokens.dtype))
            ok = torch.ones((len(idx), h, w), dtype=torch.bool, device=keep.device)
            if x.mask is not None:
                pix = x.mask[idx[:, 0], idx[:, 1]].float()
                if tuple(pix.shape[-2:]) != (h, w):  # HR mask: a grid cell is usable if half its HR pixels are
                    pix = F.adaptive_avg_pool2d(pix[:, None], (h, w))[:, 0]
                ok = pix >= 0.5
            keep = keep.index_put((idx[:, 0], idx[:, 1]), ok)
        if tokens is None:  # no valid date
            tokens = x.data.new_zeros((b, t, c, h, w), dtype=self.ctpe.dtype)
        return tokens, keep, (pyramid, idx)

    def _semantic_for(self, m: str, sem: SemanticInput, rows: torch.Tensor, grid: tuple[int, int]):
        """Label ids and token mask for the encoder of modality ``m``, one row per encoded date."""
        cfg, (h, w) = self.cfg, grid
        r = cfg.hr_ratio
        ids = sem.ids
        if tuple(ids.shape[-2:]) == (h, w):
            hr_ids, grid_ids = ids.repeat_interleave(r, 1).repeat_interleave(r, 2), ids
        elif tuple(ids.shape[-2:]) == (h * r, w * r):
            off = max(r // 2 - 1, 0)  # the official loader samples the HR label at offset 15 of each 32-px block
            hr_ids, grid_ids = ids, ids[:, off::r, off::r]
        else:
            raise ValueError(f"label ids {tuple(ids.shape[-2:])} match neither the grid {(h, w)} nor HR")
        if m == "hr":
            ids_m, tok_hw = hr_ids, (h * r // cfg.hr_patch_size, w * r // cfg.hr_patch_size)
        else:
            ids_m, tok_hw = grid_ids, (h // cfg.vit_patch_size, w // cfg.vit_patch_size)
        tmask = None
        if sem.cell_mask is not None:
            tmask = F.interpolate(sem.cell_mask[:, None].float(), size=tok_hw, mode="nearest")[:, 0] > 0.5
            tmask = tmask[rows]
        return ids_m[rows], tmask

    # ----------------------------------------------------------------------------------------------------------
    def forward(self, batch: SkySenseInput, semantic: SemanticInput | None = None, geo: bool = True) -> SkySenseOutput:
        """Encode every date of every modality, complete missing modalities, fuse each location's dates (module
        docstring). ``geo``: attend to the geo-context prototypes (needs ``batch.lat`` / ``batch.lon``)."""
        return self.fuse(self.encode(batch, semantic), batch, geo)

    def encode(self, batch: SkySenseInput, semantic: SemanticInput | None = None) -> Encoded:
        """The encoders and the modality completion: everything before the date encoding and the fusion (what a
        fine-tuning that trains only the fusion computes once, ``pipeline.finetune``)."""
        cfg = self.cfg
        unknown = set(batch.modalities) - set(cfg.modalities)
        if unknown:
            raise ValueError(f"the model was built for {cfg.modalities}; the batch has {sorted(unknown)} too")
        grid = batch.grid_size(cfg.hr_ratio)
        bsz = batch.batch_size
        tokens, keep, doys, pyramid = {}, {}, {}, None
        for m in batch.modalities:
            x = getattr(batch, m)
            tokens[m], keep[m], (pyr, idx) = self._encode_dates(m, x, grid, semantic)
            doys[m] = x.doy.clone()
            if m == "hr" and pyr is not None:
                # each sample's first valid HR date feeds the dense heads
                first = {}
                for row, (bi, _) in enumerate(idx.tolist()):
                    first.setdefault(bi, row)
                if len(first) == bsz:
                    sel = torch.tensor([first[i] for i in range(bsz)], device=idx.device)
                    pyramid = [p[sel] for p in pyr]
        present = {m: getattr(batch, m).valid.any(1) for m in tokens}
        extras = {"present": present}
        completion, summary = None, {}
        if self.modality_vae is not None:
            completion, summary = self._complete(tokens, keep, doys, present, bsz, grid, extras)
        return Encoded(tokens, keep, doys, summary, pyramid, completion, semantic is not None, extras)

    def fusion_sequence(self, enc: Encoded, dated: bool = True):
        """Each location's fusion input, in the fusion's layout: tokens (B, h, w, L, C) in :data:`MODALITIES`
        order and keep (B, h, w, L) bool. ``dated``: the day-of-year encoding is added to the dated modalities'
        tokens and the third value is None; otherwise the tokens are returned bare with their day of year
        (B, h, w, L) int64 (0: no date encoding), which :meth:`fuse_sequence` adds: the two agree exactly.
        One strided copy per modality instead of a concatenation and a permutation of the whole stack."""
        cfg, tokens = self.cfg, enc.tokens
        order = [m for m in MODALITIES if m in tokens]
        ref = tokens[order[0]]
        b, _, c, h, w = ref.shape
        n_tok = sum(tokens[m].shape[1] for m in order)
        seq = ref.new_empty((b, h, w, n_tok, c))
        seq_keep = torch.empty((b, h, w, n_tok), dtype=torch.bool, device=ref.device)
        seq_doy = None if dated else torch.zeros((b, h, w, n_tok), dtype=torch.long, device=ref.device)
        off = 0
        for m in order:
            tok, t = tokens[m], tokens[m].shape[1]
            dst = seq[:, :, :, off:off + t]
            dst.copy_(tok.permute(0, 3, 4, 1, 2))
            if m in cfg.doy_modalities:
                d = enc.doys[m]  # (B, T) or per pixel (B, T, h, w)
                if not dated:
                    seq_doy[:, :, :, off:off + t] = d[:, None, None] if d.dim() == 2 else d.permute(0, 2, 3, 1)
                else:
                    pe = self.date_encoding(d)  # (B, T, C) or (B, T, h, w, C)
                    dst += (pe[:, None, None] if pe.dim() == 3 else pe.permute(0, 2, 3, 1, 4)).to(seq.dtype)
            seq_keep[:, :, :, off:off + t] = enc.keep[m].permute(0, 2, 3, 1)
            off += t
        return seq, seq_keep, seq_doy

    def date_encoding(self, doy: torch.Tensor) -> torch.Tensor:
        """The day-of-year encoding of tokens dated ``doy`` (any shape, int64): (*doy.shape, C); zero for day 0
        (completed tokens and padding carry no date)."""
        pe = self.ctpe[0, doy_index(doy, self.cfg.doy_entries)]
        return pe * (doy > 0).unsqueeze(-1).to(pe.dtype)

    def fuse_sequence(self, seq: torch.Tensor, keep: torch.Tensor, doy: torch.Tensor) -> torch.Tensor:
        """F_fus^mm (N, D) of N locations' bare fusion inputs (:meth:`fusion_sequence` with ``dated=False``):
        seq (N, L, C), keep (N, L) bool, doy (N, L) int64."""
        return self.fusion(seq + self.date_encoding(doy).to(seq.dtype), keep)

    def fuse(self, enc: Encoded, batch: SkySenseInput, geo: bool = True) -> SkySenseOutput:
        """The date encoding, the fusion of every location's tokens and the geo-context of :meth:`encode`'s
        output (``batch`` for the tile centres)."""
        seq, seq_keep, _ = self.fusion_sequence(enc)
        b, h, w, n_tok, c = seq.shape
        fused_mm = self.fusion(seq.view(b * h * w, n_tok, c), seq_keep.view(b * h * w, n_tok))
        fused_mm = fused_mm.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        geo_feat = None
        if self.glbank is not None and geo:
            if batch.lat is None or batch.lon is None:
                raise ValueError("geo-context needs the tile centre: set batch.lat / batch.lon, or pass geo=False")
            geo_feat = self.glbank(fused_mm, batch.lat, batch.lon)
        return SkySenseOutput(
            tokens=enc.tokens, keep=enc.keep, completed_summary=enc.summary, fused_mm=fused_mm,
            hr_pyramid=enc.pyramid, completion=enc.completion, geo=geo_feat,
            semantic_on_hr=enc.semantic and enc.pyramid is not None, extras=enc.extras,
        )

    def _complete(self, tokens, keep, doys, present, bsz, grid, extras) -> tuple[CompletionOutput | None, dict]:
        """SkySense++ modality completion on per-modality date means; a modality a sample lacks enters the
        fusion as one completed token (no date) in place of its first date slot. Returns the completion output
        and the per-modality summaries after completion ({} when it did not run); ``extras["summary_in"]`` gets
        the summaries before completion (the completion loss's input).

        In training every sample goes through the VAEs (the completion loss reconstructs the modalities a sample
        has, and DDP needs every parameter used). Otherwise only the samples that lack a modality do, and nothing
        runs when none does (its output would be discarded: present features pass through untouched); the
        returned output then covers those samples only, or is None."""
        cfg = self.cfg
        lacking = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        for m in cfg.modalities:
            lacking |= ~present[m] if m in tokens else True
        h, w = grid
        missing_any = bool(lacking.any())
        if h % 4 or w % 4:
            if missing_any:
                raise ValueError(f"modality completion needs a grid that is a multiple of 4, got {(h, w)}")
            return None, {}
        if not self.training and not missing_any:
            return None, {}
        summary = {m: _masked_mean(tokens[m], keep[m]) for m in tokens}
        extras["summary_in"] = dict(summary)
        rows = None if self.training or bool(lacking.all()) else lacking.nonzero()[:, 0]
        if rows is None:
            out = self.modality_vae(summary, present)
        else:  # the VAEs are per-sample convolutions: a sub-batch gives those samples' full-batch result
            out = self.modality_vae({m: f[rows] for m, f in summary.items()}, {m: p[rows] for m, p in present.items()})
        for m in cfg.modalities:
            done, filled = out.completed[m], out.features[m]  # over the rows that went through the VAEs
            if not bool(done.any()):
                continue
            if m not in tokens:  # every sample lacks it, so rows is None
                tokens[m] = filled.unsqueeze(1)
                keep[m] = done[:, None, None, None].expand(bsz, 1, h, w).clone()
                doys[m] = torch.zeros((bsz, 1), dtype=torch.long, device=filled.device)
                summary[m] = filled
                continue
            if rows is not None:
                done = torch.zeros(bsz, dtype=torch.bool, device=done.device).index_put((rows,), done)
                filled = summary[m].index_put((rows,), filled.to(summary[m].dtype))
            sel = done[:, None, None, None].to(filled.dtype)
            first = tokens[m][:, 0] * (1 - sel) + filled * sel
            tokens[m] = torch.cat([first.unsqueeze(1), tokens[m][:, 1:]], dim=1)
            keep[m] = keep[m].clone()
            keep[m][:, 0] |= done[:, None, None]
            d0 = doys[m][:, 0]
            doys[m][:, 0] = torch.where(done.view(-1, *[1] * (d0.dim() - 1)), torch.zeros_like(d0), d0)
            summary[m] = filled
        return out, summary

    # ----------------------------------------------------------------------------------------------------------
    def semantic_logits(self, out: SkySenseOutput, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Label-id logits (B, vocab, H, W): from the HR pyramid + F_fus^mm when the forward had HR (official
        ``head_rec_hr``, logits at stride ``hr_patch_size`` upsampled bilinearly with align_corners=True), else from
        the grid features + F_fus^mm at grid resolution (``head_rec_grid``, ours)."""
        if out.hr_pyramid is not None and hasattr(self, "head_rec_hr"):
            pyr = out.hr_pyramid
            if not out.semantic_on_hr:  # no label tokens: duplicate the merged stages' halves as the head expects
                pyr = [torch.cat([p, p], 1) if i < self.cfg.hr_merge_stages - 1 else p for i, p in enumerate(pyr)]
            logits = self.head_rec_hr(pyr, out.fused_mm)
            size = out_size or tuple(s * self.cfg.hr_patch_size for s in logits.shape[-2:])
        else:
            grid_feat = torch.stack(list(out.summary.values())).mean(0)
            logits = self.head_rec_grid([grid_feat], out.fused_mm)
            size = out_size or tuple(logits.shape[-2:])
        return upsample_logits(logits, size) if tuple(logits.shape[-2:]) != tuple(size) else logits
