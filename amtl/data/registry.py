"""Datasets by name: ``register_dataset`` (built-ins and plugins alike) and ``build_datasets``.

Validation is always a split of its own, separate from test: balancers that read KPIs (AMTL, DTP)
read them from val, never from test (the official AMTL code reads test).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from torch.utils.data import Dataset, Subset

from amtl.data.partial import TASKS as PARTIAL_TASKS
from amtl.registry import Registry

SCENE_TASKS = ("segmentation", "depth", "normal", "detection")
NYU_TASKS = ("segmentation", "depth", "normal")
#: NYUv2's Delta-m in the literature (CAGrad, Nash-MTL, LibMTL, IMTL): 9 metrics; depth/delta1 is
#: reported but left out, or every Delta-m would differ from the published tables.
NYU_DELTA_M = ("segmentation/miou", "segmentation/pixel_acc", "depth/abs_err", "depth/rel_err",
               "normal/mean_angle", "normal/median_angle", "normal/within_11.25", "normal/within_22.5",
               "normal/within_30")
#: Fraction of NYUv2's on-disk train split held out as val; its on-disk val split serves as test.
NYU_VAL_FRACTION = 0.1
VOC_TASKS = ("segmentation", "detection")
#: Fraction of VOC's on-disk val list held out as test (VOC's own test labels are not public);
#: the rest is val, so KPIs and test metrics come from disjoint images.
VOC_TEST_FRACTION = 0.5


class DatasetConfigError(ValueError):
    """A dataset name, path or option is invalid."""


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    num_instances: int  # number of distinct training ``index`` values (instance-level methods)
    tasks: tuple[str, ...]  # tasks this dataset can label
    num_detection_classes: int = 0  # number of object classes of the detection task (0: none)


@dataclass(frozen=True)
class DataOptions:
    """What a dataset builder is told besides the tasks (the training options of the same names)."""

    root: str | Path | None = None  # --data-root
    image_size: int = 64
    n_train: int = 3000             # rendered or generated datasets: how many samples per split
    n_val: int = 500
    n_test: int = 500
    seed: int = 0                   # --data-seed: which generated dataset
    cache_dir: str | Path | None = None
    augment: bool = False


#: ``build(tasks, options) -> DataSplits``; ``tasks`` are checked against the declared ones first.
DatasetBuilder = Callable[[tuple[str, ...], DataOptions], DataSplits]


@dataclass(frozen=True)
class DatasetEntry:
    build: DatasetBuilder
    tasks: tuple[str, ...] = field(default=())  # the tasks it can label
    #: "task/metric" names its standard protocol averages in Delta-m (None: every metric of every task)
    delta_m_metrics: tuple[str, ...] | None = None


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(name: str, build: DatasetBuilder, tasks: Sequence[str],
                     delta_m_metrics: Sequence[str] | None = None) -> DatasetBuilder:
    """Register ``build(tasks, options: DataOptions) -> DataSplits`` under ``name``; ``tasks`` are the
    task names it can label (a sweep checks ``--tasks`` against them before anything starts).

    ``delta_m_metrics`` (``"task/metric"`` names) is the metric set of the dataset's standard
    protocol, so Delta-m compares with published tables; other metrics are reported but stay out of
    it. None: every metric of every task counts."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"dataset '{name}': declare the tasks it labels as a list of names")
    if delta_m_metrics is not None and (isinstance(delta_m_metrics, str) or not delta_m_metrics
                                        or not all("/" in m for m in delta_m_metrics)):
        raise ValueError(f"dataset '{name}': declare delta_m_metrics as a list of 'task/metric' names")
    DATASETS.add(name, DatasetEntry(build, tuple(tasks), tuple(delta_m_metrics) if delta_m_metrics else None))
    return build


def delta_m_directions(dataset: str, directions: Mapping[str, bool]) -> dict[str, bool]:
    """The metrics of ``directions`` (``{"task/metric": higher_is_better}``) that enter Delta-m on
    ``dataset``: its protocol's set where it declares one, else all of them."""
    protocol = DATASETS.get(dataset).delta_m_metrics
    return dict(directions) if protocol is None else {k: v for k, v in directions.items() if k in protocol}


def dataset_tasks(name: str) -> tuple[str, ...]:
    """The tasks dataset ``name`` can label (UnknownNameError when there is no such dataset)."""
    return DATASETS.get(name).tasks


