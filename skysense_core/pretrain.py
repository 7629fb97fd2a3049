"""SkySense stage-1 pretraining: the self-distillation meta-architecture, kept apart from the backbones
(DINOv2-style). The first open implementation: the official stage-1 code was never released, so every
hyper-parameter below that is not in ``shared/research/skysense.md`` is ours and a ``PretrainConfig`` field.

Per step, for a batch of co-registered multi-modal tiles:

1. ``augment.make_views``: ``n_global`` global and ``n_local`` local views, each a random crop / flip / rotation
   shared by all modalities (so they stay co-registered), with HR colour jitter, blur, solarisation on the second
   global view, per-date jitter of S2/S1 and date disturbance.
2. The student (``SkySense``) encodes every view; the teacher (an EMA of the student, no gradient) the global views.
3. Multi-granularity contrastive learning (MGCL) on four feature sources -- each modality's grid features and the
   fused feature F_fus -- through one DINO head per source (shared by the three granularities, each with its own
   centre). A modality's grid feature is the mean over its kept dates: the paper averages the pixel loss over
   time steps, but date disturbance gives the two views different dates, so we compare the date means.
   * pixel level: the teacher's view-j map is resampled onto the student's view-i grid (``augment.align``); every
     location seen by both views and kept by the modality is a pair;
   * object level: the teacher's aligned pixels are clustered by Sinkhorn-Knopp into ``objects`` soft objects per
     image; the same soft assignment pools the student's pixels, so object k of both views covers the same ground;
   * image level: pooled features, DINO multi-crop (teacher on global views, student on all views, i != j).
4. Cross-modal alignment (CMA): at each location, the student's projected HR, S2 and S1 features of one view form
   positives for every pair of modalities, other locations and tiles are negatives (symmetric InfoNCE).
5. Loss = alpha * L_MGCL + beta * L_align (+ gamma * modality-completion loss, 0 by default in stage 1).
6. After the optimiser step the caller runs ``update_teacher(momentum)``; the geo-context prototypes are updated
   inside ``forward`` from the teacher's F_fus^mm (Sinkhorn assignment + EMA, no gradient). The bank is one
   module shared by student and teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from skysense_core.augment import AugmentConfig, View, align, make_views
from skysense_core.inputs import MODALITIES, SkySenseInput
from skysense_core.losses import DINOHead, DINOLoss, info_nce, sinkhorn_clusters
from skysense_core.model import SkySense

SOURCES = (*MODALITIES, "fused")
GRANULARITIES = ("pixel", "object", "image")


@dataclass(frozen=True)
class PretrainConfig:
    """Stage-1 hyper-parameters. [ours] unless stated: DINO defaults where DINO has one."""

    head_dim: int = 4096  # prototypes of each DINO head (DINO: 65536; smaller for our data scale)
    head_hidden: int = 2048
    head_bottleneck: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    momentum_start: float = 0.996  # teacher EMA, cosine schedule to 1.0 (DINO)
    objects: int = 8  # soft objects per image at the object level
    max_pixels: int = 4096  # pixel pairs per view pair and source (random subset) to bound memory
    align_dim: int = 256
    align_temp: float = 0.2
    alpha: float = 1.0  # weight of L_MGCL (the paper's alpha; value unpublished)
    beta: float = 1.0  # weight of L_align (the paper's beta; value unpublished)
    gamma: float = 0.0  # weight of the modality-completion loss in stage 1
    granularity_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # pixel, object, image
    update_prototypes: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def teacher_momentum(step: int, total_steps: int, start: float = 0.996) -> float:
    """DINO's cosine schedule of the teacher EMA momentum from ``start`` to 1."""
    if total_steps <= 1:
        return start
    return 1 - (1 - start) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


