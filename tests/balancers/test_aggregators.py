"""Property tests of the gradient aggregators and of the engine in ``Method.backward``.

Aggregators are checked on random gradient matrices from the samplers below (plain, badly scaled,
mostly-conflicting, low-rank); the engine is checked against per-task ``autograd`` gradients.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from amtl.balancers import StepInputs, gramian_of, make
from amtl.balancers.aggregators._simplex import min_norm_weights
from amtl.balancers.base import GradientMatrix, MatrixAggregator
from amtl.balancers.method import _AGGREGATORS
from amtl.distributed import Collectives

AGGREGATORS = sorted(_AGGREGATORS)
#: Aggregators that read gradient entries (MatrixAggregator) rather than the Gramian alone.
ENTRIES = [n for n in AGGREGATORS if issubclass(_AGGREGATORS[n], MatrixAggregator)]
GRAMIAN = [n for n in AGGREGATORS if n not in ENTRIES]
DT = torch.float64


# -- shared random matrix samplers ------------------------------------------------------------
def plain(t: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(t, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def scaled(t: int, d: int, seed: int) -> torch.Tensor:
    """Gradients whose norms span four orders of magnitude."""
    return plain(t, d, seed) * torch.logspace(-2, 2, t, dtype=DT)[:, None]


def conflicting(t: int, d: int, seed: int) -> torch.Tensor:
    """A shared component plus strong task-specific ones, so most pairs conflict."""
    g = plain(t + 1, d, seed)
    return 0.3 * g[:1] + g[1:]


def aligned_with_shared(t: int, d: int, seed: int) -> torch.Tensor:
    """A dominant shared component: no pair conflicts."""
    g = plain(t + 1, d, seed)
    return 5.0 * g[:1] + 0.1 * g[1:]


def low_rank(t: int, d: int, seed: int, rank: int = 2) -> torch.Tensor:
    g = plain(t + rank, d, seed)
    return torch.randn(t, rank, generator=torch.Generator().manual_seed(seed + 1), dtype=DT) @ g[:rank]


SAMPLERS = [plain, scaled, conflicting]
CASES = [(s, t, seed) for s in SAMPLERS for t in (2, 3, 5) for seed in range(3)]


def agg(name: str, **hp):
    return make(name, ["t"], **hp).aggregator


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def matrix(g: torch.Tensor, values: torch.Tensor | None = None, blocks: list[int] | None = None) -> GradientMatrix:
    tasks = [f"t{i}" for i in range(g.shape[0])]
    values = torch.ones(g.shape[0], dtype=g.dtype) if values is None else values
    return GradientMatrix(g, tasks, values, [g.shape[1]] if blocks is None else blocks)


def weights_of(a, g: torch.Tensor) -> torch.Tensor:
    """Task weights from the Gramian, or from the entries for a MatrixAggregator."""
    return a.combine(matrix(g)).weights if isinstance(a, MatrixAggregator) else a.weights(gramian_of(g))


# -- base-class checks ------------------------------------------------------------------------
@pytest.mark.parametrize("name", AGGREGATORS)
def test_input_checks(name):
    a = agg(name)
    with pytest.raises(ValueError, match="gradient matrix"):
        a.aggregate(torch.ones(3))
    with pytest.raises(ValueError, match="gradient matrix"):
        a.aggregate(torch.ones(0, 4))
    bad = plain(3, 8, 0)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="inf or nan"):
        a.aggregate(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="inf or nan"):
        a.aggregate(bad)


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("sampler", SAMPLERS + [low_rank])
def test_finite_and_shaped(name, sampler):
    g = sampler(4, 16, 1)
    w = weights_of(agg(name), g)
    assert w.shape == (4,) and torch.isfinite(w).all()
    assert agg(name).aggregate(g).shape == (16,)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_single_task_and_zero_gradients(name):
    g = plain(1, 8, 0)
    d = agg(name, **({"max_norm": 0.0} if name == "nash" else {})).aggregate(g)
    assert torch.allclose(unit(d), unit(g[0]))  # one task: the update follows its gradient
    assert torch.isfinite(agg(name).aggregate(torch.zeros(3, 8, dtype=DT))).all()


@pytest.mark.parametrize("name", [n for n in GRAMIAN if n != "pcgrad"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_permutation_equivariant(name, sampler):
    """Relabelling tasks permutes the weights and leaves the update unchanged."""
    g = sampler(4, 16, 2)
    perm = torch.tensor([2, 0, 3, 1])
    w = agg(name).weights(gramian_of(g))
    wp = agg(name).weights(gramian_of(g[perm]))
    assert torch.allclose(wp, w[perm], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in ENTRIES if n != "gradvac"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_entry_methods_do_not_depend_on_task_order(name, sampler):
    """Relabelling tasks permutes the weights and leaves the update unchanged (GradDrop: the same
    uniform draws, which belong to entries, not tasks). GradVac draws a random order, as PCGrad."""
    g = sampler(4, 16, 2)
    perm = torch.tensor([2, 0, 3, 1])
    a, b = agg(name).combine(matrix(g)), agg(name).combine(matrix(g[perm]))
    assert torch.allclose(b.weights, a.weights[perm], rtol=1e-6, atol=1e-9)
    assert torch.allclose(b.update, a.update, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in AGGREGATORS if n not in ("nash", "excess-mtl", "graddrop")])
def test_rotation_invariant(name):
    """Only the Gramian matters: rotating every gradient rotates the update. So too for DB-MTL, MoCo
    and whole-encoder GradVac (norms and inner products only); ExcessMTL and GradDrop read single
    entries (squares, signs) by design."""
    g = conflicting(3, 6, 3)
    q, _ = torch.linalg.qr(plain(6, 6, 4))
    kw = {"seed": 5} if name in ("pcgrad", "gradvac") else {}
    assert torch.allclose(agg(name, **kw).aggregate(g @ q), agg(name, **kw).aggregate(g) @ q, atol=1e-9)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_identical_gradients_give_that_gradient_direction(name):
    """T copies of one gradient: every aggregator moves along it (no conflict to resolve)."""
    g = plain(1, 12, 7).repeat(4, 1)
    d = agg(name, **({"max_norm": 0.0} if name == "nash" else {})).aggregate(g)
    assert torch.allclose(unit(d), unit(g[0]), atol=1e-6)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_ten_tasks_with_a_zero_gradient(name):
    """T = 10 with one task's gradient exactly zero (no labels in the batch): finite weights, and the
    update still helps every other task unless the method trades one off by design."""
    g = conflicting(10, 40, 4)
    g[3] = 0.0
    w = weights_of(agg(name), g)
    assert w.shape == (10,) and torch.isfinite(w).all()
    if name in NON_CONFLICTING:
        assert (gramian_of(g) @ w).min() >= -1e-10 * gramian_of(g).diagonal().max()


# -- MGDA ---------------------------------------------------------------------------------------
def _simplex_grid(t: int, n: int):
    for c in itertools.product(range(n + 1), repeat=t - 1):
        if sum(c) <= n:
            yield [x / n for x in c] + [1 - sum(c) / n]


@pytest.mark.parametrize("sampler,t,seed", [(s, t, seed) for s in SAMPLERS for t in (2, 3) for seed in range(3)])
def test_mgda_is_min_norm(sampler, t, seed):
    g = sampler(t, 12, seed)
    k = gramian_of(g)
    w = agg("mgda").weights(k)
    assert w.min() >= -1e-12 and abs(float(w.sum()) - 1) < 1e-12
    best = min(float(torch.tensor(c, dtype=DT) @ k @ torch.tensor(c, dtype=DT))
               for c in _simplex_grid(t, 200 if t == 2 else 120))
    assert float(w @ k @ w) <= best * (1 + 1e-12) + 1e-15
    # Optimality: every gradient has at least |d|^2 projection on the min-norm point d (up to the
    # conditioning of K: the scaled sampler spans 8 orders of magnitude).
    assert (k @ w >= float(w @ k @ w) * (1 - 1e-6) - 1e-14 * float(k.diagonal().max())).all()


def test_mgda_two_task_closed_form():
    g = conflicting(2, 10, 7)
    g1, g2 = g
    gamma = float(((g2 - g1) @ g2) / (g1 - g2).pow(2).sum())
    gamma = min(max(gamma, 0.0), 1.0)
    assert torch.allclose(agg("mgda").weights(gramian_of(g)), torch.tensor([gamma, 1 - gamma], dtype=DT))


def test_mgda_linearly_dependent_rows():
    g = low_rank(6, 20, 0)
    w = min_norm_weights(gramian_of(g).numpy())
    k = gramian_of(g)
    w = torch.from_numpy(w)
    assert (k @ w >= float(w @ k @ w) - 1e-9 * float(k.diagonal().max())).all()


# -- PCGrad ---------------------------------------------------------------------------------------
def test_pcgrad_no_conflict_is_sum():
    for seed in range(3):
        g = aligned_with_shared(4, 16, seed)
        assert (gramian_of(g) > 0).all()
        assert torch.allclose(agg("pcgrad").aggregate(g), g.sum(0))


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_two_tasks(seed):
    g = conflicting(2, 16, seed)
    if float(g[0] @ g[1]) >= 0:  # make every sample a conflicting pair rather than skip it
        g = torch.stack([g[0], -g[1]])
    g1, g2 = g
    assert float(g1 @ g2) < 0
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    d = agg("pcgrad").aggregate(g)
    assert torch.allclose(d, p1 + p2)
    # Each projected gradient is orthogonal to the other task's gradient; the sum does not conflict.
    assert abs(float(p1 @ g2)) < 1e-9 and abs(float(p2 @ g1)) < 1e-9
    assert float(d @ g1) >= -1e-9 and float(d @ g2) >= -1e-9


def test_pcgrad_reproducible_and_resumable():
    g = conflicting(5, 16, 0)
    a, b = agg("pcgrad", seed=3), agg("pcgrad", seed=3)
    for _ in range(3):
        assert torch.equal(a.aggregate(g), b.aggregate(g))
    state = a.state_dict()
    nxt = a.aggregate(g)
    c = agg("pcgrad", seed=99)
    c.load_state_dict(state)
    assert torch.equal(c.aggregate(g), nxt)
    # Different orders give different updates on a system with several conflicts.
    outs = {tuple(agg("pcgrad", seed=s).aggregate(g).tolist()) for s in range(8)}
    assert len(outs) > 1


# -- CAGrad ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_cagrad_c0_is_mean(rescale):
    g = conflicting(3, 16, 0)
    assert torch.allclose(agg("cagrad", c=0.0, rescale=rescale).aggregate(g), g.mean(0))


def assert_cagrad_solves_dual(g: torch.Tensor, c: float, seed: int) -> None:
    """w minimises the dual g_w.g0 + c|g0||g_w| over the simplex (checked by random feasible points),
    and the update lies on the ball |d - g0| = c |g0| (or is g0 itself where g_w = 0 is optimal)."""
    t = g.shape[0]
    k = gramian_of(g)
    a = agg("cagrad", c=c, rescale=0).weights(k)
    b = torch.full((t,), 1.0 / t, dtype=DT)
    g0 = math.sqrt(float(b @ k @ b))
    obj = lambda v: float(v @ k @ b) + c * g0 * math.sqrt(max(float(v @ k @ v), 0.0))  # noqa: E731
    torch.manual_seed(seed)
    trials = torch.distributions.Dirichlet(torch.ones(t, dtype=DT)).sample((2000,))
    trials = torch.cat([trials, torch.eye(t, dtype=DT)])
    best = min(obj(v) for v in trials)
    extra = a - b  # = (c |g0| / |g_w|) w
    if extra.abs().max() == 0:  # Pareto-stationary: g_w = 0 is optimal, the update is g0
        assert best >= -1e-12 * g0 ** 2
        return
    w = extra / extra.sum()
    assert obj(w) <= best + 1e-9 * abs(obj(w)) + 1e-12
    d = a @ g
    assert math.isclose(float((d - g.mean(0)).norm()), c * g0, rel_tol=1e-6)


@pytest.mark.parametrize("sampler,t,seed", CASES)
def test_cagrad_solves_dual(sampler, t, seed):
    assert_cagrad_solves_dual(sampler(t, 16, seed), 0.5, seed)


@pytest.mark.parametrize("rows", [
    [[-2, -2], [-2, -2], [0, 0]],   # a task with a zero gradient (e.g. no labels in the batch)
    [[-2, -2], [-2, 1], [0, 0]],
    [[-2, -2], [-2, 1], [2, 2]],    # 0 inside the hull, no zero row
    [[-2, -2], [-2, 2], [1, -1]],
])
def test_cagrad_zero_in_hull(rows):
    """Regression: with 0 in the hull the min-norm point's squared norm can come out as exactly 0 (or
    below, by roundoff); the dual's bracket search then kept growing mu and overflowed mu ** 2."""
    assert_cagrad_solves_dual(torch.tensor(rows, dtype=DT), 0.5, 0)


