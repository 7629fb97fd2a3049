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
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


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
        s = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(s, -1, -1).to(tokens.dtype), self.porj_linear(tokens)], dim=1)
        keep = torch.cat([keep.new_ones(s, 1), keep], dim=1)  # the extra token always attends to itself
        mask = keep[:, None, None, :]  # (S, 1, 1, L+1) bool, True = may be attended to
        for layer in self.layers:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask=mask)
        return x[:, 0]


def doy_index(doy: torch.Tensor, entries: int = 366) -> torch.Tensor:
    """Day of year 1..366 -> row of the DTPE table 0..365 (padding 0 -> row 0; padding is masked anyway).

    Day 366 (31 December of a leap year) has its own row; the official table has 365 rows and would overflow.
    """
    return (doy.long() - 1).clamp(0, entries - 1)
