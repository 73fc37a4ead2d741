"""One small registry used for models, synthesizers, quantizers, protocols and recipes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object mapping with close-match suggestions on a miss.

    >>> r = Registry("model"); r.add("a", 1); r["a"]
    1
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' registered twice")
        self._items[name] = obj
        return obj

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator form: ``@REG.register("name")``; the name defaults to the object's ``__name__``."""

        def deco(obj: T) -> T:
            self.add(name or getattr(obj, "name", None) or obj.__name__, obj)
            return obj

        return deco

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def get(self, name: str, default=None):
        return self._items.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()
