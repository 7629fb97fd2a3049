"""Loss building blocks for SkySense stage 1 (self-distillation, MGCL, cross-modal alignment) and SkySense++
stage 2 (class-balanced label-id cross-entropy).

Stage-1 hyper-parameters were never published (``shared/research/skysense.md`` section 3.1): the defaults here
are DINO's (head 3 layers, hidden 2048, bottleneck 256, student temperature 0.1, teacher 0.04, centre momentum
0.9) and are marked as ours.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from skysense_core.prototypes import sinkhorn_knopp


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised linear to ``out_dim``
    prototype logits. ``(N, in_dim) -> (N, out_dim)``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher distribution and the student's, with the centre an
    EMA of the teacher's mean logits (all-reduced across ranks under DDP).

    ``forward(student (N, K), teacher (N, K)) -> scalar`` for row-aligned pairs (pixels, objects or images of
    two views). Call ``update_center(teacher)`` once per step with every teacher logit of that step.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher: torch.Tensor) -> torch.Tensor:
        return F.softmax((teacher.float() - self.center) / self.teacher_temp, dim=-1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape[0] == 0:
            return student.sum() * 0.0
        t = self.teacher_probs(teacher).detach()
        return -(t * F.log_softmax(student.float() / self.student_temp, dim=-1)).sum(-1).mean()

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        if teacher.shape[0] == 0:
            return
        total = teacher.float().sum(0, keepdim=True)
        count = torch.tensor([teacher.shape[0]], dtype=torch.float32, device=teacher.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned embeddings ``a``, ``b`` (N, d): row i of a and of b are the same
    place seen by two modalities (positives); every other row is a negative."""
    if a.shape[0] < 2:
        return a.sum() * 0.0
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@torch.no_grad()
def sinkhorn_clusters(
    features: torch.Tensor, k: int, generator: torch.Generator | None = None, iterations: int = 3,
    epsilon: float = 0.05,
) -> torch.Tensor:
    """Soft clustering of one image's pixel features into ``k`` equal-sized "objects" (MGCL object level).

    Centroids start at k random pixels and are refined ``iterations`` times by a Sinkhorn-Knopp balanced
    assignment (equipartition stops one cluster from swallowing the image) and a weighted mean.
    features (n, d) -> assignment (n, k), rows sum to 1.
    """
    n = features.shape[0]
    f = F.normalize(features.float(), dim=-1)
    k = min(k, n)
    idx = torch.randperm(n, generator=generator, device="cpu")[:k].to(features.device)
    centroids = f[idx]
    q = None
    for _ in range(iterations):
        q = sinkhorn_knopp(f @ centroids.t(), epsilon=epsilon)
        centroids = F.normalize(q.t() @ f, dim=-1)
    return q


def class_balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """SkySense++ ``RecLoss``: 0.5 x mean CE over pixels with id > 0 + 0.5 x mean CE over pixels with id 0 (the
    background / unlabelled id), so that a mostly-background episode does not drown the classes.
    logits (B, K, H, W), target (B, H, W) int64. A group with no pixel gives its weight to the other."""
    ce = F.cross_entropy(logits.float(), target, reduction="none", ignore_index=ignore_index)
    valid = target != ignore_index
    fg, bg = valid & (target > 0), valid & (target == 0)
    parts = [ce[m].mean() for m in (fg, bg) if bool(m.any())]
    if not parts:
        return logits.sum() * 0.0
    return sum(parts) / len(parts)


def inverse_sqrt_frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """Loss weight per class from its pixel counts (K,): inverse square-root frequency [ours], scaled so that the
    average pixel weighs 1; 0 for a class without pixels. Full inverse frequency over-predicts the rare classes
    (water, bare, built-up are 0.6-5 % of the demo's pixels); the square root balances without that."""
    counts = counts.double()
    freq = counts / counts.sum().clamp(min=1)
    w = torch.where(counts > 0, freq.clamp(min=1e-12).rsqrt(), torch.zeros_like(freq))
    return (w / (freq * w).sum().clamp(min=1e-12)).float()
