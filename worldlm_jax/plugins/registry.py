"""Named plug-ins: one small registry class behind every extension point.

Optimizers, schedules, client objectives, aggregators, strategies and
callbacks are each a `Registry`: user code registers an entry by name (from a
`--plugin` module or a config's `plugins:` list), and configs refer to it by
that name. Every unknown name fails the same way, naming the field, the value,
what is registered and how to add one.
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A config names an entry no registry holds; the message lists the choices."""


class Registry(Generic[T]):
    """`name -> entry` for one kind of plug-in (`kind` names it in errors)."""

    def __init__(self, kind: str, register_with: str, entry_type: type | None = None):
        self.kind = kind
        self.register_with = register_with  # the call that adds one, for error messages
        self.entry_type = entry_type  # what an entry must be (None: anything)
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = True) -> T:
        """Add (or, with `replace`, overwrite) `name`; returns the entry, so
        `register` also works as the body of a decorator."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if self.entry_type is not None and not isinstance(entry, self.entry_type):
            raise TypeError(f"{self.kind} {name!r} must be an instance of {self.entry_type.__name__}, "
                            f"got {type(entry).__name__}")
        if not replace and name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def __call__(self, name: str):
        """Decorator form: `@REGISTRY("name")` registers the decorated object."""
        return lambda entry: self.register(name, entry)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check(self, name: str, field: str) -> None:
        """Raise `UnknownNameError` naming `field` unless `name` is registered."""
        if name not in self._entries:
            registered = f"registered: {', '.join(self.names())}" if self._entries else "none is registered"
            raise UnknownNameError(f"{field}={name!r} is not a registered {self.kind}; {registered} (add one with "
                                   f"{self.register_with}, in a module loaded with --plugin or a config's "
                                   "plugins: list)")

    def get(self, name: str, field: str | None = None) -> T:
        self.check(name, field or self.kind)
        return self._entries[name]
