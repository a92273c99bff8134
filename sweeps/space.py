"""Search spaces as data: YAML files validated against the balancer registry, sampled by Optuna.

``sweeps/search_spaces/<method>.yaml`` holds one method's hyperparameter distributions, ``all.yaml`` the
method list of ``--method all`` and the trainer options searched for every method (``shared``).
:func:`load_space` reads and validates them (every mistake is one :class:`SpaceError` line naming
the file, the key and the fix); :meth:`SearchSpace.define_by_run` is the conditional Optuna space:
it picks a method, then suggests only that method's hyperparameters, then the shared ones.

Method hyperparameters get Optuna names ``"<method>:<hparam>"`` so that TPE models ``amtl``'s
``focusing`` and ``dtp``'s ``focusing`` separately; :func:`split_config` is the one place that
strips the prefix again. Registry names are never renamed (``focusing`` stays ``focusing``).
See ``sweeps/search_spaces/README.md`` for the file format.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from amtl.balancers import HParam, HParamError, component, hparam_specs
from amtl.trainer import OPTIMIZERS, SCHEDULES, TrainConfig

if TYPE_CHECKING:  # Ray Tune is imported only when a searcher is built (it is slow to import)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

SPACE_DIR = Path(__file__).resolve().parent / "search_spaces"  # package data: found in a wheel install too
ALL = "all"
METHOD_KEY = "method"
SEP = ":"  # "<method>:<hparam>"; no method or hparam name contains it
SHARED_MARK = "@"  # "<method>:@<option>": a shared trainer option searched for that method alone

DISTRIBUTIONS = ("uniform", "loguniform", "int", "categorical")
_SPEC_KEYS = {
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
}
# Which distributions fit which hyperparameter kind. A float hyperparameter is not searched on an
# integer grid (say so with categorical choices instead); str/bool values have no order to sample.
_KINDS = {
    "float": ("uniform", "loguniform", "categorical"),
    "int": ("int", "categorical"),
    "str": ("categorical",),
    "bool": ("categorical",),
}
_NEVER_SEARCHED = {
    "potentials": "potentials come from the upstream single-task trials, they are not searched; remove it",
    "seed": "seeds are set per trial, not searched; remove it",
}


def _train_default(name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


#: Trainer options a space may search for every method (``searchable`` in TrainConfig's metadata),
#: declared like balancer hyperparameters, with the bounds a search may use.
#: ``epochs``/``steps_per_epoch`` are left out on purpose: the budget is the same for every method
#: in a fair comparison. ``seed`` is never searched.
SHARED_HPARAMS: dict[str, HParam] = {h.name: h for h in (
    HParam("lr", "float", _train_default("lr"), low=1e-7, high=1.0, log=True),
    HParam("weight_decay", "float", _train_default("weight_decay"), low=0.0, high=1.0),
    HParam("batch_size", "int", _train_default("batch_size"), low=1, high=4096),
    HParam("optimizer", "str", _train_default("optimizer"), choices=OPTIMIZERS),
    HParam("schedule", "str", _train_default("schedule"), choices=SCHEDULES),
    HParam("augment", "bool", _train_default("augment")),
)}


class SpaceError(ValueError):
    """A search space file is invalid; the one-line message names the file, the key and the fix."""

    def __init__(self, where: str | Path, key: str | None, problem: str) -> None:
        at = f"{where}: {key}: " if key else f"{where}: "
        super().__init__(" ".join(f"{at}{problem}".split()))  # one line, whatever the parts hold


# ---------------------------------------------------------------------------------------------
# YAML reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.2), not as the string PyYAML 1.1 makes it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping; malformed YAML is reported with its line."""
    try:
        text = path.read_text(encoding="utf-8")  # YAML is UTF-8 here, whatever the locale says
    except OSError as e:
        raise SpaceError(path, None, f"cannot read the file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise SpaceError(path, None, f"is not UTF-8 text (byte 0x{e.object[e.start]:02x} at line {line}); "
                                     f"write it as UTF-8 (e.g. with iconv -t UTF-8)") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpaceError(path, None, f"malformed YAML{line}: {problem}; fix the syntax there") from None
    if not isinstance(data, dict):
        raise SpaceError(path, None, "expected a mapping with 'method' and 'params' (a method file) or "
                                     f"'methods'/'shared'/'params_by_method' (a sweep file), got "
                                     f"{type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# One distribution


@dataclass(frozen=True)
class Dist:
    """One searched value: ``uniform``/``loguniform`` (floats), ``int`` or ``categorical``.

    ``log`` is true for ``loguniform`` and for log-scale ``int`` ranges.
    """

    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int = 1
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: "optuna.Trial", name: str) -> Any:
        if self.distribution == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.distribution == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=self.step, log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)

    def optuna(self) -> "optuna.distributions.BaseDistribution":
        """Optuna's object for the same distribution (a study rebuilt from stored trials uses it)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        if self.distribution == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.distribution == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=self.step)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` could have been suggested (used by tests and sanity checks)."""
        if self.distribution == "categorical":
            return value in self.choices
        return self.low <= value <= self.high


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_dist(spec: Any, h: HParam, where: str | Path, key: str) -> Dist:
    """Validate one ``{distribution: ..., ...}`` entry for hyperparameter ``h``."""
    if h.name in _NEVER_SEARCHED:
        raise SpaceError(where, key, _NEVER_SEARCHED[h.name])
    if h.kind == "mapping":
        raise SpaceError(where, key, "is a {task: value} mapping and cannot be searched; remove it")
    if not isinstance(spec, dict):
        raise SpaceError(where, key, f"expected a mapping like {{distribution: uniform, low: 0.0, high: 1.0}}, "
                                     f"got {spec!r}")
    kind = spec.get("distribution")
    if kind is None:
        raise SpaceError(where, key, f"missing 'distribution' (one of {', '.join(DISTRIBUTIONS)})")
    if kind not in DISTRIBUTIONS:
        raise SpaceError(where, f"{key}.distribution",
                         f"unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    extra = sorted(set(spec) - {"distribution", *_SPEC_KEYS[kind]})
    if extra:
        raise SpaceError(where, key, f"unknown key(s) {', '.join(map(repr, extra))} for a {kind} distribution "
                                     f"(allowed: {', '.join(_SPEC_KEYS[kind])})")
    if kind not in _KINDS[h.kind]:
        fix = ("list the values with {distribution: categorical, choices: [...]}" if h.kind != "int"
               else "use distribution int or categorical")
        raise SpaceError(where, f"{key}.distribution", f"{h.kind} hyperparameter '{h.name}' cannot take "
                                                       f"{'an' if kind == 'int' else 'a'} {kind} distribution; {fix}")
    if kind == "categorical":
        return _parse_choices(spec, h, where, key)
    if h.choices is not None:  # e.g. cagrad's rescale: only some integers mean something
        raise SpaceError(where, f"{key}.distribution", f"'{h.name}' takes only the values {list(h.choices)}; "
                                                       f"use {{distribution: categorical, choices: [...]}}")

    bounds = {}
    for side in ("low", "high"):
        if side not in spec:
            raise SpaceError(where, key, f"a {kind} distribution needs 'low' and 'high'; add '{side}'")
        value = spec[side]
        if not _number(value) or (kind == "int" and int(value) != value):
            want = "an integer" if kind == "int" else "a finite number"
            raise SpaceError(where, f"{key}.{side}", f"must be {want}, got {value!r}")
        bounds[side] = int(value) if kind == "int" else float(value)
    low, high = bounds["low"], bounds["high"]
    if low >= high:
        raise SpaceError(where, key, f"empty range: low {low} must be below high {high} "
                                     f"(to fix one value use {{distribution: categorical, choices: [{low}]}})")
    log = kind == "loguniform" or bool(spec.get("log", False))
    if not isinstance(spec.get("log", False), bool):
        raise SpaceError(where, f"{key}.log", f"must be true or false, got {spec['log']!r}")
    if log and low <= 0:
        raise SpaceError(where, f"{key}.low", f"a log-scale range must stay above 0, got low {low}; "
                                              "raise low or use uniform")
    if h.low is not None and low < h.low or h.high is not None and high > h.high:
        valid = f"[{'-inf' if h.low is None else h.low}, {'inf' if h.high is None else h.high}]"
        raise SpaceError(where, key, f"range [{low}, {high}] leaves the valid range {valid} of '{h.name}'; "
                                     "narrow it")
    step = spec.get("step", 1)
    if kind == "int":
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise SpaceError(where, f"{key}.step", f"must be a positive integer, got {step!r}")
        if log and step != 1:
            raise SpaceError(where, f"{key}.step", "log-scale int ranges need step 1 (Optuna); drop step or log")
        if (high - low) % step:
            raise SpaceError(where, f"{key}.step", f"high - low = {high - low} is not a multiple of step {step}; "
                                                   "adjust high")
    return Dist(kind, low=low, high=high, log=log, step=step)


def _parse_choices(spec: dict, h: HParam, where: str | Path, key: str) -> Dist:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise SpaceError(where, f"{key}.choices", f"must be a non-empty list, got {choices!r}")
    valid = []
    for value in choices:
        try:
            valid.append(h.validate(value))
        except HParamError as e:
            raise SpaceError(where, f"{key}.choices", f"{e}; fix or drop that choice") from None
    if len(set(map(repr, valid))) != len(valid):
        raise SpaceError(where, f"{key}.choices", f"lists a value twice: {choices!r}")
    return Dist("categorical", choices=tuple(valid))


def _parse_params(params: Any, specs: Mapping[str, HParam], method: str, where: str | Path,
                  key: str) -> dict[str, Dist]:
    """A ``{hparam: distribution}`` map for ``method``, checked against its registry specs."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise SpaceError(where, key, f"expected a mapping {{hparam: distribution}}, got {params!r}")
    out = {}
    for name, spec in params.items():
        if name not in specs:
            if name in _NEVER_SEARCHED:
                raise SpaceError(where, f"{key}.{name}", _NEVER_SEARCHED[name])
            valid = ", ".join(n for n in specs if n not in _NEVER_SEARCHED and specs[n].kind != "mapping")
            raise SpaceError(where, f"{key}.{name}", f"'{method}' has no hyperparameter '{name}' "
                                                     f"(searchable: {valid or 'none'})")
        out[name] = _parse_dist(spec, specs[name], where, f"{key}.{name}")
    return out


def _parse_shared(shared: Any, where: str | Path) -> dict[str, Dist]:
    if shared is None:
        return {}
    if not isinstance(shared, dict):
        raise SpaceError(where, "shared", f"expected a mapping {{trainer option: distribution}}, got {shared!r}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for name, spec in shared.items():
        if name not in SHARED_HPARAMS:
            if name in _NEVER_SEARCHED:
                problem = _NEVER_SEARCHED[name]
            elif name in fields:
                problem = (f"'{name}' is a training option but not searched here (a fair sweep fixes it); "
                           f"searchable: {', '.join(SHARED_HPARAMS)}")
            else:
                problem = f"'{name}' is not a training option; searchable: {', '.join(SHARED_HPARAMS)}"
            raise SpaceError(where, f"shared.{name}", problem)
        out[name] = _parse_dist(spec, SHARED_HPARAMS[name], where, f"shared.{name}")
    return out


def _method_specs(method: Any, where: str | Path, key: str) -> tuple[str, dict[str, HParam]]:
    """The normalised method name and its registry specs; unknown names are a SpaceError."""
    if not isinstance(method, str) or not method.strip():
        raise SpaceError(where, key, f"expected a method name, got {method!r}")
    name = method.strip().lower()
    try:
        return name, hparam_specs(name)
    except HParamError as e:
        raise SpaceError(where, key, f"{e}") from None


# ---------------------------------------------------------------------------------------------
# Files


@dataclass
class _SweepFile:
    """What a sweep file (``all.yaml`` or ``--space FILE``) says; ``None``: it does not say."""

    methods: list[str] | None = None
    shared: dict[str, Dist] | None = None
    params_by_method: dict[str, dict[str, Dist]] = dataclasses.field(default_factory=dict)


def _read_method_file(path: Path, expected: str | None, allow_shared: bool) -> tuple[str, dict[str, Dist],
                                                                                     dict[str, Dist] | None]:
    """A single-method file: ``method``, ``params`` (and ``shared`` when it is a ``--space`` file)."""
    data = _read_yaml(path)
    allowed = {"method", "params"} | ({"shared"} if allow_shared else set())
    extra = sorted(set(data) - allowed)
    if extra:
        fix = "'shared' belongs in all.yaml" if "shared" in extra else f"allowed: {', '.join(sorted(allowed))}"
        raise SpaceError(path, extra[0], f"unknown top-level key in a method file ({fix})")
    if "method" not in data:
        raise SpaceError(path, "method", "missing; add 'method: <name>' naming the balancer")
    method, specs = _method_specs(data["method"], path, "method")
    if expected is not None and method != expected:
        raise SpaceError(path, "method", f"says '{method}' but the file is for '{expected}'; "
                                         f"write 'method: {expected}' or rename the file")
    params = _parse_params(data.get("params"), specs, method, path, "params")
    shared = _parse_shared(data["shared"], path) if "shared" in data else None
    return method, params, shared


def _read_sweep_file(path: Path) -> _SweepFile:
    """``all.yaml`` or a ``--space`` file, in either form (a method file becomes a one-method sweep)."""
    data = _read_yaml(path)
    if "method" in data:
        if {"methods", "params_by_method"} & set(data):
            raise SpaceError(path, "method", "a file holds either 'method' + 'params' or "
                                             "'methods'/'params_by_method', not both")
        method, params, shared = _read_method_file(path, None, allow_shared=True)
        return _SweepFile([method], shared, {method: params})
    extra = sorted(set(data) - {"methods", "shared", "params_by_method"})
    if extra:
        raise SpaceError(path, extra[0], "unknown top-level key (allowed: methods, shared, params_by_method; "
                                         "or method + params for one method)")
    out = _SweepFile()
    if "methods" in data:
        methods = data["methods"]
        if not isinstance(methods, list) or not methods:
            raise SpaceError(path, "methods", f"must be a non-empty list of method names, got {methods!r}")
        out.methods = [_method_specs(m, path, f"methods[{i}]")[0] for i, m in enumerate(methods)]
        twice = sorted({m for m in out.methods if out.methods.count(m) > 1})
        if twice:
            raise SpaceError(path, "methods", f"lists {', '.join(twice)} more than once; drop the repeat")
    if "shared" in data:
        out.shared = _parse_shared(data["shared"], path)
    by_method = data.get("params_by_method") or {}
    if not isinstance(by_method, dict):
        raise SpaceError(path, "params_by_method", f"expected a mapping {{method: {{hparam: distribution}}}}, "
                                                   f"got {by_method!r}")
    for raw, params in by_method.items():
        method, specs = _method_specs(raw, path, f"params_by_method.{raw}")
        out.params_by_method[method] = _parse_params(params, specs, method, path, f"params_by_method.{raw}")
    return out


def _method_file_params(method: str, space_dir: Path) -> dict[str, Dist]:
    """A method's distributions from ``space_dir``; ``a+b`` is the union of ``a.yaml`` and ``b.yaml``."""
    parts = method.split("+") if "+" in method else [method]
    merged: dict[str, Dist] = {}
    origin: dict[str, Path] = {}
    for part in parts:
        path = space_dir / f"{part}.yaml"
        if path.is_file():
            _, params, _ = _read_method_file(path, part, allow_shared=False)
        elif _from_plugin(part):
            params = declared_params(part)
        else:
            raise SpaceError(path, None, f"no search space file for '{part}'; create it with 'method: {part}' "
                                         "and 'params: {}' to search nothing")
        for name, dist in params.items():
            if name in merged and merged[name] != dist:
                raise SpaceError(path, f"params.{name}", f"also searched, differently, in {origin[name]}; "
                                                         f"give '{method}' its own entry in a --space file")
            merged[name], origin[name] = dist, path
    return merged


def _from_plugin(name: str) -> bool:
    """Whether a weighting or aggregator came from user code rather than ``amtl.balancers``."""
    cls = component(name)
    return cls is not None and not cls.__module__.startswith("amtl.")


def declared_params(name: str) -> dict[str, Dist]:
    """The search space a plugin's balancer declares by its :class:`HParam` ranges (used when it has
    no search-space file): numbers over ``[low, high]`` on their declared scale, choices and
    booleans over their values. Hyperparameters with an open range are left at their default."""
    out: dict[str, Dist] = {}
    for h in component(name).hparams:
        if h.choices is not None:
            out[h.name] = Dist("categorical", choices=tuple(h.choices))
        elif h.kind == "bool":
            out[h.name] = Dist("categorical", choices=(True, False))
        elif (h.kind in ("float", "int") and h.low is not None and h.high is not None
              and math.isfinite(h.low) and math.isfinite(h.high) and h.low < h.high):
            if h.kind == "int":
                out[h.name] = Dist("int", int(h.low), int(h.high), log=h.log)
            elif not h.log or h.low > 0:
                out[h.name] = Dist("loguniform" if h.log else "uniform", float(h.low), float(h.high), log=h.log)
    return out


# ---------------------------------------------------------------------------------------------
# The space


@dataclass(frozen=True)
class SearchSpace:
    """Methods to compare, each method's distributions, and the trainer options searched for all.

    ``per_method`` (the default search): the methods take turns by Optuna trial number, so each gets
    the same number of trials, and each searches its own copy of the shared options (``ew:@lr``), so
    TPE models every method apart. Otherwise (``--search joint``) the method is one more categorical
    and TPE spends the trials where it first got lucky.
    """

    methods: tuple[str, ...]
    params: Mapping[str, Mapping[str, Dist]]
    shared: Mapping[str, Dist]
    per_method: bool = False

    def method_of(self, trial: "optuna.Trial") -> str:
        if len(self.methods) == 1:
            return self.methods[0]
        if self.per_method:
            return self.methods[trial.number % len(self.methods)]
        return trial.suggest_categorical(METHOD_KEY, list(self.methods))

    def define_by_run(self, trial: "optuna.Trial") -> dict[str, Any]:
        """Optuna define-by-run space: method, then only its hyperparameters, then shared options.

        Returns the constants Ray Tune adds to the config: ``{"method": <chosen>}`` (the method is
        suggested only in a joint search with a choice).
        """
        method = self.method_of(trial)
        # Recorded in the study too, so a study read back from storage names every trial's method.
        trial.set_user_attr(METHOD_KEY, method)
        for name, dist in self.params[method].items():
            dist.suggest(trial, qualify(method, name))
        for name, dist in self.shared.items():
            dist.suggest(trial, self.shared_name(method, name))
        return {METHOD_KEY: method}

    def shared_name(self, method: str, option: str) -> str:
        """Optuna name of a shared trainer option in a trial of ``method``."""
        return f"{method}{SEP}{SHARED_MARK}{option}" if self.per_method and len(self.methods) > 1 else option

    def optuna_names(self, method: str) -> set[str]:
        """Every Optuna parameter name a trial of ``method`` gets (``method`` when it is a choice)."""
        chosen = {METHOD_KEY} if len(self.methods) > 1 and not self.per_method else set()
        return (chosen | {qualify(method, n) for n in self.params[method]}
                | {self.shared_name(method, n) for n in self.shared})


def qualify(method: str, hparam: str) -> str:
    """Optuna name of a method hyperparameter: ``amtl`` + ``focusing`` -> ``"amtl:focusing"``."""
    return f"{method}{SEP}{hparam}"


def split_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A Tune config -> ``(method, hparams by registry name, shared trainer options)``.

    Qualified keys ``"<method>:<name>"`` are the chosen method's hyperparameters, ``"<method>:@<option>"``
    its own copy of a shared trainer option (per-method search); every other key except ``method`` is
    passed on as a trainer option (constants the caller added included).
    """
    if METHOD_KEY not in config:
        raise ValueError(f"config has no '{METHOD_KEY}' key: {sorted(config)}")
    method = config[METHOD_KEY]
    hparams: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for key, value in config.items():
        if key == METHOD_KEY:
            continue
        owner, sep, name = key.rpartition(SEP)
        if not sep:
            shared[key] = value
        elif owner == method and name.startswith(SHARED_MARK):  # a per-method search's own copy
            shared[name[len(SHARED_MARK):]] = value
        elif owner == method:
            hparams[name] = value
        else:  # define_by_run never does this; a hand-written config might
            raise ValueError(f"config key '{key}' belongs to '{owner}', but the trial's method is '{method}'")
    return method, hparams, shared


def load_space(methods: Sequence[str], space_file: Path | None = None,
               space_dir: Path = SPACE_DIR) -> SearchSpace:
    """Read and validate the search space of a sweep over ``methods``.

    ``["all"]`` expands to the ``methods`` list of ``space_file`` if it has one, else of
    ``all.yaml``; ``[]`` means the methods ``space_file`` names. What ``space_file`` holds wins:
    its ``shared`` replaces ``all.yaml``'s, its entry for a method replaces that method's file.
    Every entry of ``space_file`` is validated, used or not.
    """
    space_dir = Path(space_dir)
    base = _read_sweep_file(space_dir / f"{ALL}.yaml")
    override = _read_sweep_file(Path(space_file)) if space_file is not None else _SweepFile()
    where = space_file if space_file is not None else "--method"

    chosen: list[str] = []
    requested = [m.strip().lower() for m in methods if m.strip()]
    if not requested:
        if override.methods is None:
            raise SpaceError(where, "methods", "no methods given; pass --method NAME[,NAME...] or 'all'")
        requested = list(override.methods)
    for raw in requested:
        if raw == ALL:
            expanded = override.methods if override.methods is not None else base.methods
            if expanded is None:
                raise SpaceError(space_dir / f"{ALL}.yaml", "methods", "missing; list what --method all searches")
            names_ = expanded
        else:
            names_ = [_method_specs(raw, where, "method")[0]]
        chosen += [m for m in names_ if m not in chosen]  # repeats on the command line are harmless

    params = {m: override.params_by_method[m] if m in override.params_by_method
              else _method_file_params(m, space_dir) for m in chosen}
    shared = override.shared if override.shared is not None else (base.shared or {})
    return SearchSpace(tuple(chosen), params, shared)


# ---------------------------------------------------------------------------------------------
# The searcher


def default_storage_url(storage: str | Path, name: str) -> str:
    """``sqlite:///<storage>/<name>/optuna.db`` (the caller's default study storage)."""
    return f"sqlite:///{Path(storage).resolve() / name / 'optuna.db'}"


def make_sampler(seed: int | None, n_startup_trials: int = 10) -> "optuna.samplers.TPESampler":
    """The seeded TPE sampler of every sweep, suited to the conditional space.

    ``group`` makes TPE model each method's subspace jointly (method, its hyperparameters, the
    shared options) instead of sampling conditional parameters independently; ``constant_liar``
    keeps parallel Tune trials from being suggested the same point while others are running.
    """
    import optuna

    with warnings.catch_warnings():  # ``group`` is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=n_startup_trials, constant_liar=True)


def make_searcher(space: SearchSpace, metric: str | list[str], mode: str | list[str], seed: int | None,
                  storage_url: str | None = None, study_name: str = "amtl-sweep", *,
                  n_startup_trials: int = 10) -> "OptunaSearch":
    """Ray Tune's ``OptunaSearch`` over ``space`` with a seeded TPE sampler; with lists of metrics
    and modes, a multi-objective study (TPE is Optuna's multi-objective TPE then).

    ``storage_url`` is any SQLAlchemy URL (``sqlite:///path/optuna.db``, ``postgresql://...``);
    a study of that name already there is loaded and continued. ``None`` keeps the study in memory.
    """
    from sweeps.optuna_search import ResumableOptunaSearch

    modes = mode if isinstance(mode, list) else [mode]
    if any(m not in ("min", "max") for m in modes):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    sampler = make_sampler(seed, n_startup_trials)
    storage = None
    if storage_url:
        _ensure_sqlite_dir(storage_url)
        from sweeps.secrets import RedactedRDBStorage
        storage = RedactedRDBStorage(storage_url)  # Tune pickles it to disk: never with a password
    # With a space given, OptunaSearch builds its study now, so it needs metric and mode here as
    # well as in TuneConfig.
    return ResumableOptunaSearch(space=space.define_by_run, metric=metric, mode=mode, sampler=sampler,
                                 storage=storage, study_name=study_name)


def _ensure_sqlite_dir(url: str) -> None:
    """SQLite cannot create the folder of its file ("unable to open database file"): make it."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url[len(prefix):] not in ("", ":memory:"):
        Path(url[len(prefix):].split("?", 1)[0]).parent.mkdir(parents=True, exist_ok=True)
