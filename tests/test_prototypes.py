"""Geo-context prototypes: region grid, Sinkhorn-Knopp, attention read-out, Sinkhorn + EMA update (CPU, small)."""

from __future__ import annotations

import math
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from skysense_core.prototypes import (
    DEFAULT_SINKHORN_ITERATIONS,
    GeoContextPrototypes,
    _sinkhorn,
    region_index,
    sinkhorn_knopp,
)

# Column sums of Sinkhorn hold to this relative tolerance with the default iterations on random cosine scores
# (d >= 32, N >= 2K; see DEFAULT_SINKHORN_ITERATIONS). Sizes stay below torch's 32768-element parallel grain, so
# the tests do not depend on thread scheduling on a shared machine.
COLUMN_RTOL = 1e-2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _uniform_sphere(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points uniform on the sphere: (lat, lon) degrees, float64."""
    z = torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1
    lon = torch.rand(n, generator=generator, dtype=torch.float64) * 360 - 180
    return torch.rad2deg(torch.asin(z)), lon


def _random_cosines(n: int, k: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    f = F.normalize(torch.randn(n, d, generator=generator), dim=-1)
    p = F.normalize(torch.randn(k, d, generator=generator), dim=-1)
    return f @ p.t()


# ------------------------------------------------------------------------------------------------------------
# region_index
# ------------------------------------------------------------------------------------------------------------


def test_region_grid_covers_the_globe():
    # 64 bands equal in sin(lat): the narrowest in latitude (at the equator) is 1.79 degrees, sectors 5.6 degrees
    lat = torch.linspace(-90, 90, 361, dtype=torch.float64)  # 0.5 degree steps, includes -90 and 90 exactly
    lon = torch.linspace(-180, 180, 721, dtype=torch.float64)  # includes -180 and 180 exactly
    assert lat[0] == -90 and lat[-1] == 90 and lon[0] == -180 and lon[-1] == 180
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    ids = region_index(la, lo)
    assert ids.dtype == torch.int64 and ids.shape == la.shape
    assert int(ids.min()) == 0 and int(ids.max()) == 4095
    assert torch.unique(ids).numel() == 4096


def test_region_antimeridian_and_wrap():
    lats = torch.tensor([-90.0, -63.2, -12.5, 0.0, 33.3, 71.0, 90.0])
    east = region_index(lats, torch.full_like(lats, 180.0))
    west = region_index(lats, torch.full_like(lats, -180.0))
    assert torch.equal(east, west)
    # longitudes outside [-180, 180] wrap around
    lon = torch.tensor([10.0, -170.0, 179.0])
    for shift in (360.0, -360.0, 720.0):
        assert torch.equal(region_index(lats[:3], lon), region_index(lats[:3], lon + shift))
    # sector 0 starts at -180, the last one ends at 180
    assert int(region_index(torch.tensor(0.0), torch.tensor(-179.9))) % 64 == 0
    assert int(region_index(torch.tensor(0.0), torch.tensor(179.9))) % 64 == 63


def test_region_poles_first_and_last_band():
    lon = torch.linspace(-180, 179, 50)
    south = region_index(torch.full_like(lon, -90.0), lon)
    north = region_index(torch.full_like(lon, 90.0), lon)
    assert torch.all(south // 64 == 0) and torch.all(north // 64 == 63)
    assert int(region_index(torch.tensor(0.0), torch.tensor(0.0), 4, 4)) == 2 * 4 + 2
    # the band edges are where sin(lat) crosses a multiple of 2 / lat_bands
    bands = 64
    edges = torch.rad2deg(torch.asin(torch.arange(1, bands, dtype=torch.float64) * 2 / bands - 1))
    zero = torch.zeros_like(edges)
    assert torch.equal(region_index(edges + 1e-9, zero) // 64, torch.arange(1, bands))
    assert torch.equal(region_index(edges - 1e-9, zero) // 64, torch.arange(0, bands - 1))


def test_region_cells_are_equal_area():
    g = torch.Generator().manual_seed(0)
    n = 400_000
    lat, lon = _uniform_sphere(n, g)
    counts = torch.bincount(region_index(lat, lon), minlength=4096).double()
    mean = n / 4096  # ~98 per cell: Poisson noise alone is ~10 % per cell, so per cell test the spread
    # Equal-area cells get Poisson counts: variance / mean ~ 1 (an equal-angle 64 x 64 grid gives ~ 24 here)
    dispersion = float(counts.var() / mean)
    assert 0.9 < dispersion < 1.1, dispersion
    assert float(counts.min()) > 0.5 * mean and float(counts.max()) < 1.5 * mean
    # aggregated per band and per sector (6250 points each, 1.3 % noise): within 5 % of the mean everywhere
    per_band = counts.view(64, 64).sum(1)
    per_sector = counts.view(64, 64).sum(0)
    for agg in (per_band, per_sector):
        assert float(((agg - n / 64).abs() / (n / 64)).max()) < 0.05
    # a deterministic low-discrepancy sample (Fibonacci lattice) of the sphere: every cell within 5 % of the mean
    i = torch.arange(n, dtype=torch.float64)
    z = 1 - (2 * i + 1) / n
    lon_f = torch.remainder(i * 180 * (3 - math.sqrt(5)), 360) - 180
    fib = torch.bincount(region_index(torch.rad2deg(torch.asin(z)), lon_f), minlength=4096).double()
    assert float(((fib - mean).abs() / mean).max()) < 0.05
    # and the equal-angle alternative would fail that by far
    equal_angle = torch.bincount(
        ((torch.rad2deg(torch.asin(z)) + 90) / 180 * 64).long().clamp(0, 63) * 64
        + (torch.remainder(lon_f + 180, 360) / 360 * 64).long().clamp(0, 63),
        minlength=4096,
    ).double()
    assert float(((equal_angle - mean).abs() / mean).max()) > 0.5


@pytest.mark.parametrize(
    "lat, lon", [(90.5, 0.0), (-91.0, 0.0), (float("nan"), 0.0), (0.0, float("inf")), (float("inf"), 0.0)]
)
def test_region_bad_input_raises(lat, lon):
    with pytest.raises(ValueError):
        region_index(torch.tensor([0.0, lat]), torch.tensor([0.0, lon]))


# ------------------------------------------------------------------------------------------------------------
# sinkhorn_knopp
# ------------------------------------------------------------------------------------------------------------


def _check_sinkhorn(q: torch.Tensor, rtol: float = COLUMN_RTOL):
    n, k = q.shape
    assert q.dtype == torch.float32 and torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.full((k,), n / k), rtol=rtol, atol=0)


@pytest.mark.parametrize("n, k, d", [(300, 50, 32), (200, 100, 32), (320, 100, 64), (1000, 8, 128), (300, 100, 1024)])
def test_sinkhorn_rows_and_columns_random(n, k, d):
    q = sinkhorn_knopp(_random_cosines(n, k, d))
    _check_sinkhorn(q)


def test_sinkhorn_iterations_matter():
    # SwAV's 3 iterations leave > 1e-2 column error at d = 32; the default is chosen to get below it
    s = _random_cosines(300, 50, 32)
    q3 = sinkhorn_knopp(s, iterations=3)
    err3 = float(((q3.sum(0) - 6).abs() / 6).max())
    assert err3 > COLUMN_RTOL
    assert DEFAULT_SINKHORN_ITERATIONS > 3
    torch.testing.assert_close(q3.sum(1), torch.ones(300), atol=1e-5, rtol=0)  # rows hold after any count


def test_sinkhorn_skewed_scores_are_spread():
    n, k, d = 384, 64, 32
    p = F.normalize(torch.randn(k, d), dim=-1)
    # every feature is a noisy copy of prototype 0: argmax alone would put them all there
    f = F.normalize(p[0] + 0.05 * torch.randn(n, d), dim=-1)
    s = f @ p.t()
    assert torch.all(s.argmax(1) == 0)
    q = sinkhorn_knopp(s)
    _check_sinkhorn(q)
    assert q.argmax(1).unique().numel() > k // 2  # hard assignments use most prototypes
    # a constant bonus for one prototype is absorbed by the column scaling exactly
    s2 = _random_cosines(n, k, d)
    s2[:, 3] += 0.8
    q2 = sinkhorn_knopp(s2)
    _check_sinkhorn(q2)
    torch.testing.assert_close(q2, sinkhorn_knopp(s2 - torch.nn.functional.one_hot(torch.tensor(3), k) * 0.8))


def test_sinkhorn_large_scores_and_bf16():
    s = _random_cosines(256, 32, 16)
    big = sinkhorn_knopp(s * 1000)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big.sum(1), torch.ones(256), atol=1e-5, rtol=0)
    # an exp-domain implementation underflows whole columns to 0 here (0/0 = NaN); the log domain keeps them
    assert (big.sum(0) > 0).all()
    q16 = sinkhorn_knopp(s.bfloat16())
    assert q16.dtype == torch.float32 and torch.isfinite(q16).all()
    torch.testing.assert_close(q16.sum(1), torch.ones(256), atol=1e-5, rtol=0)
    torch.testing.assert_close(q16, sinkhorn_knopp(s.bfloat16().float()))
    assert not sinkhorn_knopp(s.requires_grad_()).requires_grad


def test_sinkhorn_exp_and_log_domain_agree():
    # moderate spreads run in the exp domain (SwAV's form), extreme ones in the log domain: the same iteration
    logits = (_random_cosines(200, 16, 16) / 0.05)[None]
    mask = torch.rand(1, 200) > 0.2
    for m in (None, mask):
        exp_q = _sinkhorn(logits, m, 20, False, log_domain=False)
        log_q = _sinkhorn(logits, m, 20, False, log_domain=True)
        torch.testing.assert_close(exp_q, log_q, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(_sinkhorn(logits, m, 20, False), exp_q)  # automatic choice: exp domain
    assert torch.all(exp_q[0, ~mask[0]] == 0)  # masked rows get nothing


def test_sinkhorn_bad_arguments():
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3, 4), iterations=0)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3, 4), epsilon=0.0)


# ------------------------------------------------------------------------------------------------------------
# GeoContextPrototypes.forward
# ------------------------------------------------------------------------------------------------------------

DIM, LAT_BANDS, LON_BANDS, P = 16, 4, 4, 8
# three tiles: the first two in the same region, the third elsewhere
LAT = torch.tensor([10.0, 12.0, -50.0])
LON = torch.tensor([5.0, 7.0, 100.0])


def _bank(**kw) -> GeoContextPrototypes:
    return GeoContextPrototypes(DIM, LAT_BANDS, LON_BANDS, P, **kw)


def test_bank_init_and_buffer():
    m = _bank()
    assert m.prototypes.shape == (16, P, DIM)
    torch.testing.assert_close(m.prototypes.norm(dim=-1), torch.ones(16, P))
    assert not m.prototypes.requires_grad
    assert list(m.parameters()) == []
    assert "prototypes" in m.state_dict()


def test_forward_shape_and_gradient():
    m = _bank()
    f = torch.randn(3, DIM, 5, 4, requires_grad=True)
    out = m(f, LAT, LON)
    assert out.shape == (3, DIM, 5, 4) and out.dtype == torch.float32
    out.square().sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert not m.prototypes.requires_grad and m.prototypes.grad is None


def test_forward_is_the_convex_combination_of_its_region():
    m = _bank()
    f = torch.randn(3, DIM, 5, 4)
    out = m(f, LAT, LON)
    r = region_index(LAT, LON, LAT_BANDS, LON_BANDS)
    assert r[0] == r[1] != r[2]
    for b, (y, x) in [(0, (0, 0)), (2, (3, 2)), (1, (4, 3))]:
        bank = m.prototypes[r[b]]  # (P, d)
        weights = torch.softmax(F.cosine_similarity(f[b, :, y, x][None], bank, dim=-1) / m.temperature, dim=0)
        torch.testing.assert_close(out[b, :, y, x], weights @ bank, atol=1e-5, rtol=1e-5)
        assert torch.isclose(weights.sum(), torch.tensor(1.0)) and (weights > 0).all()
    torch.testing.assert_close(m.region_prototypes(LAT, LON), m.prototypes[r])
    # the same features in a different region read different prototypes
    same = f[:1].expand(3, -1, -1, -1)
    out2 = m(same, LAT, LON)
    torch.testing.assert_close(out2[0], out2[1])  # same region
    assert (out2[0] - out2[2]).abs().max() > 1e-2  # different region


def test_forward_bf16_autocast():
    m = _bank()
    f = torch.randn(2, DIM, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(f, LAT[:2], LON[:2])
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()
    ref = m(f.detach(), LAT[:2], LON[:2])
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    out16 = m(f.detach().bfloat16(), LAT[:2], LON[:2])
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()


def test_forward_bad_shapes():
    m = _bank()
    with pytest.raises(ValueError):
        m(torch.randn(3, DIM + 1, 2, 2), LAT, LON)
    with pytest.raises(ValueError):
        m(torch.randn(2, DIM, 2, 2), LAT, LON)


# ------------------------------------------------------------------------------------------------------------
# GeoContextPrototypes.update
# ------------------------------------------------------------------------------------------------------------


def _expected_region(m: GeoContextPrototypes, old: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """The documented update of one region by hand: feats (n, d) raw valid features, old (P, d)."""
    f = F.normalize(feats, dim=-1)
    q = sinkhorn_knopp(f @ old.t(), m.sinkhorn_epsilon, m.sinkhorn_iterations)
    new = F.normalize(q.t() @ f, dim=-1)
    return F.normalize(m.momentum * old + (1 - m.momentum) * new, dim=-1)


def test_update_ema_is_exact():
    m = _bank(momentum=0.9)
    start = m.prototypes.clone()
    f = torch.randn(3, DIM, 5, 4)
    valid = torch.rand(3, 5, 4) > 0.3
    stats = m.update(f, LAT, LON, valid)
    r = region_index(LAT, LON, LAT_BANDS, LON_BANDS)
    # region of tiles 0 and 1: their valid features in batch order, then row-major
    rows = torch.cat([f[b].flatten(1).t()[valid[b].flatten()] for b in (0, 1)])
    torch.testing.assert_close(m.prototypes[r[0]], _expected_region(m, start[r[0]], rows), atol=1e-6, rtol=0)
    rows2 = f[2].flatten(1).t()[valid[2].flatten()]
    torch.testing.assert_close(m.prototypes[r[2]], _expected_region(m, start[r[2]], rows2), atol=1e-6, rtol=0)
    assert stats["regions"] == 2 and stats["features"] == int(valid.sum()) and stats["prototypes"] == 2 * P
    # every other region is untouched, bit for bit
    other = torch.ones(16, dtype=torch.bool)
    other[r] = False
    assert torch.equal(m.prototypes[other], start[other])
    assert not torch.equal(m.prototypes[r[0]], start[r[0]])
    torch.testing.assert_close(m.prototypes.norm(dim=-1), torch.ones(16, P))


def test_update_ignores_invalid_locations():
    f = torch.randn(3, DIM, 4, 4)
    valid = torch.rand(3, 4, 4) > 0.5
    valid[2] = False  # a tile with nothing valid: its region is not updated at all
    a, b = _bank(), _bank()
    b.load_state_dict(a.state_dict())
    start = a.prototypes.clone()
    stats = a.update(f, LAT, LON, valid)
    g = f.clone()
    g.masked_scatter_(~valid[:, None].expand_as(g), torch.randn(int((~valid).sum()) * DIM) * 100)
    b.update(g, LAT, LON, valid)
    torch.testing.assert_close(a.prototypes, b.prototypes, atol=1e-6, rtol=0)
    r2 = region_index(LAT[2:], LON[2:], LAT_BANDS, LON_BANDS)
    assert torch.equal(a.prototypes[r2], start[r2]) and stats["regions"] == 1
    # no valid location at all: nothing changes
    assert a.update(f, LAT, LON, torch.zeros(3, 4, 4, dtype=torch.bool))["regions"] == 0
    torch.testing.assert_close(a.prototypes, b.prototypes, atol=1e-6, rtol=0)


def test_update_is_deterministic():
    f = torch.randn(3, DIM, 4, 4)
    a = _bank()
    b = _bank()
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        a.update(f, LAT, LON)
        b.update(f, LAT, LON)
    assert torch.equal(a.prototypes, b.prototypes)


def test_update_moves_prototypes_to_cluster_centres():
    torch.manual_seed(1)
    m = _bank(momentum=0.5)
    r = int(region_index(LAT[0], LON[0], LAT_BANDS, LON_BANDS))
    centres = F.normalize(torch.randn(4, DIM), dim=-1)

    def closeness() -> float:
        return float((m.prototypes[r] @ centres.t()).max(dim=1).values.mean())

    before = closeness()
    for _ in range(10):
        label = torch.randint(0, 4, (2, 6, 6))
        f = centres[label].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, DIM, 6, 6)
        m.update(f, LAT[:2], LON[:2])
    after = closeness()
    assert before < 0.6 and after > 0.95, (before, after)


def test_update_bf16_features_and_stats():
    m = _bank()
    stats = m.update(torch.randn(3, DIM, 4, 4).bfloat16(), LAT, LON)
    assert torch.isfinite(m.prototypes).all() and m.prototypes.dtype == torch.float32
    assert set(stats) >= {"regions", "features", "prototypes", "sinkhorn_column_error"}
    with pytest.raises(ValueError):
        m.update(torch.randn(3, DIM, 4, 4), LAT, LON, torch.ones(3, 4, 5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------------
# meta device
# ------------------------------------------------------------------------------------------------------------


def test_meta_device_is_instant():
    t = time.perf_counter()
    with torch.device("meta"):
        m = GeoContextPrototypes(1024, 64, 64, 100)
    assert time.perf_counter() - t < 1.0
    assert m.prototypes.is_meta and m.prototypes.numel() == 4096 * 100 * 1024
    # meta -> real device: to_empty() then reset_parameters() (shown on a small bank)
    with torch.device("meta"):
        small = GeoContextPrototypes(8, 2, 2, 3)
    small.to_empty(device="cpu")
    small.reset_parameters()
    torch.testing.assert_close(small.prototypes.norm(dim=-1), torch.ones(4, 3))


# ------------------------------------------------------------------------------------------------------------
# distributed: two gloo ranks give the bank of one process with the whole batch
# ------------------------------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, init_file: str, state: dict, f, lat, lon, valid, scores) -> dict:
    """One rank: its share of the batch through ``update`` and of the scores through ``sinkhorn_knopp``."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        m = _bank()
        m.load_state_dict(state)
        half = f.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        stats = m.update(f[sl], lat[sl], lon[sl], valid[sl])
        n = scores.shape[0] // world
        mine = scores[rank * n : (rank + 1) * n]
        q = sinkhorn_knopp(mine, distributed=True)
        q_big = sinkhorn_knopp(mine * 1000, distributed=True)  # log domain
        return {"bank": m.prototypes, "stats": stats, "q": q, "q_big": q_big}
    finally:
        dist.destroy_process_group()


def _child_rank(out_file: str, *args) -> None:
    torch.save(_rank_main(*args), out_file)


def test_distributed_update_matches_single_process(tmp_path, monkeypatch):
    # two gloo ranks: rank 1 in a spawned process, rank 0 here (one torch start-up instead of two)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    f = torch.randn(4, DIM, 3, 3)
    # rank 0 gets tiles 0, 1 (regions A, B), rank 1 tiles 2, 3 (regions A, C): A is shared across ranks
    lat = torch.tensor([10.0, -50.0, 12.0, 60.0])
    lon = torch.tensor([5.0, 100.0, 7.0, -120.0])
    valid = torch.rand(4, 3, 3) > 0.2
    scores = _random_cosines(64, 8, 32)
    ref = _bank()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_stats = ref.update(f, lat, lon, valid)
    init = str(tmp_path / "init")
    common = (2, init, state, f, lat, lon, valid, scores)
    child = mp.get_context("spawn").Process(target=_child_rank, args=(str(tmp_path / "rank1.pt"), 1, *common))
    child.start()
    try:
        r0 = _rank_main(0, *common)
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    r1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["bank"], r1["bank"])  # identical banks on every rank
    torch.testing.assert_close(r0["bank"], ref.prototypes, atol=1e-5, rtol=0)
    assert r0["stats"]["regions"] == r1["stats"]["regions"] == ref_stats["regions"] == 3
    assert r0["stats"]["features"] == ref_stats["features"] == int(valid.sum())
    # distributed Sinkhorn: the ranks' halves together are the single-process assignment
    torch.testing.assert_close(torch.cat([r0["q"], r1["q"]]), sinkhorn_knopp(scores), atol=1e-5, rtol=1e-4)
    big = sinkhorn_knopp(scores * 1000)
    torch.testing.assert_close(torch.cat([r0["q_big"], r1["q_big"]]), big, atol=1e-5, rtol=1e-4)
