"""Name -> factory registries, so pipelines pick components from config by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from medret.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named family of factories (readers, encoders, losses, recipes...).

    >>> shapes = Registry[int]("shape")
    >>> @shapes.register("square")
    ... def square() -> int:
    ...     return 4
    >>> shapes.get("square")()
    4
    >>> shapes.get("circle")
    Traceback (most recent call last):
    ...
    medret.errors.UnknownNameError: unknown shape 'circle'; known: square
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = factory
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