def test_cagrad_rescale():
    g = conflicting(3, 16, 1)
    base = agg("cagrad", c=0.4, rescale=0).aggregate(g)
    assert torch.allclose(agg("cagrad", c=0.4, rescale=1).aggregate(g), base / 1.16)
    assert torch.allclose(agg("cagrad", c=0.4, rescale=2).aggregate(g), base / 1.4)
    # The official code multiplies its update by T "to match the sum loss"; LibMTL (the default) does not.
    assert torch.allclose(agg("cagrad", c=0.4, rescale=2, magnitude="sum").aggregate(g), g.shape[0] * base / 1.4)


# -- IMTL-G ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,t,seed", CASES)
def test_imtl_g_equal_projections(sampler, t, seed):
    g = sampler(t, 16, seed)
    a = agg("imtl-g").weights(gramian_of(g))
    assert abs(float(a.sum()) - 1) < 1e-9
    proj = (a @ g) @ (g / g.norm(dim=1, keepdim=True)).T
    assert torch.allclose(proj, proj.mean().expand_as(proj), rtol=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_imtl_g_scale_invariant(seed):
    g = conflicting(3, 16, seed)
    s = g.clone()
    s[1] *= 37.0
    assert torch.allclose(unit(agg("imtl-g").aggregate(s)), unit(agg("imtl-g").aggregate(g)))


def test_imtl_alias():
    m = make("imtl", ["a", "b"])
    assert m.weighting.name == "imtl-l" and m.aggregator.name == "imtl-g"


# -- Aligned-MTL ---------------------------------------------------------------------------------
def _aligned_reference(k: torch.Tensor) -> torch.Tensor:
    """The balance transformation restricted to eigenvalues above float32 noise (official tolerance)."""
    lam, vec = torch.linalg.eigh(k)
    keep = lam > lam.max() * k.shape[0] * torch.finfo(torch.float32).eps
    return (vec[:, keep] * (lam[keep].min() / lam[keep]).sqrt()) @ vec[:, keep].T


@pytest.mark.parametrize("sampler,t,seed", CASES + [(low_rank, 5, 0), (low_rank, 4, 1)])
def test_aligned_condition_number_one(sampler, t, seed):
    g = sampler(t, 16, seed)
    k = gramian_of(g)
    balance = _aligned_reference(k)
    rank = int(torch.linalg.matrix_rank(balance))
    assert torch.allclose(agg("aligned").weights(k), balance.sum(1), rtol=1e-8, atol=1e-12)
    # The aligned gradients B G: their kept singular values are all equal to sqrt(lambda_min kept).
    s = torch.linalg.svdvals(balance @ g)[:rank]
    assert float(s.max() / s.min()) == pytest.approx(1.0, rel=1e-6)
    if sampler is plain:
        assert rank == t and float(s.min()) == pytest.approx(float(torch.linalg.eigvalsh(k)[0].sqrt()), rel=1e-6)
    if sampler is low_rank:
        assert rank == 2


# -- Nash-MTL ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,t,seed", CASES)
def test_nash_fixed_point(sampler, t, seed):
    g = sampler(t, 16, seed)
    k = gramian_of(g)
    a = agg("nash", max_norm=0.0).weights(k)
    assert (a > 0).all()
    assert torch.allclose(k @ a, 1 / a, rtol=1e-6)


def test_nash_max_norm_and_reuse():
    g = conflicting(3, 16, 0)
    k = gramian_of(g)
    d = agg("nash", max_norm=0.5).aggregate(g)
    assert float(d.norm()) == pytest.approx(0.5)  # |d|^2 = T at the solution, so it is clipped
    a = agg("nash", max_norm=0.0, update_weights_every=2)
    first = a.weights(k)
    assert torch.equal(a.weights(4 * k), first)  # reused on the second step
    assert not torch.allclose(a.weights(4 * k), first)  # solved again on the third
    b = agg("nash", max_norm=0.0, update_weights_every=2)
    b.load_state_dict(a.state_dict())
    assert torch.allclose(b.weights(k), a.weights(k))


# -- UPGrad and DualProj (the dual cone of the task gradients) ------------------------------------
NON_CONFLICTING = ["mgda", "upgrad", "dualproj"]


@pytest.mark.parametrize("name", NON_CONFLICTING)
@pytest.mark.parametrize("sampler,t,seed", CASES + [(low_rank, 4, 0), (low_rank, 6, 1)])
def test_update_conflicts_with_no_task(name, sampler, t, seed):
    """``g_i . (alpha @ G) = (K alpha)_i >= 0`` for every task: the update is in the dual cone."""
    k = gramian_of(sampler(t, 24, seed))
    assert (k @ agg(name).weights(k)).min() >= -1e-10 * k.diagonal().max()


@pytest.mark.parametrize("sampler,t,seed", [(s, t, seed) for s in SAMPLERS for t in (2, 3, 5, 10) for seed in range(3)])
def test_dual_cone_methods_solve_torchjds_program(sampler, t, seed):
    """The reference is torchjd's UPGradWeighting / DualProjWeighting; without its ``1e-4 I``
    regulariser (see docs/balancers.md) it solves the same program, and the updates agree."""
    import torchjd.aggregation as tj
    from torchjd.linalg import QuadprogProjector

    g = sampler(t, 40, seed)
    k = gramian_of(g)
    exact = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
    for name, theirs in (("upgrad", tj.UPGradWeighting(projector=exact)),
                         ("dualproj", tj.DualProjWeighting(projector=exact))):
        ours = agg(name).weights(k)
        assert float(((ours - theirs(k)) @ g).norm()) <= 1e-8 * float((ours @ g).norm()), name


def test_without_conflict_both_are_the_mean_gradient():
    """Gradients at acute angles lie in their own dual cone, so nothing is projected."""
    k = gramian_of(aligned_with_shared(4, 16, 0))
    assert (k >= 0).all()
    for name in ("upgrad", "dualproj"):
        assert torch.allclose(agg(name).weights(k), torch.full((4,), 0.25, dtype=DT))


def test_two_opposed_tasks_worked_example():
    """g1 = (1, 0), g2 = (-1, 1) (135 degrees apart), from the program by hand: DualProj moves the
    mean (0, 1/2) nowhere (it conflicts with neither); UPGrad projects g1/2 to (1/4, 1/4)
    and g2/2 to (0, 1/2), and sums them."""
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=DT)
    assert torch.allclose(agg("dualproj").aggregate(g), torch.tensor([0.0, 0.5], dtype=DT))
    assert torch.allclose(agg("upgrad").aggregate(g), torch.tensor([0.25, 0.75], dtype=DT))


