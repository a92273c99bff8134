"""Typed options, each defined once: a dataclass field with its default, help and metadata.

``option(...)`` declares a field; :func:`add_arguments` makes a command line from the fields (flag
names, types, choices and help are never restated) and :func:`from_namespace` reads it back;
:func:`read_yaml` and :func:`to_yaml` carry the same options in a file. Metadata says what else a
field is: part of the single-task potentials' fingerprint, or searchable by a sweep.

A field whose type is itself such a dataclass (a sweep's ``train: TrainConfig``) contributes its
fields under their own names: one flat command line and file, one home per option.
:func:`with_values` changes options by those flat names, wherever they live.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml

KEY = "amtl_option"


class OptionsError(ValueError):
    """An option's value, or an options file, is invalid; the message names it and the fix."""


@dataclass(frozen=True)
class Meta:
    help: str = ""
    flag: str | None = None              # default: --field-name
    aliases: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    off_flag: str | None = None          # a bool that defaults to True: the flag that turns it off
    fingerprint: bool = False            # changes what a single-task model can reach
    searchable: bool = False             # a search space may search it
    how_only: bool = False               # changes how a run runs, not what it computes (a rerun may change it)
    cli: bool = True                     # False: set in code or files only (e.g. a dict)
    repeatable: bool = False             # a list flag that may be given again to add more
    hide: tuple[str, ...] = ()           # a nested dataclass field: its fields the owner sets itself


def option(default: Any = dataclasses.MISSING, *, help: str = "", factory: Callable[[], Any] | None = None,
           **meta: Any) -> Any:
    """A dataclass field with its help and :class:`Meta`; ``factory`` for mutable defaults."""
    kwargs: dict[str, Any] = {"metadata": {KEY: Meta(help=help, **meta)}}
    if factory is not None:
        kwargs["default_factory"] = factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


@dataclass(frozen=True)
class Option:
    """One field as the command line and files see it."""

    name: str
    kind: type                    # int, float, str, bool, list (of str) or dict
    optional: bool                # None is a valid value
    default: Any
    meta: Meta
    path: tuple[str, ...] = ()    # the nested dataclass fields it lives in (() for the top level)

    @property
    def flag(self) -> str:
        return self.meta.flag or "--" + self.name.replace("_", "-")


