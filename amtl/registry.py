"""Name registries for what a user may bring: tasks, datasets and models (balancers keep their own).

The built-ins register through the same calls a plugin uses (:mod:`amtl.extend`), so a user's names
are used exactly like built-in ones. A name can be registered once: a plugin that reuses a name is
an error, not a silent replacement of somebody else's code.
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class NameTakenError(ValueError):
    """A name is registered already."""


class UnknownNameError(ValueError):
    """No entry has this name."""


class Registry(Generic[T]):
    """``name -> entry`` of one kind (``"task"``, ``"dataset"``, ``"model"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {}  # the table itself (the plugin loader diffs it)

    def add(self, name: str, entry: T) -> T:
        if not isinstance(name, str) or not name.strip() or name != name.strip() or "," in name:
            raise ValueError(f"{self.kind} name {name!r} must be a non-empty word without commas or spaces")
        if name in self.entries:
            raise NameTakenError(f"{self.kind} name '{name}' is taken; choose another name")
        self.entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self.entries:
            raise UnknownNameError(f"unknown {self.kind} '{name}' (known: {', '.join(self.names())}; "
                                   f"a plugin's names need --plugin)")
        return self.entries[name]

    def remove(self, name: str) -> None:
        self.entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
