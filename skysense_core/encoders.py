"""Spatial encoders: SwinV2 for high-resolution RGB, a ViT per date for Sentinel-2 and Sentinel-1, and the
projection (``UPHead``) that brings the ViT output onto the common grid.

Both encoders are timm's, configured to the SkySense numbers, plus the SkySense++ "MSL" additions for masked
semantic learning (a 65-entry label vocabulary, a mask token and joint encoding of image and label tokens side by
side in the first layers).

Why timm's ``swin_transformer_v2`` and not ``swin_transformer_v2_cr``: the official HR backbone is mmcls' SwinV2,
whose continuous position-bias MLP (hidden 512, coordinates normalised to +-8 and log2-spaced, bias 16*sigmoid)
and separate q/v biases are exactly timm's ``swin_transformer_v2``. The ``_cr`` variant has the extra-norm period
but a different bias MLP (hidden 384, natural-log coordinates, no sigmoid), so released weights would not
reproduce there. The one thing the official model has that ``swin_transformer_v2`` lacks, the LayerNorm after
every 6th block (``norm3``), is added below.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block, WindowAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from skysense_core.config import ModelConfig


# --------------------------------------------------------------------------------------------------------------
# SwinV2 pieces
# --------------------------------------------------------------------------------------------------------------
class _SdpaWindowAttention(WindowAttention):
    """timm's SwinV2 window attention computed by ``F.scaled_dot_product_attention``.

    Cosine attention becomes SDPA with unit scale on L2-normalised queries pre-multiplied by the learned logit
    scale; the continuous position bias (and the shifted-window mask) is the additive ``attn_mask``. Same
    parameters and the same result as timm's explicit softmax, but fused kernels on GPU.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        q = F.normalize(q, dim=-1) * logit_scale.to(q.dtype)
        k = F.normalize(k, dim=-1)
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        pos = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn_bias = (16 * torch.sigmoid(pos)).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:  # (nW, N, N): 0 or -100 for tokens from different sub-windows after the shift
            nw = mask.shape[0]
            attn_bias = (attn_bias + mask.unsqueeze(1)).unsqueeze(0).expand(b_ // nw, -1, -1, -1, -1)
            attn_bias = attn_bias.reshape(b_, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.0, scale=1.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b_, n, c)))


class _SwinV2BlockExtraNorm(SwinTransformerV2Block):
    """A SwinV2 block followed by the LayerNorm ``norm3`` (mmcls ``extra_norm_every_n_blocks``; Swin-H: every 6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm3(super().forward(x))


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention with torch ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), the names the official checkpoints use after ``Wqkv -> in_proj``, computed
    by SDPA. ``forward(x (B, N, C), key_keep (B, N) bool True = may be attended to, or None) -> (B, N, C)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).permute(
            2, 0, 3, 1, 4
        )
        mask = None if key_keep is None else key_keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """(B, H, W, C) -> (B * nH * nW, block * block, C) square blocks of a lattice anchored at (0, 0), the input
    zero-padded to whole blocks; with the key mask (same rows, block * block) bool that excludes the padding, or
    None when there is none; and (nH, nW)."""
    b, h, w, c = x.shape
    nh, nw = -(-h // block), -(-w // block)
    ph, pw = nh * block - h, nw * block - w
    keep = None
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        keep = torch.zeros((nh * block, nw * block), dtype=torch.bool, device=x.device)
        keep[:h, :w] = True
        keep = keep.view(nh, block, nw, block).permute(0, 2, 1, 3).reshape(1, nh * nw, block * block)
        keep = keep.expand(b, -1, -1).reshape(b * nh * nw, block * block)
    x = x.view(b, nh, block, nw, block, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, block * block, c)
    return x, keep, (nh, nw)


def _unblocks(x: torch.Tensor, b: int, h: int, w: int, n: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`_blocks`: (B * nH * nW, block * block, C) -> (B, H, W, C), the padding cut off."""
    nh, nw = n
    block = math.isqrt(x.shape[1])
    c = x.shape[-1]
    x = x.view(b, nh, nw, block, block, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * block, nw * block, c)
    return x[:, :h, :w]


