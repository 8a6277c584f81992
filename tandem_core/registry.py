"""The one name -> thing table of the project (STYLE habit 4): backends, architectures, model
presets, losses, estimators, rewards, loggers. A decorator fills it; an unknown name lists the
known ones. The config check (trainer/config_check.py) reads the same tables, so a misspelt
name fails at load, before anything is built."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name no entry is registered under; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(dict):
    """name -> function, class or value; `@REG.register("name")` or `REG.add(name, value)`."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, value: Any) -> Any:
        if name in self and self[name] is not value:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = value
        return value

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(fn: T) -> T:
            return self.add(name, fn)

        return decorator

    def names(self) -> list[str]:
        return sorted(self)

    def unknown(self, name: str) -> str:
        """The message for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"

    def __missing__(self, name: str):
        raise UnknownNameError(self.unknown(name))
