"""Compression recipes, registered by name the timm way (decorator + `create_recipe`).

Invariant: a registered recipe is a function `(ctx, **config) -> Candidate` that returns an
ONNX model taking exactly the source bundle's preprocessing contract (and giving the same
outputs: logits for a classifier, boxes/scores/labels for an object detector); it never
measures, and it raises `NotApplicableError` (not a crash) when the bundle lacks what it needs.
Recipes are registered per task ("classify", "detect"): one name (e.g. "int8-static") may
mean a different graph surgery for each.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._errors import CompressError

__all__ = ["TASKS", "Recipe", "create_recipe", "list_recipes", "register_recipe"]

TASKS = ("classify", "detect")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    needs_torch: bool
    fn: Callable[..., Any]
    config: dict[str, Any] = field(default_factory=dict)
    task: str = "classify"

    def __call__(self, ctx: Any) -> Any:
        return self.fn(ctx, **self.config)


_REGISTRY: dict[str, dict[str, Recipe]] = {task: {} for task in TASKS}


def register_recipe(name: str, *, description: str, needs_torch: bool = False,
                    task: str = "classify") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY[task]:
            raise CompressError(f"recipe {name!r} is already registered for {task}")
        _REGISTRY[task][name] = Recipe(name, description, needs_torch, fn, task=task)
        return fn

    return decorate


def list_recipes(task: str | None = "classify") -> list[str]:
    """Recipe names of one task in registration order (cheapest first); `None`: every name
    any task knows."""
    if task is None:
        return list(dict.fromkeys(n for t in TASKS for n in _REGISTRY[t]))
    return list(_REGISTRY[task])


def create_recipe(name: str, *, task: str = "classify", **config: Any) -> Recipe:
    """The recipe `name` with `config` overriding its keyword defaults (unknown keys refused)."""
    try:
        base = _REGISTRY[task][name]
    except KeyError:
        others = [t for t in TASKS if name in _REGISTRY[t]]
        if others:
            raise CompressError(f"recipe {name!r} does not apply to this bundle (it is a "
                                f"{others[0]} recipe; {task} recipes: "
                                f"{', '.join(_REGISTRY[task])})") from None
        raise CompressError(f"unknown recipe {name!r} (known: "
                            f"{', '.join(_REGISTRY[task])})") from None
    params = inspect.signature(base.fn).parameters
    unknown = sorted(set(config) - {p for p in params if p != "ctx"})
    if unknown:
        raise CompressError(f"recipe {name!r} has no option {', '.join(unknown)}")
    return Recipe(base.name, base.description, base.needs_torch, base.fn, dict(config),
                  task=task)