class ProjectedGlobalAttention(nn.Module):
    """SkySense++ global attention after a Swin stage: ``proj_out(z + MHA(z))`` with ``z = proj_in(x)``.

    The inner identity is the one mmcv's MultiheadAttention wrapper adds; a port that dropped it lost the
    model (1-shot mIoU 0.55 -> 0.009). The stage then adds the block's output to its input. ``proj_in`` /
    ``proj_out`` / ``attn`` are the official names.

    ``forward(x (B, H, W, dim), block, panels=(1, 1)) -> (B, H, W, dim)``. The official model attends over every
    token of the stage, which makes the cost per pixel grow linearly with the input side and every output depend
    on the whole input. With ``block`` > 0 (tokens) attention stays inside ``block x block`` squares of a lattice
    anchored at the origin (the last row and column of blocks are cut short by the edge, their padding masked out
    of the keys), so the cost per pixel is fixed and the receptive field local.

    ``panels`` (rows, cols): the input is that many equal images side by side, whose tokens must meet: few-shot
    stacks support tiles above the query, masked semantic learning puts label tokens beside the image tokens. The
    lattice is then anchored at each panel's origin and the same block of every panel attends as one group
    (cost per pixel: panels x block^2 keys). An input whose panels fit in one block takes exactly the unbounded
    path, so the official weights give the official result there.
    """

    def __init__(self, dim: int, inner_dim: int, heads: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, inner_dim)
        self.attn = MultiheadSelfAttention(inner_dim, heads)
        self.proj_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor, block: int = 0, panels: tuple[int, int] = (1, 1)) -> torch.Tensor:
        b, h, w, _ = x.shape
        pv, ph = panels
        if h % pv or w % ph:
            raise ValueError(f"a {h} x {w} token grid does not split into {pv} x {ph} equal panels")
        hp, wp = h // pv, w // ph
        z = self.proj_in(x)
        if block <= 0 or (hp <= block and wp <= block):
            return self.proj_out(z + self.attn(z.reshape(b, h * w, -1)).view(b, h, w, -1))
        c = z.shape[-1]
        # (B, H, W, C) -> one image per panel (B * pv * ph, hp, wp, C) -> blocks, grouped over the panels
        per_panel = z.view(b, pv, hp, ph, wp, c).permute(0, 1, 3, 2, 4, 5).reshape(b * pv * ph, hp, wp, c)
        blocks, keep, n = _blocks(per_panel, block)
        nb, length, p = n[0] * n[1], blocks.shape[1], pv * ph
        groups = blocks.view(b, p, nb, length, c).transpose(1, 2).reshape(b * nb, p * length, c)
        if keep is not None:
            keep = keep.view(b, p, nb, length).transpose(1, 2).reshape(b * nb, p * length)
        out = self.attn(groups, keep).view(b, nb, p, length, c).transpose(1, 2).reshape(b * p * nb, length, c)
        out = _unblocks(out, b * p, hp, wp, n).view(b, pv, ph, hp, wp, c).permute(0, 1, 3, 2, 4, 5)
        return self.proj_out(z + out.reshape(b, h, w, c))