def build_datasets(name: str, tasks: Sequence[str], root: str | Path | None = None, image_size: int = 64,
                   n_train: int = 3000, n_val: int = 500, n_test: int = 500, seed: int = 0,
                   cache_dir: str | Path | None = None, augment: bool = False) -> DataSplits:
    tasks = tuple(tasks)
    check_tasks(name, tasks, dataset_tasks(name))
    options = DataOptions(root, image_size, n_train, n_val, n_test, seed, cache_dir, augment)
    data = DATASETS.get(name).build(tasks, options)
    if not isinstance(data, DataSplits):
        raise DatasetConfigError(f"dataset '{name}': its builder returned {type(data).__name__}; return a "
                                 f"DataSplits(train, val, test, ...)")
    return data


def _scenes(tasks: tuple[str, ...], o: DataOptions) -> DataSplits:
    from amtl.data.scenes import SceneConfig, SceneDataset
    config = SceneConfig(size=o.image_size, seed=o.seed, n_train=o.n_train, n_val=o.n_val, n_test=o.n_test)
    train, val, test = (SceneDataset(s, config, tasks=tasks, cache_dir=o.cache_dir) for s in ("train", "val", "test"))
    return DataSplits(train, val, test, train.num_classes, len(train), SCENE_TASKS,
                      num_detection_classes=len(train.detection_classes))


def _nyuv2(tasks: tuple[str, ...], o: DataOptions) -> DataSplits:
    from amtl.data.nyuv2 import NYUv2
    if o.root is None:
        raise DatasetConfigError("dataset 'nyuv2' needs a data root; pass --data-root DIR")
    full_train = NYUv2(o.root, "train", tasks=tasks, augment=o.augment, seed=o.seed)
    plain_train = NYUv2(o.root, "train", tasks=tasks, augment=False, seed=o.seed)
    n = len(full_train)
    n_held = max(1, int(round(n * NYU_VAL_FRACTION)))
    if n - n_held < 1:
        raise DatasetConfigError(f"NYUv2 train split at '{o.root}' has {n} images; need at least 2")
    train = Subset(full_train, range(n - n_held))
    val = Subset(plain_train, range(n - n_held, n))
    test = NYUv2(o.root, "val", tasks=tasks, augment=False, seed=o.seed)
    return DataSplits(train, val, test, full_train.num_classes, n, NYU_TASKS)


def _voc(tasks: tuple[str, ...], o: DataOptions) -> DataSplits:
    from amtl.data.voc import VOC
    if o.root is None:
        raise DatasetConfigError("dataset 'voc' needs a data root (the folder holding VOCdevkit); "
                                 "pass --data-root DIR")
    train = VOC(o.root, "train", tasks=tasks, size=o.image_size)
    full_val = VOC(o.root, "val", tasks=tasks, size=o.image_size)
    n = len(full_val)
    n_test = int(round(n * VOC_TEST_FRACTION))
    if n - n_test < 1 or n_test < 1:
        raise DatasetConfigError(f"VOC val list at '{o.root}' has {n} images; need at least 2 "
                                 "(half is val, half is test)")
    val, test = Subset(full_val, range(n - n_test)), Subset(full_val, range(n - n_test, n))
    return DataSplits(train, val, test, train.num_classes, len(train), VOC_TASKS,
                      num_detection_classes=len(train.detection_classes))


def _partial(tasks: tuple[str, ...], o: DataOptions) -> DataSplits:
    # rendered scene sources, or VOC + NYUv2 with a root; see amtl/data/partial.py
    from amtl.data.partial import build_partial
    return build_partial(tasks, o.root, o.image_size, o.n_train, o.n_val, o.n_test, o.seed, o.cache_dir, o.augment)


def check_tasks(name: str, tasks: Sequence[str], available: Sequence[str]) -> None:
    if not tasks:
        raise DatasetConfigError("no tasks given; pass e.g. --tasks segmentation,depth,normal")
    lacking = [t for t in tasks if t not in available]
    if lacking:
        raise DatasetConfigError(f"dataset '{name}' has no labels for task(s) {', '.join(lacking)} "
                                 f"(it has: {', '.join(available)})")


register_dataset("scenes", _scenes, SCENE_TASKS)
register_dataset("nyuv2", _nyuv2, NYU_TASKS, NYU_DELTA_M)
register_dataset("voc", _voc, VOC_TASKS)
register_dataset("partial", _partial, PARTIAL_TASKS)
