"""Which transfer-learning strategy fits a data set: the four cases, as a pure decision.

Invariant: `choose_strategy` only looks at facts about the data (images per class, channels,
image size) and whether a pretrained backbone exists; it does no I/O and always returns a
reason a person can check. The four cases are the classic rule (CS231n, "Transfer Learning"):

| data   | similar to ImageNet        | different from ImageNet                      |
|--------|----------------------------|----------------------------------------------|
| small  | 1: feature-extract         | 3: feature-extract from the *middle* blocks  |
|        |    (too few images to      |    (their edges and textures are generic;    |
|        |    fine-tune safely)       |    the last blocks' ImageNet object parts    |
|        |                            |    are not), spatial layout kept             |
| large  | 2: fine-tune the last      | 4: train from scratch (enough data, and       |
|        |    blocks                  |    ImageNet features do not fit the task)    |

CS231n on case 3: "it might work better to train the SVM classifier from activations somewhere
earlier in the network". Measured here (Fashion-MNIST, 100 images per class, 3 minutes, see the
README): mid-level features 87% against 81% for fine-tuning the last blocks and 81% for the
last layer's features.

"Similar" is judged from the images themselves: colour photos of at least 64 px look like
ImageNet; grayscale or tiny images (MNIST, Fashion-MNIST, X-rays, sensor maps) do not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["SMALL_PER_CLASS", "STRATEGIES", "StrategyChoice", "choose_strategy"]

Strategy = Literal["feature-extract", "fine-tune", "from-scratch"]
STRATEGIES: tuple[str, ...] = ("auto", "feature-extract", "fine-tune", "from-scratch")
# Below about a thousand images per class a network with millions of weights overfits when
# trained from its initialisation; above it, training from scratch is competitive.
SMALL_PER_CLASS = 1000
SIMILAR_MIN_SIZE = 64

PRETRAINED_BACKBONE = "efficientnet-lite0"
SCRATCH_BACKBONE = "fast-cnn"


@dataclass(frozen=True)
class StrategyChoice:
    strategy: Strategy
    case: int  # 1-4 from the table above; 0 when the user forced a strategy
    backbone: str
    pretrained: bool
    reason: str
    # feature-extract: "last" = the backbone's pooled output; "middle" = its mid-level
    # activation map (`BackboneSpec.mid_blocks`)
    features: Literal["last", "middle"] = "last"

    def to_dict(self) -> dict:
        return asdict(self)


def choose_strategy(*, images_per_class: float, channels: int, image_size: tuple[int, int],
                    requested: str = "auto",
                    pretrained_available: bool = True) -> StrategyChoice:
    """Apply the four-case rule (or honour an explicit strategy) and say why."""
    if requested not in STRATEGIES:
        raise ValueError(f"unknown strategy {requested!r} (known: {', '.join(STRATEGIES)})")
    small = images_per_class < SMALL_PER_CLASS
    similar = channels == 3 and min(image_size) >= SIMILAR_MIN_SIZE
    size_txt = (f"{images_per_class:.0f} images per class is "
                f"{'small' if small else 'large'} (threshold {SMALL_PER_CLASS})")
    sim_txt = (f"{'colour' if channels == 3 else 'grayscale'} {image_size[0]}x{image_size[1]} "
               f"images are {'similar to' if similar else 'different from'} ImageNet photos")
    if requested != "auto":
        scratch = requested == "from-scratch"
        return StrategyChoice(
            requested, 0, SCRATCH_BACKBONE if scratch else PRETRAINED_BACKBONE, not scratch,
            f"strategy {requested!r} requested explicitly ({size_txt}; {sim_txt})")
    if not pretrained_available:
        return StrategyChoice("from-scratch", 4 if not small else 3, SCRATCH_BACKBONE, False,
                              f"no pretrained backbone is installed, so from scratch ({size_txt}; "
                              f"{sim_txt})")
    if small and similar:
        return StrategyChoice("feature-extract", 1, PRETRAINED_BACKBONE, True,
                              f"case 1, small and similar: {size_txt}; {sim_txt}; a frozen "
                              "backbone with a new head is safest and fastest")
    if not small and similar:
        return StrategyChoice("fine-tune", 2, PRETRAINED_BACKBONE, True,
                              f"case 2, large and similar: {size_txt}; {sim_txt}; fine-tuning "
                              "the last blocks adapts the features without overfitting")
    if small:
        return StrategyChoice("feature-extract", 3, PRETRAINED_BACKBONE, True,
                              f"case 3, small and different: {size_txt}; {sim_txt}; too few "
                              "images to learn features, and the last blocks' features are "
                              "ImageNet-specific, so a linear head on the frozen middle "
                              "blocks' activation map", features="middle")
    return StrategyChoice("from-scratch", 4, SCRATCH_BACKBONE, False,
                          f"case 4, large and different: {size_txt}; {sim_txt}; enough data to "
                          "learn task-specific features, and ImageNet features at this "
                          "resolution cost more CPU than they give")