def label_tokens(
    label_ids: torch.Tensor, vocabulary: torch.Tensor, weight: torch.Tensor, patch: int
) -> torch.Tensor:
    """Semantic tokens from a label-id map, one per image token (SkySense++ MSL).

    Every pixel looks up its id's vocabulary vector; the ``patch x patch`` pixels of a token are averaged with a
    learned intra-patch weighting (softmax over the patch's positions, times their number, so that uniform
    weights give the plain mean).

    label_ids (B, H, W) int64 in [0, vocab); vocabulary (vocab, C); weight (1, patch*patch)
    -> (B, H/patch, W/patch, C)
    """
    b, h, w = label_ids.shape
    emb = vocabulary[label_ids]  # (B, H, W, C)
    emb = emb.view(b, h // patch, patch, w // patch, patch, -1).permute(0, 1, 3, 2, 4, 5)
    emb = emb.reshape(b, h // patch, w // patch, patch * patch, -1)
    wts = weight.softmax(-1).to(emb.dtype).view(1, 1, 1, -1, 1) * (patch * patch)
    return (emb * wts).mean(dim=3)


def _split_halves(x: torch.Tensor, how: str) -> torch.Tensor:
    """(B, H, 2W, C) side-by-side image|label tokens -> their mean (B, H, W, C) or channel concat (B, H, W, 2C)."""
    w = x.shape[2] // 2
    left, right = x[:, :, :w], x[:, :, w:]
    return (left + right) / 2 if how == "mean" else torch.cat([left, right], dim=-1)


class SwinV2Encoder(SwinTransformerV2):
    """The HR encoder: timm SwinV2 with mmcls' extra norms, per-stage output norms and the SkySense++ additions.

    ``forward(x (B, 3, H, W), label_ids=None, token_mask=None) -> list of (B, C_i, H/s_i, W/s_i)`` with
    ``C_i = embed * 2**i`` and ``s_i = patch * 2**i``; the last stride equals ``hr_ratio``. With ``label_ids``
    (B, H, W) the first ``hr_merge_stages`` stages see image and label tokens side by side (``token_mask``
    (B, H/patch, W/patch) bool replaces masked label tokens by ``mask_token``); outputs of the merged stages but
    the last are the two halves concatenated on channels (2 C_i), as the official decoder expects. ``panels``: the
    input is that many equal tiles stacked vertically (few-shot), whose global attention blocks attend together
    (:class:`ProjectedGlobalAttention`).
    """

    def __init__(self, cfg: ModelConfig):
        n = len(cfg.hr_depths)
        # Built for an input whose last stage is two windows wide: timm fixes each block's window and shift at
        # build time from the build size (a stage no larger than one window gets no shift), and mmcls shifts
        # every odd block of every stage at the official 512 / 1024 px inputs. Other sizes are dynamic (masks
        # are rebuilt per input).
        build = cfg.hr_patch_size * cfg.hr_window * 2 ** (n - 1) * 2
        super().__init__(
            img_size=build, patch_size=cfg.hr_patch_size, in_chans=cfg.hr_in_chans, num_classes=0,
            embed_dim=cfg.hr_embed_dim, depths=cfg.hr_depths, num_heads=cfg.hr_heads, window_size=cfg.hr_window,
            strict_img_size=False, drop_path_rate=cfg.hr_drop_path, pretrained_window_sizes=(0,) * n,
        )
        del self.head, self.norm  # no classifier, and per-stage output norms replace the final norm
        self.cfg = cfg
        dims = cfg.hr_dims
        for stage in self.layers:
            for i, blk in enumerate(stage.blocks):
                blk.attn.__class__ = _SdpaWindowAttention
                if cfg.hr_extra_norm_every and (i + 1) % cfg.hr_extra_norm_every == 0:
                    blk.__class__ = _SwinV2BlockExtraNorm
                    blk.norm3 = nn.LayerNorm(blk.norm1.normalized_shape)
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(d))
        self.global_attn = bool(cfg.hr_global_attn_dims)
        for i, inner in enumerate(cfg.hr_global_attn_dims):
            self.add_module(f"attn{i + 1}", ProjectedGlobalAttention(dims[i], inner, cfg.hr_global_attn_heads))
        if self.global_attn:
            self.norm_attn = nn.LayerNorm(dims[n - 2])
        p = cfg.hr_patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        self.vocabulary_token = nn.Parameter(torch.zeros(cfg.vocab_size, dims[0]))
        self.vocabulary_weight = nn.Parameter(torch.zeros(1, p * p))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.vocabulary_token, std=0.02)

    def global_attn_block(self, stage: int) -> int:
        """Side of the global attention's blocks after ``stage``, in that stage's tokens (0 = unbounded):
        ``hr_global_attn_block`` Sentinel px, each ``2**(stages - 1 - stage)`` tokens wide there."""
        block = self.cfg.hr_global_attn_block
        return block * 2 ** (len(self.layers) - 1 - stage) if block > 0 else 0

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward(
        self, x: torch.Tensor, label_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
        panels: int = 1,
    ) -> list[torch.Tensor]:
        p = self.cfg.hr_patch_size
        if x.shape[-2] % self.cfg.hr_ratio or x.shape[-1] % self.cfg.hr_ratio:
            raise ValueError(f"HR input {tuple(x.shape[-2:])} must be a multiple of hr_ratio {self.cfg.hr_ratio}")
        x = self.patch_embed(x)  # (B, H/p, W/p, C0)
        merge = 0
        if label_ids is not None:
            sem = label_tokens(label_ids, self.vocabulary_token, self.vocabulary_weight, p)
            if token_mask is not None:
                sem = torch.where(token_mask[..., None], self.mask_token.to(sem.dtype), sem)
            merge = self.cfg.hr_merge_stages
            x = torch.cat([x, sem.to(x.dtype)], dim=2) if merge else (x + sem) / 2
        outs = []
        last = len(self.layers) - 1
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if merge and i == merge - 1:  # official order: average the halves, then the global attention
                x = _split_halves(x, "mean")
            if self.global_attn and i < last:
                side_by_side = 2 if merge and i < merge - 1 else 1  # image | label tokens, not yet averaged
                x = x + getattr(self, f"attn{i + 1}")(x, self.global_attn_block(i), (panels, side_by_side))
                if i == last - 1:
                    x = self.norm_attn(x)
            out = _split_halves(x, "cat") if merge and i < merge - 1 else x
            norm = getattr(self, f"norm{i}")
            if out.shape[-1] != norm.normalized_shape[0]:  # channel-concatenated halves: normalise each half
                out = torch.cat([norm(half) for half in out.chunk(2, dim=-1)], dim=-1)
            else:
                out = norm(out)
            outs.append(out.permute(0, 3, 1, 2).contiguous())
        return outs


