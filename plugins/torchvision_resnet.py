"""torchvision encoders: ResNet-50/101/152 (the paper's kind of CNN) and MobileNetV2.

The pooling and classifier layers are removed; the last feature map is average-pooled to a
``grid x grid`` map (14x14 by default, as in Show, Attend and Tell).
"""

from __future__ import annotations

from sat_cli.model.encoders import EncoderFamily
from sat_cli.model.hookspecs import hookimpl

# name -> (weights enum, default weights tag)
MODELS = {
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2"),
    "resnet101": ("ResNet101_Weights", "IMAGENET1K_V2"),
    "resnet152": ("ResNet152_Weights", "IMAGENET1K_V2"),
    "mobilenet_v2": ("MobileNet_V2_Weights", "IMAGENET1K_V1"),
}
DEFAULT_GRID = 14

FAMILY = EncoderFamily(
    prefix="torchvision",
    build=lambda name, options: _build(name, options),
    description=(
        "torchvision ResNet-50/101/152 and MobileNetV2 with ImageNet weights; the last feature "
        f"map pooled to a {DEFAULT_GRID}x{DEFAULT_GRID} grid (--grid). Other weights: name.TAG"
    ),
    examples=("torchvision:resnet101", "torchvision:resnet50.IMAGENET1K_V1"),
    list_names=lambda: list(MODELS),
)


def _build(name, options):
    from sat_cli_plugins._torchvision import build

    return build(name, options, FAMILY)


@hookimpl
def register_encoders(register):
    register(FAMILY)