def _kind(annotation: Any) -> tuple[type, bool]:
    """(base kind, whether None is allowed) of a field's type hint."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        kind, _ = _kind(rest[0])
        return kind, len(rest) < len(args)
    origin = typing.get_origin(annotation) or annotation
    if origin in (list, tuple, Sequence):
        return list, False
    if origin in (dict, Mapping):
        return dict, False
    return origin, False


def options(cls: type, _path: tuple[str, ...] = (), _hide: Sequence[str] = ()) -> Iterator[Option]:
    """The fields of the dataclass ``cls`` declared with :func:`option`, in order; a nested options
    dataclass's fields in its place (less those its field's ``hide`` names)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(KEY)
        if meta is None or f.name in _hide:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from options(hints[f.name], (*_path, f.name), meta.hide)
            continue
        kind, optional = _kind(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        yield Option(f.name, kind, optional, default, meta, _path)


def names_with(cls: type, flag: str) -> tuple[str, ...]:
    """Names of the fields whose metadata ``flag`` (``fingerprint``, ``searchable``) is set."""
    return tuple(o.name for o in options(cls) if getattr(o.meta, flag))


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per field of ``cls`` (fields with ``cli=False`` and those in ``skip`` left out); a nested
    options dataclass's flags in a group of their own, titled by its field's help."""
    groups: dict[tuple[str, ...], Any] = {}
    top = parser
    for o in options(cls):
        if not o.meta.cli or o.name in skip:
            continue
        parser = top
        if o.path:
            if o.path not in groups:
                owner = next(f for f in dataclasses.fields(cls) if f.name == o.path[0])
                groups[o.path] = top.add_argument_group(f"{o.path[0]} ({owner.metadata[KEY].help})")
            parser = groups[o.path]
        shown = f" (default: {o.default})" if o.default not in (None, False, "", [], ()) else ""
        if o.kind is bool:
            if o.default:
                parser.add_argument(o.meta.off_flag or f"--no-{o.name.replace('_', '-')}", dest=o.name,
                                    action="store_false", help=o.meta.help)
            else:
                parser.add_argument(o.flag, *o.meta.aliases, dest=o.name, action="store_true", help=o.meta.help)
            continue
        if o.kind is list:
            parser.add_argument(o.flag, *o.meta.aliases, dest=o.name, type=_comma_list, metavar=o.name.upper(),
                                default=list(o.default), action="extend" if o.meta.repeatable else "store",
                                help=f"{o.meta.help}; comma-separated".lstrip("; ")
                                + (f" (default: {','.join(o.default)})" if o.default else ""))
            continue
        parser.add_argument(o.flag, *o.meta.aliases, dest=o.name, type=o.kind, default=o.default,
                            choices=o.meta.choices, help=o.meta.help + shown)


def coerce(o: Option, value: Any, where: str) -> Any:
    """``value`` as option ``o`` takes it; OptionsError naming ``where`` when it cannot be."""
    if value is None and (o.optional or o.default is None):
        return None
    kind = o.kind
    if kind is list and isinstance(value, str):
        value = _comma_list(value)
    if kind is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool, dict) and isinstance(value, kind):
        if o.meta.choices is not None and value not in o.meta.choices:
            raise OptionsError(f"{where}: '{o.name}' must be one of {', '.join(map(str, o.meta.choices))}, "
                               f"got {value!r}")
        return value
    wanted = {list: "a list of names", float: "a number", int: "an integer", str: "a string", bool: "true or false",
              dict: "a mapping"}[kind]
    raise OptionsError(f"{where}: '{o.name}' must be {wanted}, got {value!r}")


def from_namespace(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of ``cls`` from parsed arguments (fields without a flag keep their default unless
    given in ``values``)."""
    given = {o.name: getattr(args, o.name) for o in options(cls) if hasattr(args, o.name)}
    return with_values(cls(), **{**given, **values})


def with_values(obj: Any, **values: Any) -> Any:
    """A copy of the options dataclass ``obj`` with ``values`` (flat option names, nested ones
    included: ``with_values(sweep, n_train=500)`` sets ``sweep.train.n_train``)."""
    known = {o.name: o for o in options(type(obj))}
    by_path: dict[tuple[str, ...], dict[str, Any]] = {}
    for name, value in values.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise TypeError(f"{type(obj).__name__} has no option '{name}'"
                            + (f"; did you mean '{close[0]}'?" if close else ""))
        by_path.setdefault(known[name].path, {})[name] = value
    return _replaced(obj, (), by_path)


def _replaced(obj: Any, path: tuple[str, ...], by_path: Mapping[tuple[str, ...], dict[str, Any]]) -> Any:
    changes = dict(by_path.get(path, {}))
    for f in dataclasses.fields(obj):
        inner = (*path, f.name)
        if any(p[:len(inner)] == inner for p in by_path):
            changes[f.name] = _replaced(getattr(obj, f.name), inner, by_path)
    return dataclasses.replace(obj, **changes)


def value_of(obj: Any, o: Option) -> Any:
    """Option ``o``'s value in ``obj`` (followed down its nested fields)."""
    for name in o.path:
        obj = getattr(obj, name)
    return getattr(obj, o.name)


def to_flags(obj: Any, skip: Sequence[str] = ()) -> list[str]:
    """The command-line flags that give ``obj`` (an options dataclass) where it differs from the
    defaults: the inverse of :func:`add_arguments`, for a command a user can paste."""
    flags: list[str] = []
    for o in options(type(obj)):
        if not o.meta.cli or o.name in skip:
            continue
        value = value_of(obj, o)
        plain = list(value) if isinstance(value, tuple) else value
        if plain == (list(o.default) if isinstance(o.default, tuple) else o.default):
            continue
        if o.kind is bool:
            flags.append((o.meta.off_flag or f"--no-{o.name.replace('_', '-')}") if o.default else o.flag)
        elif value is None:  # no flag gives None back where the default is a value
            continue
        elif o.kind is list:
            flags += [o.flag, ",".join(str(v) for v in value)]
        else:
            flags += [o.flag, str(value)]
    return flags


def read_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """The options of ``cls`` set in a YAML file, checked and converted; ``dashed-names`` accepted."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionsError(f"config file '{where}' does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise OptionsError(f"config file '{where}' cannot be read ({err}); give a UTF-8 YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise OptionsError(f"config file '{where}' is not valid YAML{at}; fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise OptionsError(f"config file '{where}' must be a mapping of option names to values")
    known = {o.name: o for o in options(cls)}
    # A key is a field name or one of its flags without '--' (``method`` for ``methods``), dashes or not.
    spelled = {spelling.lstrip("-").replace("-", "_"): o for o in known.values()
               for spelling in (o.name, o.flag, *o.meta.aliases)}
    values = {}
    for key, value in raw.items():
        o = spelled.get(str(key).replace("-", "_"))
        if o is None:
            close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
            raise OptionsError(f"config file '{where}': unknown option '{key}' ({hint})")
        if o.name in values:
            raise OptionsError(f"config file '{where}': '{key}' sets '{o.name}' a second time; keep one")
        values[o.name] = coerce(o, value, f"config file '{where}'")
    return values


def to_yaml(obj: Any, skip: Sequence[str] = (), header: str = "") -> str:
    """The options of the dataclass instance ``obj`` as YAML, in field order."""
    values = {}
    for o in options(type(obj)):
        if o.name in skip:
            continue
        value = value_of(obj, o)
        values[o.name] = list(value) if isinstance(value, tuple) else value
    body = yaml.safe_dump(values, sort_keys=False, default_flow_style=None, allow_unicode=True)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body