class SkySensePretrainer(nn.Module):
    """Student + EMA teacher + DINO heads + alignment projections. ``forward(batch, generator) -> (loss, logs)``."""

    def __init__(self, student: SkySense, cfg: PretrainConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PretrainConfig()
        self.student = student
        mc = student.cfg
        dims = {m: mc.token_dim for m in MODALITIES} | {
            "fused": mc.fusion_dim * (2 if student.glbank is not None else 1)
        }
        self.sources = [s for s in SOURCES if s == "fused" or s in mc.modalities]
        self.student_heads = nn.ModuleDict(
            {s: DINOHead(dims[s], cfg.head_dim, cfg.head_hidden, cfg.head_bottleneck) for s in self.sources}
        )
        self.align_proj = nn.ModuleDict({m: nn.Linear(mc.token_dim, cfg.align_dim) for m in mc.modalities})
        self.losses = nn.ModuleDict(
            {f"{s}_{g}": DINOLoss(cfg.head_dim, cfg.student_temp, cfg.teacher_temp, cfg.center_momentum)
             for s in self.sources for g in GRANULARITIES}
        )
        bank, student.glbank = student.glbank, None  # deep copies must not duplicate the (large) bank
        self.teacher = copy.deepcopy(student)
        self.teacher_heads = copy.deepcopy(self.student_heads)
        student.glbank = bank
        self.teacher.glbank = bank  # one bank: updated from teacher features, read by both
        for p in [*self.teacher.parameters(), *self.teacher_heads.parameters()]:
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> SkySensePretrainer:
        """The teacher always runs in eval mode: its targets must not be randomised by stochastic depth (DINO)."""
        super().train(mode)
        self.teacher.eval()
        self.teacher_heads.eval()
        return self

    # ----------------------------------------------------------------------------------------------------------
    def _ema_pairs(self):
        s = [p for n, p in self.student.named_parameters() if not n.startswith("glbank.")]
        t = [p for n, p in self.teacher.named_parameters() if not n.startswith("glbank.")]
        return s + list(self.student_heads.parameters()), t + list(self.teacher_heads.parameters())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (exact)."""
        s, t = self._ema_pairs()
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)

    # ----------------------------------------------------------------------------------------------------------
    @staticmethod
    def _source_maps(out, modalities) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """source -> (features (B, C, h, w), kept (B, h, w))."""
        maps = {}
        for m in modalities:
            if m in out.summary:
                maps[m] = (out.summary[m], out.keep[m].any(1))
        fused = out.fused
        maps["fused"] = (fused, torch.ones(fused.shape[0], *fused.shape[-2:], dtype=torch.bool, device=fused.device))
        return maps

    def augment_config(self) -> AugmentConfig:
        """The view recipe with every view side a multiple of the ViT patch and of 4 (the completion VAE pools
        twice by 2). Data loaders that make views on CPU workers use this, then pass ``views=`` to forward."""
        mc, aug = self.student.cfg, self.cfg.augment
        return dataclasses.replace(aug, size_multiple=math.lcm(aug.size_multiple, mc.vit_patch_size, 4))

    def make_views(self, batch: SkySenseInput, generator: torch.Generator) -> list[View]:
        return make_views(batch, self.student.cfg.hr_ratio, self.augment_config(), generator)

    def forward(self, batch: SkySenseInput | None = None, generator: torch.Generator | None = None,
                views: list[View] | None = None):
        """One stage-1 step on ``batch`` (views made here) or on ``views`` made elsewhere (e.g. on Ray Data CPU
        workers with ``make_views``). -> (loss, logs)."""
        cfg = self.cfg
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        if views is None:
            if batch is None:
                raise ValueError("give a batch or precomputed views")
            views = self.make_views(batch, generator)
        globals_ = [i for i, v in enumerate(views) if v.is_global]
        s_out = [self.student(v.input) for v in views]
        with torch.no_grad():
            t_out = {i: self.teacher(views[i].input) for i in globals_}
        s_maps = [self._source_maps(o, self.sources) for o in s_out]
        t_maps = {i: self._source_maps(o, self.sources) for i, o in t_out.items()}

        logs: dict[str, float] = {}
        per_source = []
        teacher_logits: dict[str, list[torch.Tensor]] = {k: [] for k in self.losses}
        wp, wo, wi = cfg.granularity_weights
        for src in self.sources:
            head_s, head_t = self.student_heads[src], self.teacher_heads[src]
            pix, obj, img = [], [], []
            # image level: teacher on global views, student on every view, different views only
            t_img = {}
            for j in globals_:
                if src not in t_maps[j]:
                    continue
                f, k = t_maps[j][src]
                t_img[j] = head_t(_masked_pool(f, k))
                teacher_logits[f"{src}_image"].append(t_img[j])
            for i, sm in enumerate(s_maps):
                if src not in sm:
                    continue
                f_s, k_s = sm[src]
                s_img = head_s(_masked_pool(f_s, k_s))
                for j, tl in t_img.items():
                    if j != i:
                        img.append(self.losses[f"{src}_image"](s_img, tl))
                if i not in globals_:
                    continue
                # pixel and object level: global pairs i != j, teacher j resampled onto student i
                for j in globals_:
                    if j == i or src not in t_maps[j]:
                        continue
                    f_t, k_t = t_maps[j][src]
                    hw = tuple(f_s.shape[-2:])
                    t_al, inside = align(f_t, views[j].theta, views[i].theta, hw)
                    k_al, _ = align(k_t[:, None].float(), views[j].theta, views[i].theta, hw)
                    ok = inside & (k_al[:, 0] > 0.5) & k_s
                    ps, pt, os_, ot = self._pairs(f_s, t_al, ok, generator)
                    if ps is not None:
                        ls, lt = head_s(ps), head_t(pt)
                        pix.append(self.losses[f"{src}_pixel"](ls, lt))
                        teacher_logits[f"{src}_pixel"].append(lt)
                    if os_ is not None:
                        ls, lt = head_s(os_), head_t(ot)
                        obj.append(self.losses[f"{src}_object"](ls, lt))
                        teacher_logits[f"{src}_object"].append(lt)
            parts = []
            for name, terms, w in (("pixel", pix, wp), ("object", obj, wo), ("image", img, wi)):
                if terms:
                    v = torch.stack(terms).mean()
                    logs[f"loss/{src}_{name}"] = float(v.detach())
                    parts.append(w * v)
            if parts:
                per_source.append(sum(parts))
        zero = s_out[0].fused_mm.sum() * 0.0
        l_mgcl = torch.stack(per_source).mean() if per_source else zero
        l_align = self._alignment(s_out, generator) if cfg.beta else zero
        loss = cfg.alpha * l_mgcl + cfg.beta * l_align
        if cfg.gamma and self.student.modality_vae is not None:
            l_vae = torch.stack([self.student.modality_vae.loss(o.completion, o.extras["summary_in"],
                                                                o.extras["present"])
                                 for o in s_out if o.completion is not None] or [zero]).mean()
            loss = loss + cfg.gamma * l_vae
            logs["loss/completion"] = float(l_vae.detach())
        logs.update({"loss/mgcl": float(l_mgcl.detach()), "loss/align": float(l_align.detach()),
                     "loss": float(loss.detach())})

        if self.training:
            for k, tl in teacher_logits.items():
                if tl:
                    self.losses[k].update_center(torch.cat(tl))
            bank = self.student.glbank
            if cfg.update_prototypes and bank is not None:
                for i in globals_:
                    v = views[i].input
                    stats = bank.update(t_out[i].fused_mm.detach(), v.lat, v.lon)
                    logs["prototypes/regions_updated"] = float(stats.get("regions", 0)) if stats else 0.0
        return loss, logs

    # ----------------------------------------------------------------------------------------------------------
    def _pairs(self, f_s, f_t, ok, generator):
        """Row-aligned (student, teacher) pixel features and object features from the locations ``ok``."""
        cfg = self.cfg
        b, c = f_s.shape[:2]
        fs = f_s.permute(0, 2, 3, 1)
        ft = f_t.permute(0, 2, 3, 1)
        ps_all, pt_all, os_all, ot_all = [], [], [], []
        for bi in range(b):
            m = ok[bi]
            n = int(m.sum())
            if n == 0:
                continue
            s_pix, t_pix = fs[bi][m], ft[bi][m]
            if n >= 2 and cfg.objects > 1:
                q = sinkhorn_clusters(t_pix, cfg.objects, generator)  # (n, k), no gradient
                w = q / q.sum(0, keepdim=True).clamp(min=1e-6)
                os_all.append(w.t().to(s_pix.dtype) @ s_pix)
                ot_all.append(w.t().to(t_pix.dtype) @ t_pix)
            ps_all.append(s_pix)
            pt_all.append(t_pix)
        if not ps_all:
            return None, None, None, None
        ps, pt = torch.cat(ps_all), torch.cat(pt_all)
        if ps.shape[0] > cfg.max_pixels:
            sel = torch.randperm(ps.shape[0], generator=generator)[: cfg.max_pixels].to(ps.device)
            ps, pt = ps[sel], pt[sel]
        os_ = torch.cat(os_all) if os_all else None
        ot = torch.cat(ot_all) if ot_all else None
        return ps, pt, os_, ot

    def _alignment(self, outs, generator) -> torch.Tensor:
        """Cross-modal alignment on the global student views: InfoNCE between every pair of modalities at the
        locations where both have a kept date, at most ``max_pixels`` locations per pair and view."""
        terms = []
        mods = [m for m in MODALITIES if m in self.align_proj]
        for o in outs:
            for a_i, a in enumerate(mods):
                for b in mods[a_i + 1:]:
                    if a not in o.summary or b not in o.summary:
                        continue
                    both = o.keep[a].any(1) & o.keep[b].any(1)  # (B, h, w)
                    fa = o.summary[a].permute(0, 2, 3, 1)[both]
                    fb = o.summary[b].permute(0, 2, 3, 1)[both]
                    if fa.shape[0] > self.cfg.max_pixels:
                        sel = torch.randperm(fa.shape[0], generator=generator)[: self.cfg.max_pixels].to(fa.device)
                        fa, fb = fa[sel], fb[sel]
                    if fa.shape[0] >= 2:
                        terms.append(info_nce(self.align_proj[a](fa), self.align_proj[b](fb), self.cfg.align_temp))
        if not terms:
            return outs[0].fused_mm.sum() * 0.0
        return torch.stack(terms).mean()


def _masked_pool(f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w), (B, h, w) -> (B, C) mean over kept locations."""
    w = keep[:, None].to(f.dtype)
    return (f * w).sum((2, 3)) / w.sum((2, 3)).clamp(min=1)


__all__ = ["PretrainConfig", "SkySensePretrainer", "teacher_momentum"]
