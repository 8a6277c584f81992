"""Registries of functions filled by a decorator (STYLE habit 4): name -> builder/function."""

from __future__ import annotations

from collections.abc import Callable


class Registry(dict):
    """name -> function; `@REG.register("name")` fills it; an unknown name lists the known ones."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = fn
            return fn

        return decorator

    def __missing__(self, name: str):
        raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self)}")
