"""User code that registers tasks, datasets, models or balancers: loaded by name or path.

Two ways in: ``--plugin FILE.py|MODULE`` (repeatable, also in a config file), and any installed
package that declares an entry point in the group ``amtl_sweep.plugins`` (loaded without a flag,
the Python packaging convention pytest and others use). A plugin is imported once per process; its
``register_*`` calls (:mod:`amtl.extend`) run on import. A plugin that fails half-way leaves none of
its names registered, and the error names the plugin, the problem and the fix.

On a cluster the trial processes import a plugin file by module name: the sweep ships the file to
every node with Ray's ``runtime_env["py_modules"]`` (see ``sweeps``), so it need not exist there.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Iterable

from amtl.registry import NameTakenError

ENTRY_POINT_GROUP = "amtl_sweep.plugins"
#: Module names of plugin files a sweep shipped to the cluster's nodes (``py_modules``), comma-separated:
#: a process that sees it imports those plugins by name, whether or not the file is on its disk.
SHIPPED_ENV = "AMTL_SHIPPED_PLUGINS"

_loaded: dict[str, ModuleType] = {}
_added: dict[str, dict[str, set[str]]] = {}  # module name -> the names it registered, by kind
_entry_points_loaded = False
_lock = threading.RLock()


class PluginError(ValueError):
    """A plugin cannot be found, fails to import, or breaks a contract."""


def is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def module_name(spec: str) -> str:
    """The name a plugin is imported under: a file's stem, or the module name itself."""
    return Path(spec).stem if is_file(spec) else spec


def absolute(specs: Iterable[str]) -> list[str]:
    """``specs`` with every plugin file made absolute (module names unchanged)."""
    return [str(Path(s).resolve()) if is_file(s) else s for s in specs]


def files(specs: Iterable[str]) -> list[Path]:
    """The plugin files among ``specs``, absolute (what a sweep ships to the cluster's nodes)."""
    return [Path(s) for s in absolute(specs) if is_file(s)]


def _registries() -> dict[str, dict]:
    """Every name table a plugin may add to, by kind (balancers keep theirs in ``method``)."""
    from amtl.balancers import method
    from amtl.data.registry import DATASETS
    from amtl.models import MODELS_REGISTRY
    from amtl.tasks import TASKS
    return {"task": TASKS.entries, "dataset": DATASETS.entries, "model": MODELS_REGISTRY.entries,
            "weighting": method._WEIGHTINGS, "aggregator": method._AGGREGATORS, "balancer": method._ALIASES}


def _names() -> dict[str, set[str]]:
    return {kind: set(table) for kind, table in _registries().items()}


def _forget_since(before: dict[str, set[str]]) -> None:
    for kind, table in _registries().items():
        for name in set(table) - before[kind]:
            del table[name]


def _check_new_tasks(spec: str, before: dict[str, set[str]]) -> None:
    """Task classes that cannot be built fail here, at load, not inside the first trial."""
    from amtl.tasks import TASKS, Task
    for name in set(TASKS.entries) - before["task"]:
        factory = TASKS.entries[name]
        if inspect.isclass(factory) and issubclass(factory, Task) and inspect.isabstract(factory):
            missing = ", ".join(sorted(factory.__abstractmethods__))
            raise PluginError(f"plugin '{spec}': task '{name}' ({factory.__name__}) does not implement {missing}; "
                              f"write them (see docs/extending.md)")
        if inspect.isclass(factory) and hasattr(factory, "kpi") and hasattr(factory, "higher_is_better"):
            if factory.kpi not in factory.higher_is_better:
                raise PluginError(f"plugin '{spec}': task '{name}' has kpi '{factory.kpi}', which is not one of its "
                                  f"metrics ({', '.join(factory.higher_is_better)}); set kpi to one of them")


def _import_by_name(name: str, missing: str) -> ModuleType:
    """``import name``; PluginError(``missing``) when that module itself (not one it imports) is absent."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise PluginError(missing) from None


def _import(spec: str) -> ModuleType:
    name = module_name(spec)
    if is_file(spec) and name in os.environ.get(SHIPPED_ENV, "").split(","):
        return _import_by_name(name, f"plugin '{spec}' was to be shipped to this node as module '{name}', but it "
                                     f"is not importable here; check the job's runtime_env py_modules")
    if not is_file(spec):
        return _import_by_name(name, f"plugin module '{spec}' is not installed; pip install it, or pass the path "
                                     f"of a plugin file (--plugin path/to/plugin.py)")
    path = Path(spec).resolve()
    if not path.is_file():
        raise PluginError(f"plugin file '{spec}' does not exist; check the --plugin path")
    if name in sys.modules:  # imported by the user already: running it again would register twice
        if getattr(sys.modules[name], "__file__", None) == str(path):
            return sys.modules[name]
        raise PluginError(f"plugin '{spec}': a module named '{name}' is imported already; rename the file")
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load(spec: str) -> ModuleType:
    """Import plugin ``spec`` (a ``.py`` path or a module name) once; PluginError when it fails."""
    with _lock:
        name = module_name(spec)
        if name in _loaded:
            return _loaded[name]
        before = _names()
        try:
            module = _import(spec)
            _check_new_tasks(spec, before)
        except PluginError:
            _forget_since(before)
            raise
        except NameTakenError as e:
            _forget_since(before)
            raise PluginError(f"plugin '{spec}': {e}") from None
        except Exception as e:  # its own bug: say where, keep it one line
            _forget_since(before)
            shows = f"python {spec}" if is_file(spec) else f"python -c 'import {name}'"
            raise PluginError(f"plugin '{spec}' failed to import: {type(e).__name__}: {e}; fix the plugin "
                              f"({shows} shows the traceback)") from None
        _loaded[name] = module
        _added[name] = {kind: names - before[kind] for kind, names in _names().items()}
        return module


def unload(spec: str) -> None:
    """Forget plugin ``spec`` and every name it registered (tests, notebooks that reload a plugin)."""
    with _lock:
        name = module_name(spec)
        added = _added.pop(name, {})
        tables = _registries()
        for kind, names in added.items():
            for n in names:
                tables[kind].pop(n, None)
        _loaded.pop(name, None)
        sys.modules.pop(name, None)


def load_entry_points() -> None:
    """Load every installed ``amtl_sweep.plugins`` entry point, once per process."""
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.module in _loaded:
                continue
            before = _names()
            try:
                loaded = entry.load()  # "pkg.module", or "pkg.module:register" for a function to call
                if entry.attr and callable(loaded) and not inspect.isclass(loaded):
                    loaded()
                _loaded[entry.module] = importlib.import_module(entry.module)
                _check_new_tasks(entry.value, before)
            except Exception as e:
                _forget_since(before)
                where = f"entry point '{entry.name}' ({entry.value}) of group {ENTRY_POINT_GROUP}"
                raise PluginError(f"plugin {where} failed to load: {type(e).__name__}: {e}; fix or uninstall "
                                  f"its package") from None


def load_all(specs: Iterable[str] = ()) -> None:
    """The installed entry points, then every ``--plugin`` in order."""
    load_entry_points()
    for spec in specs:
        load(spec)


__all__ = ["ENTRY_POINT_GROUP", "PluginError", "SHIPPED_ENV", "absolute", "files", "load", "load_all",
           "load_entry_points", "module_name", "unload"]
