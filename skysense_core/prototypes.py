"""Geo-context prototypes (SkySense GCPL): a bank of prototypes per geographic region, read by attention and
written by a Sinkhorn-Knopp assignment followed by an EMA.

Nothing of this was released (``shared/research/skysense.md`` section 2). From the paper (second-hand): a bank
P of shape (N_R = 4096 regions, N_p = 100 prototypes, d), the region chosen by the sample's location, fused
features attend to the region's prototypes, and the bank is updated by a Sinkhorn-Knopp optimal assignment of
features to prototypes (cosine similarity), new values = assignment^T . features, then an EMA. Everything else
is ours: the region grid (equal-area latitude bands x longitude sectors), the temperature, the momentum, the
number of Sinkhorn iterations.

Layout
    ``region_index``          degrees -> region id
    ``sinkhorn_knopp``        SwAV-style equipartition of N features over K prototypes
    ``GeoContextPrototypes``  the bank (a buffer: never trained by gradient), ``forward`` reads, ``update`` writes
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["GeoContextPrototypes", "region_index", "sinkhorn_knopp"]

# Default Sinkhorn iterations (ours). SwAV uses 3, which is enough when scores / epsilon spread little (cosines of
# random 1024-d vectors: columns within 1e-3 after one iteration) but not for cosines of random vectors in 32
# dimensions (~12 % column error after 3). Iterations needed for the columns to hold to 1e-2 relative, epsilon
# 0.05, cosines of random unit vectors, K in {32, 100}, worst of 40 seeds: N >= 2K: 26 (d=16), 17 (d=32),
# 11 (d=64), 6 (d=128); N >= 5K: 17 (d=16), 10 (d=32), 7 (d=64). 20 covers d >= 32 with N >= 2K and d >= 16 with
# N >= 5K. An iteration is two sums and two divisions over an (N, K) matrix: negligible next to the network.
DEFAULT_SINKHORN_ITERATIONS = 20


def _distributed(flag: bool) -> bool:
    """Whether to reduce across ranks: asked for, and a process group of more than one rank exists."""
    return bool(flag) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ------------------------------------------------------------------------------------------------------------
# regions
# ------------------------------------------------------------------------------------------------------------


def region_index(
    lat: torch.Tensor, lon: torch.Tensor, lat_bands: int = 64, lon_bands: int = 64
) -> torch.Tensor:
    """Region id of each location on an equal-area grid of ``lat_bands`` x ``lon_bands`` cells.

    Scheme (ours; the paper gives 4096 regions and no mapping):

    - latitude band ``i = floor((sin(lat) + 1) / 2 * lat_bands)``, clamped to ``[0, lat_bands - 1]``. The area
      of the sphere between two latitudes is proportional to the difference of their sines, so bands of equal
      width in ``sin(lat)`` have equal area (an equal-angle grid would make polar cells ~40x smaller than
      equatorial ones at 64 bands). The north pole (lat = 90, sin = 1) falls into the last band, the south pole
      (lat = -90) into band 0.
    - longitude sector ``j = floor(((lon + 180) mod 360) / 360 * lon_bands)``: lon = -180 and lon = 180 are the
      same meridian and get the same sector (0), and longitudes outside [-180, 180] wrap around.
    - id ``= i * lon_bands + j`` in ``[0, lat_bands * lon_bands)``. Every cell has area 4 pi R^2 / (lat_bands *
      lon_bands) (about 124,500 km^2 at 64 x 64).

    lat, lon: tensors (any broadcastable shapes) or array-likes, degrees (WGS84 geodetic, treated as spherical).
    Returns an int64 tensor of the broadcast shape on ``lat``'s device.
    Raises ``ValueError`` for non-finite input or ``|lat| > 90``.
    """
    if lat_bands < 1 or lon_bands < 1:
        raise ValueError(f"lat_bands and lon_bands must be positive, got {lat_bands}, {lon_bands}")
    lat = torch.as_tensor(lat)
    lon = torch.as_tensor(lon, device=lat.device)
    # float64: a float32 sin() moves locations within ~1e-7 of a band edge to the neighbouring band; in float64
    # the result is the mathematically intended band for any float32 input not within ~1e-15 of an edge.
    lat64, lon64 = lat.to(torch.float64), lon.to(torch.float64)
    if not bool(torch.isfinite(lat64).all() & torch.isfinite(lon64).all()):
        raise ValueError("region_index: latitude and longitude must be finite")
    if bool((lat64.abs() > 90).any()):
        raise ValueError(f"region_index: latitude outside [-90, 90] degrees (max |lat| = {lat64.abs().max():.6g})")
    band = torch.floor((torch.sin(torch.deg2rad(lat64)) + 1) / 2 * lat_bands).long()
    # sin(90) = 1 exactly would give band == lat_bands: the pole belongs to the last band
    band = band.clamp_(0, lat_bands - 1)
    # remainder() has the divisor's sign, so the result lies in [0, 360]; it can round up to 360 for a longitude a
    # hair below -180, which the clamp puts into the last sector where it belongs
    sector = torch.floor(torch.remainder(lon64 + 180.0, 360.0) / 360.0 * lon_bands).long()
    sector = sector.clamp_(0, lon_bands - 1)
    return band * lon_bands + sector


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ------------------------------------------------------------------------------------------------------------


# Largest spread (max - min) of scores / epsilon within one problem for which the plain exp-domain iteration is
# safe in float32: exp(-80) = 1.8e-35 is still a normal float, so after subtracting the max no row or column of
# exp() underflows to all zeros, and from then on every normalisation leaves sums in [1/K, N] (see _sinkhorn).
# Cosine scores span at most 2, i.e. 40 at epsilon 0.05: the log domain is only for exotic inputs (scores * 1000).
_EXP_DOMAIN_MAX_SPREAD = 80.0


def _all_reduce(t: torch.Tensor, op, distributed: bool) -> torch.Tensor:
    if distributed:
        dist.all_reduce(t, op=op)
    return t


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    """t with zeros replaced by 1: the divisor of a normalisation whose rows / columns are empty (masked rows, empty
    problems), which therefore stay 0 instead of becoming 0 / 0 = NaN."""
    return torch.where(t > 0, t, torch.ones_like(t))


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _column_logsumexp(logits: torch.Tensor, distributed: bool) -> torch.Tensor:
    """log(sum over dim 1 of exp(logits)) for ``logits`` (G, N, K) -> (G, K), over all ranks when
    ``distributed``; -inf for a column with no finite entry (on any rank)."""
    if not distributed:
        return torch.logsumexp(logits, dim=1)
    g, n, k = logits.shape
    # max first so that exp() never overflows; the max has to be the global one for the sums to add up
    m = logits.amax(dim=1) if n else logits.new_full((g, k), -math.inf)
    m_safe = _finite_or_zero(_all_reduce(m, dist.ReduceOp.MAX, True))
    s = _all_reduce((logits - m_safe[:, None, :]).exp().sum(dim=1), dist.ReduceOp.SUM, True)
    return s.log() + m_safe


def _sinkhorn(
    logits: torch.Tensor,
    mask: torch.Tensor | None,
    iterations: int,
    distributed: bool,
    log_domain: bool | None = None,
) -> torch.Tensor:
    """Batched, masked Sinkhorn-Knopp (SwAV's iteration).

    logits (G, N, K) float32 = scores / epsilon; mask (G, N) bool, False rows take no part (their output rows are
    0); G independent problems, each with its own number of valid rows n_g. ``iterations`` times: scale every
    column to sum to n_g / K, then every row to sum to 1. Returns Q (G, N, K). With ``distributed`` the column
    sums, n_g and the max / min are reduced over ranks: the problems are those of the rows of all ranks together.

    Two equivalent evaluations, chosen automatically (``log_domain=None``) and the same on every rank:
    - exp domain (SwAV): Q = exp(logits - max of the problem), then divisions by row / column sums; no
      transcendental function per iteration. Used when max - min of every problem is <= _EXP_DOMAIN_MAX_SPREAD:
      then exp() has no underflow, the column step makes each column sum n_g / K > 0 and each row sum <= N, the
      row step makes each row sum 1 and each column sum >= 1/K, so no sum is ever 0 or overflows.
    - log domain: the same normalisations as log-sum-exps (each subtracts its own max), for any spread: with
      scores * 1000 whole columns of exp() would underflow to 0 and the exp domain would return 0 / 0 = NaN.
    """
    g, n, k = logits.shape
    device = logits.device
    if mask is None:
        mask = torch.ones(g, n, dtype=torch.bool, device=device)
    valid = mask[:, :, None]
    count = _all_reduce(mask.sum(dim=1).to(torch.float32), dist.ReduceOp.SUM, distributed)  # (G,) n_g
    target = (count / k)[:, None, None]  # (G, 1, 1) column target n_g / K
    # per-problem max and min over valid entries (over all ranks): the shift and the spread
    if n:
        hi = logits.masked_fill(~valid, -math.inf).amax(dim=(1, 2))
        neg_lo = (-logits).masked_fill(~valid, -math.inf).amax(dim=(1, 2))
    else:
        hi = neg_lo = logits.new_full((g,), -math.inf)
    ext = _all_reduce(torch.stack([hi, neg_lo]), dist.ReduceOp.MAX, distributed)
    hi = _finite_or_zero(ext[0])  # empty problems: shift by 0, their entries are masked out anyway
    if log_domain is None:
        spread = torch.where(count > 0, ext[0] + ext[1], torch.zeros_like(count))
        log_domain = bool((spread > _EXP_DOMAIN_MAX_SPREAD).any())
    logits = (logits - hi[:, None, None]).masked_fill(~valid, -math.inf)

    if not log_domain:
        q = logits.exp()  # entries in [exp(-spread), 1]; masked entries exp(-inf) = 0
        for _ in range(iterations):
            col = _all_reduce(q.sum(dim=1, keepdim=True), dist.ReduceOp.SUM, distributed)  # (G, 1, K)
            q = q * (target / _nonzero(col))
            q = q / _nonzero(q.sum(dim=2, keepdim=True))  # last: rows sum to 1 on return
        return q

    log_target = torch.log(_nonzero(target))  # 0 for empty problems, whose entries all stay -inf anyway
    for _ in range(iterations):
        # a column or row with no finite entry subtracts 0 and stays -inf (instead of -inf - -inf = NaN)
        col = _finite_or_zero(_column_logsumexp(logits, distributed))
        logits = logits - col[:, None, :] + log_target
        logits = logits - _finite_or_zero(torch.logsumexp(logits, dim=2, keepdim=True))
    return logits.exp()


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = DEFAULT_SINKHORN_ITERATIONS,
    distributed: bool = False,
) -> torch.Tensor:
    """SwAV-style equipartitioned soft assignment of N features to K prototypes.

    scores (N, K): similarities (cosines in [-1, 1] in this project), any float dtype.
    Returns Q (N, K) float32, no gradient. Q is the iterate of Sinkhorn-Knopp on exp((scores - max) / epsilon):
    ``iterations`` times, first each column is scaled to sum to N / K, then each row to sum to 1.

    On return:
    - every ROW sums to 1 (to float32 rounding, ~1e-6): each feature is a distribution over the K prototypes;
    - every COLUMN sums to N / K (each prototype receives an equal share of the features) up to the convergence of
      ``iterations``. With the default 20 iterations and epsilon 0.05, columns hold to 1e-2 relative for cosine
      scores of random unit vectors with d >= 32 and N >= 2K (SwAV's 3 iterations suffice only from d ~ 128);
      peakier scores (lower dimension, clustered features, smaller epsilon, N close to K) converge more slowly.
      Rows are normalised last, so the row sums are exact and the column sums carry the residual.

    Numerics: computed in float32 whatever the input dtype (bf16 cannot hold the row sums). The max is subtracted
    before exp() (no overflow), and when (max - min) / epsilon exceeds 80, where exp() would underflow whole
    columns to 0 (scores * 1000), the same iteration runs in the log domain instead, so the result is finite for
    any finite scores.

    distributed: when True and torch.distributed is initialised with more than one rank, the column sums, N and
    the max are all-reduced across ranks (as SwAV does), so the equipartition holds over the features of all ranks
    together: each rank passes its own rows and gets its rows of the joint Q. Every rank must call it.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn_knopp expects scores of shape (N, K), got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    logits = scores.detach().to(torch.float32) / epsilon
    return _sinkhorn(logits[None], None, iterations, _distributed(distributed))[0]


# ------------------------------------------------------------------------------------------------------------
# the bank
# ------------------------------------------------------------------------------------------------------------


class GeoContextPrototypes(nn.Module):
    """A bank of ``prototypes_per_region`` unit-norm prototypes for each of ``lat_bands x lon_bands`` regions.

    Buffer ``prototypes``: (R = lat_bands * lon_bands, P = prototypes_per_region, dim) float32, rows L2-normalised,
    persistent (saved in the state dict). It is a buffer and not a Parameter: no gradient and no optimiser ever
    touch it. ``forward`` only reads it; the only thing that changes it is ``update()`` (Sinkhorn assignment + EMA),
    which stage-1 pretraining calls after each optimiser step. Frozen downstream: fine-tuning and inference simply
    never call ``update()``, so the bank stays what pretraining left.

    Size: the paper's 4096 x 100 x 1024 is 0.42 G values (1.7 GB float32). Creating the module under
    ``torch.device("meta")`` allocates nothing (``reset_parameters`` skips meta tensors); after
    ``module.to_empty(device=...)`` call ``reset_parameters()`` or load a state dict. With DDP, the bank is
    identical on every rank already (``update`` reduces across ranks), so wrap with ``broadcast_buffers=False``
    rather than re-broadcasting 1.7 GB on every forward. Keep the bank float32 (mixed precision through autocast,
    not ``module.to(torch.bfloat16)``): a bf16 bank would round away EMA steps of 1 %; ``update`` computes in
    float32 regardless and writes back in the bank's dtype.

    temperature: softmax temperature of the attention over cosine logits (ours: 0.1).
    momentum: EMA momentum of ``update`` (ours: 0.99; 1 freezes, 0 replaces).
    sinkhorn_epsilon, sinkhorn_iterations: of the assignment in ``update`` (see ``sinkhorn_knopp``).
    """

    prototypes: torch.Tensor

    def __init__(
        self,
        dim: int,
        lat_bands: int = 64,
        lon_bands: int = 64,
        prototypes_per_region: int = 100,
        temperature: float = 0.1,
        momentum: float = 0.99,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = DEFAULT_SINKHORN_ITERATIONS,
    ):
        super().__init__()
        if min(dim, lat_bands, lon_bands, prototypes_per_region) < 1:
            raise ValueError("dim, lat_bands, lon_bands and prototypes_per_region must be positive")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if sinkhorn_epsilon <= 0 or sinkhorn_iterations < 1:
            raise ValueError("sinkhorn_epsilon must be positive and sinkhorn_iterations at least 1")
        self.dim = dim
        self.lat_bands = lat_bands
        self.lon_bands = lon_bands
        self.num_regions = lat_bands * lon_bands
        self.prototypes_per_region = prototypes_per_region
        self.temperature = temperature
        self.momentum = momentum
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        # empty: on the meta device this allocates nothing; real devices are filled by reset_parameters()
        self.register_buffer(
            "prototypes", torch.empty(self.num_regions, prototypes_per_region, dim, dtype=torch.float32),
            persistent=True,
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random directions: standard normal, L2-normalised per prototype (uniform on the unit sphere). No-op on the
        meta device. In place, so that the huge bank never exists twice in memory."""
        p = self.prototypes
        if p.is_meta:
            return
        p.normal_()
        p.div_(p.norm(dim=-1, keepdim=True).clamp_min_(1e-12))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, regions={self.lat_bands}x{self.lon_bands}, prototypes_per_region="
            f"{self.prototypes_per_region}, temperature={self.temperature}, momentum={self.momentum}, "
            f"sinkhorn_epsilon={self.sinkhorn_epsilon}, sinkhorn_iterations={self.sinkhorn_iterations}"
        )

    # --------------------------------------------------------------------------------------------------------
    def region_index(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        """Region ids (B,) int64 on the bank's device of locations lat, lon (B,) in degrees."""
        return region_index(lat, lon, self.lat_bands, self.lon_bands).to(self.prototypes.device)

    def region_prototypes(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        """The prototypes of each sample's region: lat, lon (B,) degrees -> (B, P, dim) float32 (a copy, no grad)."""
        return self.prototypes[self.region_index(lat, lon)]

    def _check(self, features: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor) -> None:
        if features.dim() != 4 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (B, {self.dim}, h, w), got {tuple(features.shape)}")
        b = features.shape[0]
        if torch.as_tensor(lat).shape != (b,) or torch.as_tensor(lon).shape != (b,):
            raise ValueError(f"lat and lon must be ({b},) like the batch, got {tuple(torch.as_tensor(lat).shape)}, "
                             f"{tuple(torch.as_tensor(lon).shape)}")

    def forward(self, features: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        """Geo-context of each location: attention of the feature to its sample's region prototypes.

        features (B, dim, h, w); lat, lon (B,) degrees (the tile centre). For the prototypes P_r (P, dim) of the
        sample's region r, each location's feature f gets ``softmax_p(cos(f, p) / temperature) @ P_r``: a convex
        combination of the region's prototypes (values are the stored prototypes, keys their normalised copies).
        Returns (B, dim, h, w) in the attention's dtype (features' dtype, or bf16 under autocast).

        Gradient reaches ``features`` through the attention weights; the bank gets none (it is a buffer).
        """
        self._check(features, lat, lon)
        b, d, h, w = features.shape
        bank = self.region_prototypes(lat, lon).to(features.dtype)  # (B, P, d)
        # cosine logits = dot products of unit vectors, so SDPA's scaled dot product with scale = 1/temperature is
        # exactly softmax(cos / temperature) and the fused flash / memory-efficient kernels apply
        q = F.normalize(features.flatten(2).transpose(1, 2), dim=-1)  # (B, hw, d)
        k = F.normalize(bank, dim=-1)  # the bank is unit-norm already; this keeps a loaded, unnormalised one cosine
        out = F.scaled_dot_product_attention(
            q[:, None], k[:, None], bank[:, None], scale=1.0 / self.temperature
        )  # (B, 1, hw, d), one head of width d
        return out[:, 0].transpose(1, 2).reshape(b, d, h, w)

    # --------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        features: torch.Tensor,
        lat: torch.Tensor,
        lon: torch.Tensor,
        valid: torch.Tensor | None = None,
        distributed: bool = True,
    ) -> dict:
        """Sinkhorn assignment + EMA update of the prototypes of every region present in the batch.

        features (B, dim, h, w) (detached, any float dtype; computed in float32); lat, lon (B,) degrees;
        valid (B, h, w) bool or None (all valid): locations with False take no part at all.

        For each region r with n >= 1 valid locations in the batch:
            F      = L2-normalise(valid feature vectors of the samples in r)    (n, d), batch then row-major order
            scores = F @ normalise(P_r)^T                                      (n, P)  cosines
            Q      = sinkhorn_knopp(scores, sinkhorn_epsilon, sinkhorn_iterations)   (n, P), rows sum to 1
            new    = L2-normalise(Q^T F)                                       (P, d)  direction of the Q-weighted mean
            P_r[p] <- L2-normalise(momentum * P_r[p] + (1 - momentum) * new[p])   for p with sum_n Q[n, p] > 0
        Prototypes with zero total weight and regions not in the batch keep their values bit for bit. All regions
        of the batch are solved together (one padded, masked Sinkhorn), deterministically: the same inputs give
        the same bank.

        Distributed (``distributed`` and torch.distributed initialised with > 1 rank): every rank must call
        ``update`` at the same step. The union of the regions of all ranks is found with one all-reduce of an (R,)
        count vector; the Sinkhorn column sums and n, then Q^T F (U, P, d) and sum_n Q (U, P) over the U regions of
        the union, are summed across ranks, so the update equals the single-process update on all ranks' features
        together and every rank keeps an identical bank.

        Returns stats (python numbers): ``regions`` updated, ``features`` (valid locations used, over all ranks),
        ``prototypes`` updated, ``sinkhorn_column_error`` (max relative deviation of a prototype's total weight
        from n / P: how far from equipartition the Sinkhorn iterations got).
        """
        self._check(features, lat, lon)
        b, d, h, w = features.shape
        hw = h * w
        device = self.prototypes.device
        distributed = _distributed(distributed)
        if valid is None:
            valid = torch.ones(b, hw, dtype=torch.bool, device=device)
        else:
            if valid.shape != (b, h, w):
                raise ValueError(f"valid must be ({b}, {h}, {w}), got {tuple(valid.shape)}")
            valid = valid.to(device=device, dtype=torch.bool).reshape(b, hw)
        region = self.region_index(lat, lon)  # (B,)

        # regions present: those of samples with at least one valid location, over all ranks. A dense (R,) count
        # vector is one small all-reduce (32 KB for 4096 regions) and needs no variable-length gather.
        counts = torch.zeros(self.num_regions, dtype=torch.int64, device=device)
        counts.index_add_(0, region, valid.sum(dim=1))  # integer adds: exact in any order
        if distributed:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        present = torch.nonzero(counts > 0).flatten()  # (U,) sorted: the same order on every rank
        u = int(present.numel())
        stats = {"regions": u, "features": int(counts.sum()), "prototypes": 0, "sinkhorn_column_error": 0.0}
        if u == 0:
            return stats

        # Pad the samples into (U, T, hw) slots: region group g = position of the sample's region in `present`,
        # slot t = rank of the sample among the batch's samples of that region (batch order). Samples of a region
        # absent from `present` (all locations invalid) are dropped.
        slot_of_region = torch.full((self.num_regions,), -1, dtype=torch.int64, device=device)
        slot_of_region[present] = torch.arange(u, device=device)
        group = slot_of_region[region]  # (B,), -1 for dropped samples
        keep = group >= 0
        idx = torch.nonzero(keep).flatten()  # kept samples, batch order
        group = group[idx]
        order = torch.argsort(group, stable=True)
        sorted_group = group[order]
        per_group = torch.bincount(sorted_group, minlength=u)
        start = torch.cumsum(per_group, 0) - per_group
        t_sorted = torch.arange(sorted_group.numel(), device=device) - start[sorted_group]
        slot = torch.empty_like(t_sorted)
        slot[order] = t_sorted
        t_max = max(int(per_group.max()), 1)  # >= 1 so that a rank without samples still has (U, hw) rows

        f = features.detach().to(device=device, dtype=torch.float32).flatten(2).transpose(1, 2)  # (B, hw, d)
        f = F.normalize(f, dim=-1)
        feats = f.new_zeros(u, t_max, hw, d)
        mask = torch.zeros(u, t_max, hw, dtype=torch.bool, device=device)
        feats[group, slot] = f[idx]
        mask[group, slot] = valid[idx]
        # masked rows are zero vectors: they add nothing to Q^T F, and their Q rows are 0 anyway
        feats = feats.masked_fill_(~mask[..., None], 0.0).reshape(u, t_max * hw, d)
        mask = mask.reshape(u, t_max * hw)

        old = self.prototypes[present].to(torch.float32)  # (U, P, d); float32 even if the bank was cast
        scores = torch.bmm(feats, F.normalize(old, dim=-1).transpose(1, 2))  # (U, n_max, P) cosines
        q = _sinkhorn(scores / self.sinkhorn_epsilon, mask, self.sinkhorn_iterations, distributed)
        target = torch.bmm(q.transpose(1, 2), feats)  # (U, P, d) = Q^T F
        weight = q.sum(dim=1)  # (U, P)
        if distributed:
            dist.all_reduce(target, op=dist.ReduceOp.SUM)
            dist.all_reduce(weight, op=dist.ReduceOp.SUM)

        new = F.normalize(target, dim=-1)
        blended = F.normalize(self.momentum * old + (1.0 - self.momentum) * new, dim=-1)
        touched = weight > 0  # a prototype no feature weighs on keeps its exact old value
        self.prototypes[present] = torch.where(touched[..., None], blended, old).to(self.prototypes.dtype)

        n_region = counts[present].to(torch.float32)  # (U,) over all ranks
        share = n_region[:, None] / self.prototypes_per_region
        stats["prototypes"] = int(touched.sum())
        stats["sinkhorn_column_error"] = float(((weight - share).abs() / share).max())
        return stats