# -- FairGrad ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.1, 0.5, 2.0, 10.0])
@pytest.mark.parametrize("sampler,t,seed", CASES + [(scaled, 10, 0), (conflicting, 10, 1)])
def test_fairgrad_solves_its_equation(alpha, sampler, t, seed):
    """``K w = w^(-1/alpha)``, ``w > 0``, to working precision (backward error), across four decades of
    gradient norms and alphas from near-utilitarian to near max-min."""
    k = gramian_of(sampler(t, 24, seed))
    w = agg("fairgrad", fairness=alpha).weights(k)
    lhs, rhs = k @ w, w ** (-1.0 / alpha)
    assert (w > 0).all() and ((lhs - rhs).abs() / (k.abs() @ w + rhs)).max() < 1e-9


def test_fairgrad_at_alpha_one_is_nash_mtl():
    k = gramian_of(conflicting(4, 16, 0))
    assert torch.allclose(agg("fairgrad", fairness=1.0).weights(k), agg("nash", max_norm=0.0).weights(k), rtol=1e-9)


def test_fairgrad_matches_the_official_solver_where_it_converges():
    """torchjd's FairGradWeighting is the official code (SciPy least squares from equal weights);
    where its residual is small both find the same (unique) root."""
    import torchjd.aggregation as tj

    compared = 0
    for sampler, t, seed in CASES:
        g = sampler(t, 24, seed)
        k = gramian_of(g)
        theirs = tj.FairGradWeighting(alpha=2.0)(k)
        if ((k @ theirs - theirs ** -0.5).abs() / theirs ** -0.5).max() > 1e-6:
            continue  # least squares stopped early (SciPy's default budget), as it does on hard systems
        ours = agg("fairgrad", fairness=2.0).weights(k)
        assert float(((ours - theirs) @ g).norm()) <= 1e-6 * float((ours @ g).norm())
        compared += 1
    assert compared >= len(CASES) // 2