# --------------------------------------------------------------------------------------------------------------
# ViT for Sentinel-2 / Sentinel-1
# --------------------------------------------------------------------------------------------------------------
class SentinelViT(VisionTransformer):
    """ViT applied to every date of one Sentinel modality: patch ``vit_patch_size`` (4), no class token, no final
    norm, learned positions on a ``vit_pos_grid`` square resized bicubically to the input (as the official
    ``img_size`` 16 / patch 4), pre-norm blocks with LayerNorm eps 1e-6 and SDPA attention (timm ``Block``).

    ``forward(x (N, C, H, W), label_ids=None (N, H, W), token_mask=None (N, H/4, W/4)) -> (N, D, H/4, W/4)``,
    N = batch x dates. With labels, the first ``vit_merge_layers`` blocks see image and label tokens side by side
    on an (h, 2w) grid whose positions are the learned table resized to (h, 2w), as the official MSL ViT does;
    then the two halves are averaged.
    """

    def __init__(self, cfg: ModelConfig, in_chans: int):
        p = cfg.vit_patch_size
        super().__init__(
            img_size=cfg.vit_pos_grid * p, patch_size=p, in_chans=in_chans, num_classes=0, global_pool="",
            embed_dim=cfg.vit_dim, depth=cfg.vit_depth, num_heads=cfg.vit_heads, mlp_ratio=cfg.vit_mlp_ratio,
            qkv_bias=True, class_token=False, final_norm=False, dynamic_img_size=True,
            drop_path_rate=cfg.vit_drop_path, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        del self.head
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.vit_dim))
        self.vocabulary_token = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.vit_dim))
        self.vocabulary_weight = nn.Parameter(torch.zeros(1, p * p))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.vocabulary_token, std=0.02)

    def _run(self, x: torch.Tensor, blocks) -> torch.Tensor:
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and x.requires_grad else blk(x)
        return x

    def forward(
        self, x: torch.Tensor, label_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        p = self.cfg.vit_patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"Sentinel input {tuple(x.shape[-2:])} must be a multiple of the patch size {p}")
        tok = self.patch_embed(x)  # (N, h, w, D): dynamic_img_size keeps the grid
        n, h, w, d = tok.shape
        merge = 0
        if label_ids is None:
            x = self.norm_pre(tok.reshape(n, h * w, d) + self._pos_embed(tok.new_zeros(1, h, w, d)))
        else:
            merge = self.cfg.vit_merge_layers
            sem = label_tokens(label_ids, self.vocabulary_token, self.vocabulary_weight, p).to(tok.dtype)
            if token_mask is not None:
                sem = torch.where(token_mask[..., None], self.mask_token.to(sem.dtype), sem)
            if merge:
                # official: image | label tokens side by side, positions resized bicubically to (h, 2w)
                joint = torch.cat([tok, sem], dim=2)
                joint = self.norm_pre(joint.reshape(n, -1, d) + self._pos_embed(tok.new_zeros(1, h, 2 * w, d)))
                joint = self._run(joint, self.blocks[:merge])
                x = _split_halves(joint.view(n, h, 2 * w, d), "mean").reshape(n, h * w, d)
            else:  # merge 0: the two token kinds are averaged at the input
                x = self.norm_pre(((tok + sem) / 2).reshape(n, h * w, d) + self._pos_embed(tok.new_zeros(1, h, w, d)))
        out = self._run(x, self.blocks[merge:])
        return out.transpose(1, 2).reshape(n, d, h, w)


class UPHead(nn.Module):
    """Projection of a ViT map onto the common grid: 1x1 conv ``D -> C * p**2`` then ``PixelShuffle(p)``
    (official ``head_s2`` / ``head_s1``; huge: 1024 -> 45,056 channels, ~46 M parameters).

    ``(N, D, h, w) -> (N, C, h*p, w*p)`` where h*p x w*p is the Sentinel pixel grid = the HR stride-``hr_ratio`` grid.
    """

    def __init__(self, in_dim: int, out_dim: int, scale: int):
        super().__init__()
        self.decoder = nn.Sequential(nn.Conv2d(in_dim, out_dim * scale * scale, 1), nn.PixelShuffle(scale))
        self.out_dim, self.scale = out_dim, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The conv and the shuffle as one matmul on channels-last pixels and one permutation (the same numbers as
        ``self.decoder(x)``, half the time on CPU). The result is (N, C, h*p, w*p) in channels-last memory: the
        fusion reads every location's C values together, so the per-location sequences are built from it by
        contiguous copies."""
        conv, p, c = self.decoder[0], self.scale, self.out_dim
        n, _, h, w = x.shape
        y = F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias)  # (N, h, w, C * p * p)
        y = y.view(n, h, w, c, p, p).permute(0, 1, 4, 2, 5, 3).reshape(n, h * p, w * p, c)
        return y.permute(0, 3, 1, 2)
