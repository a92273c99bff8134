"""Data parallelism in the pure-PyTorch trainer: 2 gloo workers equal 1 process at the same global batch."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amtl.data.registry import build_datasets
from amtl.distributed import GlobalBatchSampler
from amtl.trainer import TrainConfig, Trainer

TASKS = ("segmentation", "depth", "normal")
POTENTIALS = {"segmentation": 0.5, "depth": 0.6, "normal": 0.4}


def config(balancer: str, **hparams) -> TrainConfig:
    return TrainConfig(tasks=TASKS, image_size=32, n_train=32, n_val=12, n_test=8, batch_size=16, epochs=2,
                       balancer=balancer, hparams=hparams, threads=1, log_every=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [
    ("ew", {}), ("gls", {}), ("amtl", {"potentials": POTENTIALS}), ("dwa", {}), ("uw", {}),
    ("mgda", {}), ("pcgrad", {}), ("amtl+cagrad", {"potentials": POTENTIALS}), ("imtl", {"source": "last"}),
]


def _worker(rank: int, world_size: int, port: int, cache: str, out: dict) -> None:
    """One process of a 2-rank gloo group that trains every case in turn (one spawn for all)."""
    import os
    os.environ["AMTL_CACHE_DIR"] = cache
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for balancer, hparams in CASES:
            trainer = Trainer(config(balancer, **hparams), None, progress=None)
            result = trainer.fit()
            if rank == 0:
                out[balancer] = {"params": [p.detach().clone() for p in trainer.model.parameters()],
                                 "val": result["val"], "weights": trainer.method.weights}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(_shared_render_cache) -> dict:
    build_datasets("scenes", TASKS, image_size=32, n_train=32, n_val=12, n_test=8)  # render once, here
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), str(_shared_render_cache), out), nprocs=2, join=True)
        return dict(out)


@pytest.mark.parametrize("balancer, hparams", CASES, ids=[c[0] for c in CASES])
def test_two_workers_follow_one_worker(balancer, hparams, two_workers):
    single = Trainer(config(balancer, **hparams), None, progress=None)
    single_result = single.fit()
    double = two_workers[balancer]
    # Summation order differs between 1 and 2 workers; Adam normalises near-zero gradients, so allow
    # 5% of one Adam step (lr 2e-3) per parameter after 4 steps.
    for a, b in zip(single.model.parameters(), double["params"]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-3, atol=1e-4)
    assert double["val"] == pytest.approx(single_result["val"], rel=1e-4, abs=1e-5)
    # Iterative aggregator solves (CAGrad, Nash) amplify float differences a little.
    assert double["weights"] == pytest.approx(single.method.weights, rel=1e-3, abs=1e-4)


def test_global_batch_sampler_slices_the_single_process_batches():
    single = list(GlobalBatchSampler(10, 4, seed=3, epoch=1))
    ranks = [list(GlobalBatchSampler(10, 4, rank=r, world_size=2, seed=3, epoch=1)) for r in range(2)]
    assert len(single) == 2 and all(len(r) == 2 for r in ranks)
    for b, batch in enumerate(single):
        assert ranks[0][b] + ranks[1][b] == batch
    assert list(GlobalBatchSampler(10, 4, seed=3, epoch=2)) != single