def test_fairgrad_weights_equal_orthogonal_tasks_equally():
    g = torch.eye(3, 8, dtype=DT) * 2.0
    w = agg("fairgrad", fairness=3.0).weights(gramian_of(g))
    assert torch.allclose(w, w[0].expand(3))  # 4 w = w^(-1/3): w = 4^(-3/4)
    assert torch.allclose(w[0], torch.tensor(4.0 ** -0.75, dtype=DT))


# -- CR-MOGM -------------------------------------------------------------------------------------
def test_cr_mogm_is_torchjds_moving_average_of_the_inner_weights():
    import torchjd.aggregation as tj
    from torchjd.linalg import QuadprogProjector

    ours = agg("cr-mogm", momentum=0.7, inner="upgrad")
    theirs = tj.CRMOGMWeighting(tj.UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0)), alpha=0.7)
    for seed in range(6):  # a stream of steps: the average carries over
        k = gramian_of(conflicting(4, 16, seed))
        assert torch.allclose(ours.weights(k), theirs(k), rtol=1e-8, atol=1e-10)


def test_cr_mogm_momentum_limits_state_and_task_count_changes():
    ks = [gramian_of(conflicting(3, 16, seed)) for seed in range(3)]
    plain, frozen = agg("cr-mogm", momentum=0.0), agg("cr-mogm", momentum=1.0)
    for k in ks:
        assert torch.allclose(plain.weights(k), agg("mgda").weights(k))
        assert torch.allclose(frozen.weights(k), agg("mgda").weights(ks[0]))
    resumed = agg("cr-mogm", momentum=0.5)
    resumed.load_state_dict(plain.state_dict())  # after ks[-1]: the average is mgda's weights of it
    k = gramian_of(conflicting(3, 16, 9))
    assert torch.allclose(resumed.weights(k), 0.5 * agg("mgda").weights(ks[-1]) + 0.5 * agg("mgda").weights(k))
    four = gramian_of(conflicting(4, 16, 0))  # a step with another task count restarts the average
    assert torch.allclose(resumed.weights(four), agg("mgda").weights(four))


