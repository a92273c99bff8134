"""A sweep never waits forever: a Tune callback that ends a phase in which nothing progresses.

Progress is any trial event Tune sees (start, result, completion, error, restore). A trial whose Ray
Train workers wait for resources no node has (or that are held by a leaked placement group) sends
nothing: its Tune trial runs, but its Train controller waits for a placement group that stays
PENDING. After half the allowed time the watchdog says what the phase waits for; after all of it,
it raises :class:`SweepStalled`, which ends ``Tuner.fit`` (the experiment snapshot stays, so
``--resume`` continues once the cause is fixed).
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from ray.tune import Callback


class SweepStalled(RuntimeError):
    """Nothing progressed for the allowed time; the message says what the sweep waited for."""


#: Resources every node has that say nothing about why a request cannot be met.
_BOOKKEEPING_RESOURCES = ("node:", "memory", "object_store_memory", "accelerator_type:")


def resources_text(resources: Mapping[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith(_BOOKKEEPING_RESOURCES)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def largest_node() -> dict[str, float]:
    """Total resources of the alive node with the most CPUs (what one bundle can at most get)."""
    import ray
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return max(nodes, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})


def fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(node.get(key, 0.0) >= amount for key, amount in bundle.items() if amount > 0)


def no_node_fits(bundle: Mapping[str, float]) -> bool:
    """Whether no alive node of the cluster offers ``bundle`` at all, even when idle."""
    import ray
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return not any(fits(bundle, node) for node in nodes)


def describe_waiting() -> str:
    """What the cluster's pending placement groups ask for, against what its nodes offer."""
    import ray
    from ray.util import placement_group_table

    try:
        pending = [pg for pg in placement_group_table().values() if pg.get("state") in ("PENDING", "RESCHEDULING")]
        node = largest_node()
    except Exception as err:  # the state API is best effort here; the timeout is what matters
        return f"(the cluster's state could not be read: {type(err).__name__})"
    if not pending:
        return ("no placement group is pending, so the trials are not waiting for resources: a trial may be "
                "stuck, or one epoch takes longer than the allowed time")
    impossible = [pg for pg in pending if any(not fits(b, node) for b in pg["bundles"].values())]
    if impossible:
        bundle = next(b for b in impossible[0]["bundles"].values() if not fits(b, node))
        return (f"{len(pending)} placement group(s) pending, {len(impossible)} asking for "
                f"{resources_text(bundle)} per worker, which no node offers (largest node: "
                f"{resources_text(node)}); lower --cpus-per-trial/--gpus-per-trial or add such nodes")
    available = ray.available_resources()
    return (f"{len(pending)} placement group(s) pending for resources the cluster has but are in use (available "
            f"now: {resources_text(available)}); a stopped trial may not have released its workers")


class Watchdog(Callback):
    """Raises :class:`SweepStalled` from Tune's loop after ``timeout_s`` seconds without progress."""

    # Tune pickles its callbacks with the experiment, so this holds plain data only (Ray's workers
    # replace ``print``, and a stored reference to it no longer pickles).
    def __init__(self, phase: str, timeout_s: float) -> None:
        self.phase = phase
        self.timeout_s = timeout_s
        self.last_progress = time.monotonic()
        self.warned = False

    def _progress(self, **_: Any) -> None:
        self.last_progress = time.monotonic()
        self.warned = False

    on_trial_start = on_trial_result = on_trial_complete = on_trial_error = _progress
    on_trial_restore = on_trial_recover = _progress

    def setup(self, **info: Any) -> None:
        self._progress()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        idle = time.monotonic() - self.last_progress
        if idle < self.timeout_s / 2:
            return
        running = sum(1 for t in trials if t.status == "RUNNING")
        if idle >= self.timeout_s:
            raise SweepStalled(f"[{self.phase}] nothing progressed for {idle:.0f}s with {running} trial(s) "
                               f"running: {describe_waiting()}; then rerun with --resume "
                               f"(--stall-timeout sets the allowed time)")
        if not self.warned:
            self.warned = True
            print(f"[{self.phase}] no progress for {idle:.0f}s ({running} trial(s) running): "
                     f"{describe_waiting()}; giving up after {self.timeout_s:.0f}s", flush=True)
