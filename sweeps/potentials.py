"""Single-task potentials: AMTL's potentials and the Delta-m baselines, computed once and reused.

Before a multi-task sweep, one single-task trial per task (same data, model and budget) runs as its
own Tune experiment. Each task's best validation KPI becomes its *potential*; the single-task val and
test metrics become the Delta-m baselines. Rows live in ``<storage>/potentials.parquet`` keyed by a
fingerprint of dataset, model, tasks and budget, so later sweeps reuse them. On the partially
annotated dataset (``partial``) each task's single-task model trains and validates on that task's
own source, and the fingerprint names the source.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from amtl.options import names_with
from amtl.trainer import TrainConfig
from sweeps.storage import Storage

FILE = "potentials.parquet"
#: Training options that change what a single-task model can reach (the fingerprint's content).
FINGERPRINT_FIELDS = names_with(TrainConfig, "fingerprint")


class PotentialsError(ValueError):
    """The potentials file is unreadable or does not fit this sweep."""


@dataclass
class Potentials:
    """Per-task potentials and the single-task baselines of one fingerprint."""

    fingerprint: str
    potentials: dict[str, float]           # task -> best val KPI of its single-task model
    baselines: dict[str, dict[str, float]]  # "val"/"test" -> {"task/metric": value}

    def as_spec(self) -> dict[str, Any]:
        return {"potentials": self.potentials, "baselines": self.baselines}


def fingerprint(train: Mapping[str, Any], task: str) -> str:
    """Identity of a single-task run: the data, model and budget it was trained with."""
    content = {k: train.get(k) for k in FINGERPRINT_FIELDS}
    content["task"] = task
    if train.get("dataset") == "partial":
        # On the partially annotated dataset a single-task run trains on its task's own source only
        # (e.g. depth on the depth source); name that source's data so a change to it is a new key.
        from amtl.data.partial import source_identity
        content["source"] = source_identity(task, train.get("data_root"), train["image_size"], train["n_train"],
                                            train["n_val"], train["n_test"], train.get("data_seed", 0))
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load(storage: Storage, train: Mapping[str, Any], tasks: Sequence[str]) -> tuple[Potentials | None, list[str]]:
    """Cached potentials for ``tasks`` and the list of tasks still missing."""
    if not storage.exists(FILE):
        return None, list(tasks)
    frame = read_frame(storage)
    found, missing = {}, []
    for task in tasks:
        rows = frame[frame["fingerprint"] == fingerprint(train, task)]
        if rows.empty:
            missing.append(task)
        else:
            found[task] = rows.iloc[-1]
    if missing:
        return None, missing
    return assemble(found, train, tasks), []


def read_frame(storage: Storage) -> pd.DataFrame:
    try:
        frame = storage.read_parquet(FILE)
    except Exception as err:  # pyarrow raises many types for a corrupt file
        raise PotentialsError(f"potentials file '{storage.uri_of(FILE)}' is unreadable ({err.__class__.__name__}); "
                              f"delete it or pass --recompute-potentials") from None
    required = {"fingerprint", "task", "potential"}
    if not required <= set(frame.columns):
        raise PotentialsError(f"potentials file '{storage.uri_of(FILE)}' lacks columns "
                              f"{sorted(required - set(frame.columns))}; delete it or pass --recompute-potentials")
    return frame


def check(storage: Storage, train: Mapping[str, Any], tasks: Sequence[str]) -> None:
    """Raise :class:`PotentialsError` when the cached rows this sweep would reuse are unusable."""
    frame = read_frame(storage)
    for task in tasks:
        rows = frame[frame["fingerprint"] == fingerprint(train, task)]
        if not rows.empty and not (pd.api.types.is_number(rows.iloc[-1]["potential"])
                                   and 0 < float(rows.iloc[-1]["potential"]) < float("inf")):
            raise PotentialsError(f"potentials file '{storage.uri_of(FILE)}' holds potential "
                                  f"{rows.iloc[-1]['potential']!r} for task '{task}', not a positive number; "
                                  f"delete it or pass --recompute-potentials")


def assemble(rows: Mapping[str, pd.Series], train: Mapping[str, Any], tasks: Sequence[str]) -> Potentials:
    potentials, baselines = {}, {"val": {}, "test": {}}
    for task in tasks:
        row = rows[task]
        potentials[task] = float(row["potential"])
        for split in ("val", "test"):
            prefix = f"{split}/{task}/"
            for column, value in row.items():
                if isinstance(column, str) and column.startswith(prefix) and pd.notna(value):
                    baselines[split][column[len(split) + 1:]] = float(value)
    fp = hashlib.sha256("".join(fingerprint(train, t) for t in tasks).encode()).hexdigest()[:16]
    return Potentials(fp, potentials, baselines)


def check_usable(result: Potentials) -> None:
    """AMTL divides KPIs by the potentials and Delta-m divides by the baselines: none may be 0.

    A single-task model that learned nothing in the budget (e.g. detection mAP 0 after one tiny
    epoch) would otherwise fail every later trial with a less helpful error.
    """
    zero = [f"potential of {t}" for t, p in result.potentials.items() if not p > 0]
    zero += [f"{split}/{k}" for split, values in result.baselines.items() for k, v in values.items() if v == 0]
    if zero:
        raise PotentialsError(f"single-task result(s) are 0 ({', '.join(zero)}), but AMTL and Delta-m divide by "
                              f"them; give the single-task models more to learn (raise --epochs or --n-train), "
                              f"or drop that task")


def save(storage: Storage, train: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
         say: Callable[[str], None] = print) -> None:
    """Add (or replace) rows ``{"task", "potential", "val/<task>/<metric>", ...}``.

    An existing file that cannot be read (``--recompute-potentials`` was passed for it) is moved
    aside, not overwritten: it may be the only copy of other sweeps' single-task results.
    """
    new = pd.DataFrame([{**row, "fingerprint": fingerprint(train, row["task"])} for row in rows])
    if storage.exists(FILE):
        try:
            old = read_frame(storage)
        except PotentialsError:
            aside = set_aside(storage)
            say(f"[potentials] '{storage.uri_of(FILE)}' was unreadable: moved it to '{aside}' (delete that "
                f"when you no longer need it) and saved the new single-task results in its place")
        else:
            old = old[~old["fingerprint"].isin(new["fingerprint"])]
            new = pd.concat([old, new], ignore_index=True)
    storage.write_parquet(new, FILE)


def set_aside(storage: Storage) -> str:
    """Rename the potentials file to ``potentials.parquet.corrupt-<UTC time>``; returns its new URI."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, n = f"{FILE}.corrupt-{stamp}", 1
    while storage.exists(name):  # two in one second: never replace an earlier one
        name, n = f"{FILE}.corrupt-{stamp}-{n}", n + 1
    storage.fs.move(storage.path(FILE), storage.path(name))
    return storage.uri_of(name)