# -- ConFIG --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,t,seed", CASES + [(low_rank, 4, 0), (low_rank, 6, 1)])
def test_config_is_torchjds_update_from_the_gramian_alone(sampler, t, seed):
    import torchjd.aggregation as tj

    g = sampler(t, 24, seed)
    assert torch.allclose(agg("config").aggregate(g), tj.ConFIG()(g), rtol=1e-9, atol=1e-12)
    g[1] = 0.0  # a zero gradient: a zero unit row, as in the reference
    assert torch.allclose(agg("config").aggregate(g), tj.ConFIG()(g), rtol=1e-9, atol=1e-12)


def test_config_has_equal_cosines_and_the_summed_length():
    g = conflicting(4, 16, 3)
    d = agg("config").aggregate(g)
    cosines = g @ d / (g.norm(dim=1) * d.norm())
    assert torch.allclose(cosines, cosines[0].expand(4)) and cosines[0] > 0
    assert torch.allclose(d.norm(), (g @ unit(d)).sum())
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=DT)  # v_hat = (1, 1)/sqrt 2, length 4/sqrt 2
    assert torch.allclose(agg("config").aggregate(orthogonal), torch.tensor([2.0, 2.0], dtype=DT))


# -- the engine ----------------------------------------------------------------------------------
TASKS = ["a", "b", "c"]


