"""Aggregators that read gradient entries (``MatrixAggregator``): DB-MTL, MoCo, ExcessMTL, GradVac,
GradDrop. Each is checked against its reference's update rule written out here over several steps
(LibMTL's loops, on random matrices and loss values) or against torchjd, and the engine is checked to
serve them exactly the matrix ``autograd`` gives.
"""
from __future__ import annotations

import pytest
import torch

from amtl.balancers import HParamError, StepInputs, gramian_of, make
from amtl.balancers.base import GradientMatrix
from amtl.balancers.method import _AGGREGATORS
from tests.balancers.test_aggregators import (ENTRIES, TASKS, Tiny, TwoIdenticalRanks, _data, _per_task, conflicting,
                                              plain, scaled)

DT = torch.float64
#: Entry methods that read gradients from independent parts of the batch (MoDo, SDMGrad).
SPLIT = [n for n in ENTRIES if _AGGREGATORS[n].independent_batches > 1]


def agg(name: str, **hp):
    return make(name, ["t"], **hp).aggregator


def steps(t: int, d: int, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` steps of (gradient matrix [T, D], loss values [T]) with badly scaled, conflicting rows."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        g = scaled(t, d, seed + k) + conflicting(t, d, seed + 100 + k)
        out.append((g, torch.rand(t, generator=gen, dtype=DT) * 3 + 0.1))
    return out


def run(a, seq, tasks=None, blocks=None):
    tasks = tasks or [f"t{i}" for i in range(seq[0][0].shape[0])]
    return [a.combine(GradientMatrix(g, tasks, v, blocks or [g.shape[1]])) for g, v in seq]


# -- DB-MTL -------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta, sigma", [(0.9, 0.0), (0.5, 0.5), (0.0, 0.0)])
def test_db_mtl_follows_libmtl(beta, sigma):
    seq = steps(3, 20, 4)
    ours = run(agg("db-mtl", beta=beta, beta_sigma=sigma), seq)
    buffer = torch.zeros(3, 20, dtype=DT)
    for k, ((g, values), got) in enumerate(zip(seq, ours), start=1):
        log_grads = g / (values + 1e-8)[:, None]  # d log(L + 1e-8) = dL / (L + 1e-8)
        buffer = log_grads + (beta / k ** sigma) * (buffer - log_grads)
        norms = buffer.norm(dim=-1)
        alpha = norms.max() / (norms + 1e-8)
        torch.testing.assert_close(got.update, (alpha[:, None] * buffer).sum(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.head_weights, 1 / (values + 1e-8))


def test_db_mtl_balances_the_smoothed_log_gradients_to_one_norm():
    (g, values), = steps(4, 30, 1, seed=3)
    out = agg("db-mtl", beta=0.0).combine(GradientMatrix(g, list("abcd"), values, [30]))
    scaled_rows = out.weights[:, None] * g  # weights = alpha_t / L_t
    norms = scaled_rows.norm(dim=1)
    torch.testing.assert_close(norms, norms.max().expand(4))


# -- MoCo ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("hp", [{}, {"beta": 0.9, "beta_sigma": 0.0, "lambda_step": 1.0, "lambda_step_sigma": 0.0,
                                     "rho": 0.5}])
def test_moco_follows_libmtl(hp):
    seq = steps(3, 20, 5, seed=1)
    ours = run(agg("moco", **hp), seq)
    beta, bs, gamma, gs, rho = (hp.get(k, d) for k, d in
                                (("beta", 0.5), ("beta_sigma", 0.5), ("lambda_step", 0.1), ("lambda_step_sigma", 0.5),
                                 ("rho", 0.0)))
    y, lam = torch.zeros(3, 20, dtype=DT), torch.ones(3, dtype=DT) / 3
    for k, ((g, values), got) in enumerate(zip(seq, ours), start=1):
        g = g / (g.norm(dim=1, keepdim=True) + 1e-8) * values[:, None]
        y = y - (beta / k ** bs) * (y - g)
        lam = torch.softmax(lam - (gamma / k ** gs) * (y @ y.T + rho * torch.eye(3, dtype=DT)) @ lam, -1)
        torch.testing.assert_close(got.weights, lam)
        torch.testing.assert_close(got.update, y.T @ lam)


@pytest.mark.parametrize("name", ["db-mtl", "moco"])
def test_a_negative_term_is_rescaled_never_turned_around(name):
    """Weightings may give terms <= 0 (UW's exp(-s) L + s); the loss-value scaling uses |v|, so the
    update still descends every task here (orthogonal gradients: no trade-off to make)."""
    g = torch.eye(3, 6, dtype=DT) * torch.tensor([[1.0], [2.0], [3.0]], dtype=DT)
    values = torch.tensor([0.5, -0.7, -2.0], dtype=DT)
    out = agg(name).combine(GradientMatrix(g, ["a", "b", "c"], values, [6]))
    assert (g @ out.update > 0).all()


# -- ExcessMTL ----------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [1e-2, 0.5])
def test_excess_mtl_follows_libmtl_and_torchjd(eta):
    tj = pytest.importorskip("torchjd.aggregation")
    seq = steps(3, 25, 5, seed=2)
    ours = run(agg("excess-mtl", robust_step_size=eta), seq)
    # torchjd's default (no warm-up) already steps on the first call with the raw estimate; LibMTL
    # and the official code only record it, which is torchjd's one-step warm-up.
    theirs = tj.ExcessMTLWeighting(robust_step_size=eta, n_warmup_steps=1)
    weights, squares, first = torch.ones(3, dtype=DT), torch.zeros(3, 25, dtype=DT), None
    for (g, _), got in zip(seq, ours):
        squares += g ** 2
        w = torch.stack([g[i] * (1 / torch.sqrt(squares[i] + 1e-7)) @ g[i] for i in range(3)])
        if first is None:
            first = w
        else:
            weights = weights * torch.exp(eta * w / first)
            weights = weights / weights.sum() * 3
        torch.testing.assert_close(got.weights, weights, rtol=1e-6, atol=0)
        torch.testing.assert_close(got.update, weights @ g, rtol=1e-6, atol=1e-9)
        # torchjd keeps the weights on the simplex (1/m at the start): the same weights over m.
        torch.testing.assert_close(theirs(g).clone() * 3, got.weights, rtol=1e-6, atol=0)


def test_excess_mtl_raises_the_weight_of_the_task_far_from_its_optimum():
    """A task whose gradient stays large relative to its history (high excess risk) gains weight."""
    a = agg("excess-mtl", robust_step_size=1.0)
    g = plain(2, 10, 0)
    for k in range(6):
        out = a.combine(GradientMatrix(torch.stack([g[0], g[1] * 0.5 ** k]), ["far", "near"],
                                       torch.ones(2, dtype=DT), [10]))
    assert out.weights[0] > 1.0 > out.weights[1]


# -- GradVac ------------------------------------------------------------------------------------
def libmtl_gradvac(g: torch.Tensor, targets: torch.Tensor, beta: float, orders: list[list[int]],
                   sizes: list[int]) -> torch.Tensor:
    """LibMTL's GradVac loop on the entries (``targets`` [T, T, K] updated in place)."""
    pc = g.clone()
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    for i in range(g.shape[0]):
        for j in orders[i]:
            for k in range(len(sizes)):
                beg, end = bounds[k], bounds[k + 1]
                rho = pc[i, beg:end] @ g[j, beg:end] / (pc[i, beg:end].norm() * g[j, beg:end].norm() + 1e-8)
                if rho < targets[i, j, k]:
                    hat = targets[i, j, k]
                    w = pc[i, beg:end].norm() * (hat * (1 - rho ** 2).sqrt() - rho * (1 - hat ** 2).sqrt()) \
                        / (g[j, beg:end].norm() * (1 - hat ** 2).sqrt() + 1e-8)
                    pc[i, beg:end] += g[j, beg:end] * w
                targets[i, j, k] = (1 - beta) * targets[i, j, k] + beta * rho
    return pc.sum(0)


@pytest.mark.parametrize("group, sizes", [("whole", [24]), ("parameter", [10, 6, 8])])
def test_gradvac_follows_libmtl(group, sizes):
    seq = steps(3, 24, 5, seed=4)
    ours = run(agg("gradvac", beta=0.3, group=group, seed=7), seq, blocks=sizes)
    draws = torch.Generator().manual_seed(7)  # the orders the aggregator draws, in its order
    targets = torch.zeros(3, 3, len(sizes), dtype=DT)
    for (g, _), got in zip(seq, ours):
        orders = [[j for j in torch.randperm(3, generator=draws).tolist() if j != i] for i in range(3)]
        reference = libmtl_gradvac(g, targets, 0.3, orders, sizes if group == "parameter" else [24])
        torch.testing.assert_close(got.update, reference, rtol=1e-9, atol=1e-10)
    assert (targets != 0).any()  # the targets moved, so later steps exercised the correction


def test_gradvac_two_tasks_is_torchjds():
    tj = pytest.importorskip("torchjd.aggregation")
    theirs = tj.GradVacWeighting(beta=0.5)
    ours = agg("gradvac", beta=0.5)
    for g, _ in steps(2, 16, 6, seed=5):  # two tasks: the order is not random
        torch.testing.assert_close(ours.combine(GradientMatrix(g, ["a", "b"], torch.ones(2, dtype=DT), [16])).weights,
                                   theirs(gramian_of(g)), rtol=1e-9, atol=1e-12)


# -- GradDrop -----------------------------------------------------------------------------------
def test_graddrop_each_entry_takes_one_sign():
    """Where tasks disagree, every entry of the update is the sum of its positive or its negative
    parts; where they agree, the plain sum."""
    g = conflicting(4, 200, 0)
    update = agg("graddrop").aggregate(g)
    pos, neg = g.clamp(min=0).sum(0), g.clamp(max=0).sum(0)
    assert torch.all(torch.isclose(update, pos) | torch.isclose(update, neg))
    agree = g.abs()
    torch.testing.assert_close(agg("graddrop").aggregate(agree), agree.sum(0))
    torch.testing.assert_close(agg("graddrop", leak=1.0).aggregate(g), g.sum(0))


def test_graddrop_keeps_the_positive_side_with_probability_purity():
    g = torch.tensor([[3.0, 1.0], [-1.0, -1.0]], dtype=DT)  # purities 0.75 and 0.5
    a = agg("graddrop", seed=3)
    picks = torch.stack([a.aggregate(g) > 0 for _ in range(4000)]).double().mean(0)
    assert picks[0] == pytest.approx(0.75, abs=0.03) and picks[1] == pytest.approx(0.5, abs=0.03)


def test_graddrop_draws_follow_the_seed_and_resume():
    g = conflicting(3, 50, 1)
    a, b = agg("graddrop", seed=1), agg("graddrop", seed=1)
    a.aggregate(g)
    state = a.state_dict()
    b.load_state_dict(state)
    torch.testing.assert_close(a.aggregate(g), b.aggregate(g))
    assert not torch.equal(agg("graddrop", seed=1).aggregate(g), agg("graddrop", seed=2).aggregate(g))


# -- the engine ---------------------------------------------------------------------------------
@pytest.mark.parametrize("with_rep, ranks", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("name", [n for n in ENTRIES if n not in SPLIT])
def test_engine_serves_the_autograd_matrix(name, with_rep, ranks):
    model = Tiny()
    step, losses = model.step(*_data())
    if not with_rep:
        step.representation = None
    if ranks:
        step.ranks = TwoIdenticalRanks()
    g = _per_task(losses, step.shared_params)
    head_rows = _per_task(losses, step.task_params)
    values = torch.stack([losses[t].detach() for t in TASKS])
    ref = make(name, TASKS).aggregator.combine(
        GradientMatrix(g, list(TASKS), values, [p.numel() for p in step.shared_params]))
    m = make(name, TASKS)
    report = m.backward(step)
    got = torch.cat([p.grad.reshape(-1) for p in step.shared_params])
    torch.testing.assert_close(got, ref.update, rtol=1e-5, atol=1e-7)
    head_weights = ref.head_weights if ref.head_weights is not None else ref.weights
    head = head_weights.to(head_rows) @ head_rows if m.aggregator.heads == "weighted" else head_rows.sum(0)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in step.task_params]), head, rtol=1e-5, atol=1e-7)
    assert report.weights == pytest.approx(dict(zip(TASKS, ref.weights.tolist())), rel=1e-5)
    assert len(report.cosines) == 3 and report.condition_number is not None


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_methods_read_all_shared_parameters_only(name):
    with pytest.raises(HParamError, match="source.*must be one of \\['shared'\\]"):
        make(name, TASKS, source="last")


@pytest.mark.parametrize("name", ["moco", "db-mtl", "excess-mtl"])
def test_engine_unscales_the_matrix_and_the_values_under_loss_scaling(name):
    grads, weights = [], []
    for scale in (None, 2.0 ** 10):
        model = Tiny()
        step, _ = model.step(*_data())
        m = make(name, TASKS)
        for _ in range(2):  # the second step reads state the first one left
            for p in model.parameters():
                p.grad = None
            step, _ = model.step(*_data())
            m.backward(step, loss_scale=scale)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        weights.append(list(m._last_alpha.values()))
    assert weights[1] == pytest.approx(weights[0], rel=1e-5)
    torch.testing.assert_close(grads[1] / 2.0 ** 10, grads[0], rtol=1e-5, atol=1e-7)


# -- MoDo and SDMGrad: independent parts of the batch ------------------------------------------
def project_simplex_libmtl(v):
    """LibMTL's ``SDMGrad.euclidean_proj_simplex`` (Duchi et al.), as a test oracle."""
    import numpy as np
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, len(v) + 1) > (cssv - 1))[0][-1]
    return (v - float(cssv[rho] - 1) / (rho + 1)).clip(min=0)


def split_steps(n: int, seed: int = 0):
    return [(g, torch.rand(3, dtype=DT)) for g, _ in steps(3, 12, 3 * n, seed)]


@pytest.mark.parametrize("hp", [{}, {"lambda_step": 0.05, "rho": 0.0}])
def test_modo_follows_libmtl(hp):
    seq = split_steps(4, seed=6)
    a = agg("modo", **hp)
    gamma, rho = hp.get("lambda_step", 1e-3), hp.get("rho", 0.1)
    lam = torch.ones(3, dtype=DT) / 3
    for k in range(4):
        parts = torch.stack([seq[3 * k + i][0] for i in range(3)])
        got = a.combine(GradientMatrix(parts.sum(0), ["a", "b", "c"], torch.ones(3, dtype=DT), [12], parts))
        lam = torch.from_numpy(project_simplex_libmtl((lam - gamma * (parts[0] @ (parts[1].T @ lam) + rho * lam)).numpy()))
        torch.testing.assert_close(got.weights, lam)
        torch.testing.assert_close(got.update, lam @ parts[2])


@pytest.mark.parametrize("hp", [{}, {"pull": 1.0, "inner_lr": 10.0, "optim_niter": 5}])
def test_sdmgrad_follows_libmtl(hp):
    seq = split_steps(4, seed=7)
    a = agg("sdmgrad", **hp)
    pull, lr, niter = hp.get("pull", 0.3), hp.get("inner_lr", 5.0), hp.get("optim_niter", 20)
    w = torch.ones(3, dtype=DT) / 3
    for k in range(4):
        zeta, xi1, xi2 = (seq[3 * k + i][0] for i in range(3))
        got = a.combine(GradientMatrix(zeta + xi1 + xi2, ["a", "b", "c"], torch.ones(3, dtype=DT), [12],
                                       torch.stack([zeta, xi1, xi2])))
        gg = xi1 @ xi2.T
        scale = torch.sqrt(torch.diag(gg).clamp(min=0)).mean()
        gg = gg / (scale ** 2 + 1e-8)
        gg_mean = gg.mean(dim=1)
        w = w.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([w], lr=lr, momentum=0.5)
        for _ in range(niter):
            optimizer.zero_grad()
            w.grad = gg @ w.detach() + pull * gg_mean
            optimizer.step()
            w.data.copy_(torch.from_numpy(project_simplex_libmtl(w.data.numpy())))
        w = w.detach()
        update = ((zeta * w[:, None]).sum(0) + pull * zeta.mean(0)) / (1 + pull)
        torch.testing.assert_close(got.update, update)
        torch.testing.assert_close(got.weights @ zeta, update)


class SplitTiny(Tiny):
    """Tiny with per-sample losses, sample ids and a task missing labels on some samples."""

    def step(self, x, y, ids):
        inputs, _ = super().step(x, y)
        z = inputs.representation
        per_sample, valid = {}, {}
        for i, (t, h) in enumerate(self.heads.items()):
            ok = torch.ones(x.shape[0], dtype=torch.bool)
            if t == "b":
                ok[::3] = False  # task b is unlabelled on a third of the samples
            loss = ((h(z) - y[:, 2 * i:2 * i + 2]) ** 2).mean(1) * (i + 1)
            per_sample[t], valid[t] = torch.where(ok, loss, 0.0), ok
        losses = {t: per_sample[t].sum() / valid[t].sum() for t in per_sample}
        inputs.losses, inputs.sample_losses, inputs.valid, inputs.sample_ids = losses, per_sample, valid, ids
        return inputs, losses


class TwoIdenticalSummingRanks(TwoIdenticalRanks):
    def sum_(self, tensor):
        return tensor.mul_(2)


@pytest.mark.parametrize("ranks", [False, True])
@pytest.mark.parametrize("name", SPLIT)
def test_engine_serves_gradients_of_three_disjoint_parts(name, ranks):
    """Part k of step s holds the samples with (id + s) mod 3 = k; its gradient is that of the mean
    loss over the part's labelled samples, however the terms are weighted."""
    # float64: SDMGrad's 20 projected steps at lr 5 amplify float32 summation-order rounding to 1e-4.
    model = SplitTiny().double()
    x, y = (v.double() for v in _data())
    ids = torch.tensor([10, 4, 7, 3, 8, 0, 5])
    step, losses = model.step(x, y, ids)
    step.step = 5
    if ranks:
        step.ranks = TwoIdenticalSummingRanks()
    part = (ids + 5) % 3
    parts = []
    for k in range(3):
        rows = []
        for t in TASKS:
            keep = (part == k) & step.valid[t]
            mean = step.sample_losses[t][keep].sum() / keep.sum()
            grads = torch.autograd.grad(mean, step.shared_params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        parts.append(torch.stack(rows))
    parts = torch.stack(parts)
    whole = _per_task(losses, step.shared_params)
    ref = make(name, TASKS).aggregator.combine(GradientMatrix(whole, list(TASKS), torch.ones(3, dtype=DT), [1], parts))
    m = make(name, TASKS)
    report = m.backward(step)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in step.shared_params]), ref.update)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in step.task_params]),
                               _per_task(losses, step.task_params).sum(0))
    assert report.weights == pytest.approx(dict(zip(TASKS, ref.weights.tolist())), rel=1e-5)


@pytest.mark.parametrize("name", SPLIT)
def test_split_methods_need_the_trainers_per_sample_losses(name):
    model = Tiny()
    step, _ = model.step(*_data())
    with pytest.raises(HParamError, match="per-sample losses and sample ids"):
        make(name, TASKS).backward(step)
