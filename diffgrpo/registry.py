"""A name -> factory table: how rewards and perturbers are registered and built by name.

Why one helper: the reward and the perturber registries are the one allowed global state (written
once at import by ``@register_...``, then read by name), and both must refuse a taken name, list the
known names on a lookup that fails, and report parameters a factory does not take; one class keeps
those rules (and their messages) the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

Factory = TypeVar("Factory", bound=Callable[..., Any])


class Registry(Generic[Factory]):
    """Factories of one ``kind`` ("reward", "perturber") by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Factory] = {}

    def register(self, name: str) -> Callable[[Factory], Factory]:
        """A decorator registering ``factory(**params)`` under ``name``; ValueError if the name is taken."""

        def decorator(factory: Factory) -> Factory:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._factories))

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __getitem__(self, name: str) -> Factory:
        """The factory registered as ``name``; KeyError listing the known names."""
        if name not in self._factories:
            raise KeyError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names()) or '(none)'}")
        return self._factories[name]

    def build(self, name: str, **params: Any) -> Any:
        """``factory(**params)`` of ``name``: KeyError for an unknown name (listing the known ones), ValueError
        for parameters the factory does not accept."""
        factory = self[name]
        try:
            return factory(**params)
        except TypeError as err:
            raise ValueError(f"bad parameters {sorted(params)} for {self.kind} {name!r}: {err}") from err
