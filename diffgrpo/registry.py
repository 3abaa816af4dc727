"""A name -> factory table: how rewards and perturbers are registered and built by name.

Why one helper: the reward and the perturber registries are the one allowed global state (written
once at import by ``@register_...``, then read by name), and both must refuse a taken name, list the
known names on a lookup that fails, and report parameters a factory does not take; one class keeps
those rules (and their messages) the same for both.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Callable, Iterable
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

    def build_from_config(self, name: str, config: object, extra: dict[str, Any] | None = None) -> Any:
        """``factory(**params)`` of ``name``, its parameters read from ``config`` by one rule: every field of the
        dataclass ``config`` that the factory takes as a keyword parameter is passed under its own name, then
        ``extra`` (e.g. parsed ``KEY=VALUE`` flags) is added and wins. So the factory owns the mapping: a field
        it does not take is not passed, and a new factory parameter is set by naming it in ``extra``."""
        params = {key: value for key, value in config_fields(config).items() if key in self.parameters(name)}
        return self.build(name, **{**params, **(extra or {})})

    def parameters(self, name: str) -> tuple[str, ...]:
        """The keyword parameters the factory of ``name`` takes (its signature; a dataclass's fields)."""
        signature = inspect.signature(self[name])
        return tuple(key for key, p in signature.parameters.items()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def config_fields(config: object) -> dict[str, Any]:
    """The fields of the dataclass instance ``config`` by name (not recursing into nested dataclasses)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def parse_assignments(items: Iterable[str], flag: str) -> dict[str, Any]:
    """``("KEY=VALUE", ...)`` -> ``{KEY: VALUE}``, each VALUE read as a Python literal (number, bool, tuple,
    quoted string) or else kept as the plain string. ``flag`` names the option in the error messages.

    Raises:
        ValueError: an item without ``=``, an empty key, or a key given twice.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} omega=3.0")
        if key in out:
            raise ValueError(f"{flag} sets {key!r} twice; give each key once")
        try:
            out[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            out[key] = text.strip()
    return out