class Tiny(nn.Module):
    """Encoder (two layers, the second is the last shared layer) and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 6)
        self.last = nn.Linear(6, 4)
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Tanh(), nn.Linear(4, 2)) for t in TASKS})

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[StepInputs, dict]:
        z = self.last(torch.relu(self.first(x)))
        losses = {t: ((h(z) - y[:, 2 * i:2 * i + 2]) ** 2).mean() * (i + 1) for i, (t, h) in enumerate(self.heads.items())}
        return StepInputs(losses=losses, shared_params=self.shared(), task_params=list(self.heads.parameters()),
                          last_shared_params=list(self.last.parameters()), representation=z), losses

    def shared(self) -> list[nn.Parameter]:
        return list(self.first.parameters()) + list(self.last.parameters())


class TwoIdenticalRanks(Collectives):
    """Two ranks that hold the same batch, so every mean over them is the identity; records its inputs.

    Stands in for the process group only (the engine under test is real); the real group is
    exercised by tests/test_distributed.py.
    """

    def __init__(self) -> None:
        super().__init__(size=2)
        self.seen: list[torch.Tensor] = []

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.seen.append(tensor.clone())
        return tensor


def _per_task(losses: dict, inputs: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for loss in losses.values():
        gs = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(x) if g is None else g).reshape(-1) for g, x in zip(gs, inputs)]))
    return torch.stack(rows)


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(7, 5, generator=gen), 3 * torch.randn(7, 6, generator=gen)


@pytest.mark.parametrize("source, with_rep", [("shared", True), ("last", True), ("representation", True),
                                              ("shared", False), ("last", False)])
@pytest.mark.parametrize("name", GRAMIAN)
def test_engine_matches_autograd(name, source, with_rep):
    model = Tiny()
    x, y = _data()
    step, losses = model.step(x, y)
    if not with_rep:
        step.representation = None
    src = {"shared": step.shared_params, "last": step.last_shared_params,
           "representation": [step.representation]}[source]
    g_src = _per_task(losses, src)
    g_shared = _per_task(losses, step.shared_params)
    head_rows = _per_task(losses, step.task_params)
    ref = make(name, TASKS, source=source)
    alpha = ref.aggregator.weights(gramian_of(g_src)).to(g_src.dtype)
    if source == "shared":  # the engine's update is what aggregate() gives on the same matrix
        same = ref.aggregator.__class__(**ref.aggregator.hparam_values())
        assert torch.allclose(alpha.double() @ g_src.double(), same.aggregate(g_src.double()), rtol=1e-4, atol=1e-6)

    m = make(name, TASKS, source=source)
    report = m.backward(step)
    got_shared = torch.cat([p.grad.reshape(-1) for p in step.shared_params])
    got_head = torch.cat([p.grad.reshape(-1) for p in step.task_params])
    assert torch.allclose(got_shared, alpha @ g_shared, rtol=1e-5, atol=1e-7)
    # Heads: their task's gradient, or alpha_t times it where the method follows sum_t alpha_t L_t.
    head = alpha @ head_rows if m.aggregator.heads == "weighted" else head_rows.sum(0)
    assert torch.allclose(got_head, head, rtol=1e-5, atol=1e-7)
    assert set(report.weights) == set(TASKS) and report.condition_number is not None
    assert len(report.cosines) == 3


@pytest.mark.parametrize("name, default", [("nash", "weighted"), ("mgda", "plain")])
def test_heads_follow_the_official_code_or_the_paper(name, default):
    """Nash-MTL's official code back-propagates sum_t alpha_t L_t, so head t gets alpha_t times its
    gradient (the default); MGDA's paper gives heads their plain task gradient (its default), its
    official code the weighted one. Either method offers the other rule."""
    assert make(name, TASKS).aggregator.heads == default
    got = {}
    for heads in ("plain", "weighted"):
        model = Tiny()
        step, losses = model.step(*_data())
        m = make(name, TASKS, heads=heads)
        m.backward(step)
        alpha = torch.tensor(list(m._last_alpha.values()), dtype=torch.float32)
        rows = _per_task(losses, step.task_params)
        got[heads] = torch.cat([p.grad.reshape(-1) for p in step.task_params])
        assert torch.allclose(got[heads], alpha @ rows if heads == "weighted" else rows.sum(0), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got["plain"], got["weighted"])


def test_engine_task_gradients_independent_of_existing_grad():
    """Regression: each row of G is one task's gradient, whatever ``.grad`` holds already.

    The official AMTL repository's PCGrad/CAGrad trainer called ``backward`` per task without zeroing
    ``.grad`` in between, so task t's "gradient" was the sum of tasks 1..t. The engine uses
    ``autograd.grad`` and never reads ``.grad``; stale values are only added to, as ``backward`` does.
    """
    model = Tiny()
    x, y = _data()
    step, losses = model.step(x, y)
    g_ref = _per_task(losses, step.shared_params)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    step.ranks = TwoIdenticalRanks()  # makes the engine form the [T, D] matrix and hand it over
    m = make("pcgrad", TASKS)
    m.backward(step)
    assert torch.allclose(step.ranks.seen[0], g_ref, rtol=1e-5, atol=1e-7)
    alpha = torch.tensor([m._last_alpha[t] for t in TASKS], dtype=g_ref.dtype)
    got = torch.cat([p.grad.reshape(-1) for p in step.shared_params])
    assert torch.allclose(got, 3.0 + alpha @ g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ew+pcgrad", "uw+mgda", "imtl", "dwa+cagrad"])
def test_engine_weighting_combinations(name):
    model = Tiny()
    x, y = _data()
    step, _ = model.step(x, y)
    m = make(name, TASKS, source="last")
    m.backward(step)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for p in m.parameters():  # learnable weighting parameters (UW, IMTL-L) get their gradients
        assert p.grad is not None
    assert set(m.weights) == set(TASKS)


def test_engine_weights_and_diagnostics():
    model = Tiny()
    x, y = _data()
    step, losses = model.step(x, y)
    g = _per_task(losses, step.shared_params)
    m = make("mgda", TASKS)
    report = m.backward(step)
    alpha = agg("mgda").weights(gramian_of(g))
    assert report.weights == pytest.approx(dict(zip(TASKS, alpha.tolist())), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)
    assert report.cosines["a|b"] == pytest.approx(float(cos), rel=1e-5)


def test_aggregate_keeps_the_gradients_dtype():
    """Weights are solved in float64 from the Gramian, but the update keeps float32 gradients' dtype."""
    import torch

    from amtl.balancers.aggregators._mgda import MGDA

    grads = torch.randn(3, 7, dtype=torch.float32)
    update = MGDA().aggregate(grads)
    assert update.dtype == torch.float32 and update.shape == (7,)


