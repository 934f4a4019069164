"""Compression recipes, registered by name the timm way (decorator + `create_recipe`).

Invariant: a registered recipe is a function `(ctx, **config) -> Candidate` that returns an
ONNX model taking exactly the source bundle's preprocessing contract; it never measures, and it
raises `NotApplicableError` (not a crash) when the bundle lacks what it needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._errors import CompressError

__all__ = ["Recipe", "create_recipe", "list_recipes", "register_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    needs_torch: bool
    fn: Callable[..., Any]
    config: dict[str, Any] = field(default_factory=dict)

    def __call__(self, ctx: Any) -> Any:
        return self.fn(ctx, **self.config)


_REGISTRY: dict[str, Recipe] = {}


def register_recipe(name: str, *, description: str, needs_torch: bool = False
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise CompressError(f"recipe {name!r} is already registered")
        _REGISTRY[name] = Recipe(name, description, needs_torch, fn)
        return fn

    return decorate


def list_recipes() -> list[str]:
    return list(_REGISTRY)  # registration order: cheapest first


def create_recipe(name: str, **config: Any) -> Recipe:
    """The recipe `name` with `config` overriding its keyword defaults (unknown keys refused)."""
    try:
        base = _REGISTRY[name]
    except KeyError:
        raise CompressError(f"unknown recipe {name!r} (known: {', '.join(_REGISTRY)})") from None
    params = inspect.signature(base.fn).parameters
    unknown = sorted(set(config) - {p for p in params if p != "ctx"})
    if unknown:
        raise CompressError(f"recipe {name!r} has no option {', '.join(unknown)}")
    return Recipe(base.name, base.description, base.needs_torch, base.fn, dict(config))
