"""Multi-modal temporal fusion: one transformer sequence per grid location over every date of every modality.

Per location the sequence is ``[extra token] + [HR dates] + [S2 dates] + [S1 dates]`` (the official order; no
modality or spatial embedding: modality identity comes from the separate encoders and the sequence position,
as in the official code). Date tokens get the date-specific temporal positional encoding (DTPE) indexed by day
of year before the projection to the fusion width; the output is the extra token (``F_fus^mm``).

Invalid dates and masked pixels are excluded as attention keys, so whatever they hold cannot reach the output.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

CPU_CHUNK_FLOATS = 2**21  # [ours] 8 MiB of float32: the working set of one chunk of sequences on CPU


class FusionTransformer(nn.Module):
    """``forward(tokens (S, L, C), keep (S, L) bool) -> (S, D)`` for S = B*h*w sequences of L date tokens.

    ``porj_linear`` [sic, the official attribute name] projects C -> D; ``cls_token`` is the extra token;
    ``layers`` are pre-norm timm blocks (SDPA attention, LayerNorm eps 1e-5 as mmcv's default ``LN``). No final
    norm: the official encoder returns the extra token's raw output.
    """

    def __init__(
        self, token_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ):
        super().__init__()
        self.porj_linear = nn.Linear(token_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=dpr[i],
                  norm_layer=partial(nn.LayerNorm, eps=1e-5))
            for i in range(depth)
        )
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if tokens.device.type != "cpu":
            return self._forward(*pack_kept(tokens, keep))
        # On CPU the sequences go through in chunks whose largest activation (the MLP hidden layer) stays near
        # 8 MiB, i.e. in cache: 2.1x faster for tiny on 2 cores than one pass over a whole window (ours,
        # measured; on GPU one large batch is what the device wants). Sequences are taken in order of their kept
        # count, so that each chunk is packed (pack_kept) to about its own sequences' length.
        s, hidden = tokens.shape[0], self.layers[0].mlp.fc1.out_features
        counts = keep.sum(1)
        order = torch.argsort(counts, stable=True)
        counts = counts[order].tolist()
        outs, i = [], 0
        while i < s:
            longest = counts[min(i + max(16, CPU_CHUNK_FLOATS // ((counts[i] + 1) * hidden)), s) - 1]
            j = min(i + max(16, CPU_CHUNK_FLOATS // ((longest + 1) * hidden)), s)
            idx = order[i:j]
            outs.append(self._forward(*pack_kept(tokens[idx], keep[idx])))
            i = j
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.index_select(0, torch.argsort(order))

    def _forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(s, -1, -1).to(tokens.dtype), self.porj_linear(tokens)], dim=1)
        keep = torch.cat([keep.new_ones(s, 1), keep], dim=1)  # the extra token always attends to itself
        mask = keep[:, None, None, :]  # (S, 1, 1, L+1) bool, True = may be attended to
        *layers, last = self.layers
        for layer in layers:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask=mask)
        if self.grad_checkpointing and x.requires_grad:
            return checkpoint(extra_token_layer, last, x, mask, use_reentrant=False)
        return extra_token_layer(last, x, mask)


def pack_kept(tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's kept tokens moved to its front (in their order), the sequences cut to the longest kept
    count: (S, L, C), (S, L) -> (S, L', C), (S, L'), L' <= L. The fusion's output does not change: a token that
    is not kept is never a key (the mask), so it reaches no kept token nor the extra token, and attention without
    position embeddings (the date encoding is in the tokens already) does not depend on the keys' order. What
    it saves is every dropped position's projections, attention and MLP: in the demo cube a location keeps
    7-20 of its 31 date tokens (clouds, no-data, padding)."""
    n = int(keep.sum(1).max()) if keep.numel() else 0
    if n == keep.shape[1]:
        return tokens, keep
    pos = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :n]  # kept positions first, in order
    return tokens.gather(1, pos[..., None].expand(-1, -1, tokens.shape[2])), keep.gather(1, pos)


def extra_token_layer(layer: Block, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last fusion layer, computed for the extra token alone: ``layer(x, attn_mask=mask)[:, 0]`` without the
    queries, projections and MLP of the date tokens, whose outputs nothing reads. The same arithmetic as timm's
    ``Block`` / ``Attention`` (checked in the tests), on L+1 keys but one query: (S, L+1, D) -> (S, D)."""
    attn = layer.attn
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention")
    h = layer.norm1(x)
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], w[: attn.attn_dim], None if b is None else b[: attn.attn_dim])
    kv = F.linear(h, w[attn.attn_dim:], None if b is None else b[attn.attn_dim:])
    s, n = h.shape[:2]
    q = attn.q_norm(q.view(s, 1, attn.num_heads, attn.head_dim).transpose(1, 2))
    k, v = kv.view(s, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    k = attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(s, 1, attn.attn_dim))))
    y = x[:, :1] + layer.drop_path1(layer.ls1(o))
    y = y + layer.drop_path2(layer.ls2(layer.mlp(layer.norm2(y))))
    return y[:, 0]


def doy_index(doy: torch.Tensor, entries: int = 366) -> torch.Tensor:
    """Day of year 1..366 -> row of the DTPE table 0..365 (padding 0 -> row 0; padding is masked anyway).

    Day 366 (31 December of a leap year) has its own row; the official table has 365 rows and would overflow.
    """
    return (doy.long() - 1).clamp(0, entries - 1)