def test_representation_source_without_representation_is_an_error():
    model = Tiny()
    step, _ = model.step(*_data())
    step.representation = None
    with pytest.raises(ValueError, match="representation"):
        make("mgda", tasks=["a", "b"], source="representation").backward(step)


@pytest.mark.parametrize("source", ["shared", "last", "representation"])
def test_engine_loss_scale_scales_grads_not_alpha(source):
    """fp16 loss scaling: ``.grad`` holds scale x gradient (as ``scaler.scale(loss).backward()``
    would) while the aggregator sees the unscaled Gramian; nash's weights depend on its scale."""
    grads, alphas = [], []
    for scale in (None, 2.0 ** 12):
        model = Tiny()
        step, _ = model.step(*_data())
        m = make("nash", TASKS, source=source)
        m.backward(step, loss_scale=scale)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        alphas.append(list(m._last_alpha.values()))
    assert alphas[1] == pytest.approx(alphas[0], rel=1e-5)
    torch.testing.assert_close(grads[1] / 2.0 ** 12, grads[0], rtol=1e-5, atol=1e-7)


def test_engine_overflowed_scaled_gradient_skips_the_solver():
    """An inf in one task's scaled gradient: the solver is not run on it, and the update is
    non-finite, so a GradScaler skips the step."""
    model = Tiny()
    step, _ = model.step(*_data())
    step.losses["b"] = step.losses["b"] * float("inf")  # the scaled loss overflowed
    m = make("mgda", TASKS)
    m.backward(step, loss_scale=torch.tensor(2.0 ** 16))
    assert set(m._last_alpha.values()) == {1.0}
    assert not all(torch.isfinite(p.grad).all() for p in step.shared_params)
