"""What a training run leaves for people: learning-curve and confusion-matrix PNGs, model card.

Invariant: everything here is derived from the run's recorded history and test predictions;
nothing in this module trains, evaluates or changes a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["confusion_matrix", "model_card", "plot_confusion", "plot_curves"]


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, float | None]], path: Path) -> None:
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys in ((ax_loss, ("train_loss", "val_loss")),
                     (ax_acc, ("train_accuracy", "val_accuracy"))):
        for key, style in zip(keys, ("-", "--"), strict=True):
            # Epochs that were not validated have None there (see `train._fit`).
            points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
            ax.plot([e for e, _ in points], [v for _, v in points], style, marker="o",
                    label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, class_names: tuple[str, ...], path: Path) -> None:
    plt = _pyplot()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.6 * n))
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_card(*, name: str, version: str, class_names: tuple[str, ...], data: dict[str, Any],
               recipe: dict[str, Any], metrics: dict[str, Any], per_class: dict[str, float],
               warnings: list[str]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    recipe_rows = "\n".join(f"- {k}: {v}" for k, v in recipe.items())
    worst = sorted(per_class.items(), key=lambda kv: kv[1])[:3]
    worst_txt = ", ".join(f"{n} ({a:.1%})" for n, a in worst)
    warn_txt = "".join(f"- {w}\n" for w in warnings)
    return f"""# Model card: {name} {version}

## What it does
Classifies {data["image_size"][0]}x{data["image_size"][1]} {data["channels_txt"]} images into
{len(class_names)} classes: {", ".join(class_names)}.

## Data
Source: {data["source"]}. Training {data["train_images"]} images, validation
{data["val_images"]} (stratified split, used for model selection only), test
{data["test_images"]} ({data["test_source"]}).

## Recipe
{recipe_rows}

## Metrics
| metric | value |
|---|---|
{rows}

Per-class test accuracy, weakest: {worst_txt}.

## Limits
- Evaluated on one test split of the same source as the training data; images from another
  camera, background or framing will score lower.
- The weakest classes above are where confusions concentrate (see confusion_matrix.png).
- Not evaluated for fairness or robustness to adversarial input.
{warn_txt}"""
