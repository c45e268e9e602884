"""torchvision encoders: ResNet-50/101/152 (the paper's kind of CNN) and MobileNetV2.

The pooling and classifier layers are removed; the last feature map is average-pooled to a
``grid x grid`` map (14x14 by default, as in Show, Attend and Tell).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sat_cli.backbone import Encoder, load_into, load_weights_file
from sat_cli.encoders import EncoderFamily, EncoderOptions, Preprocess, unknown_name_error
from sat_cli.errors import EncoderError, WeightsError
from sat_cli.hookspecs import hookimpl

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
    build=lambda name, options: build(name, options),
    description=(
        "torchvision ResNet-50/101/152 and MobileNetV2 with ImageNet weights; the last feature "
        f"map pooled to a {DEFAULT_GRID}x{DEFAULT_GRID} grid (--grid). Other weights: name.TAG"
    ),
    examples=("torchvision:resnet101", "torchvision:resnet50.IMAGENET1K_V1"),
    list_names=lambda: list(MODELS),
)


@hookimpl
def register_encoders(register):
    register(FAMILY)


class TorchvisionEncoder(Encoder):
    def __init__(self, spec, preprocess, out_dim, grid, body: nn.Module):
        super().__init__(spec, preprocess, out_dim, grid)
        self.backbone = body

    def feature_map(self, x):
        return self.backbone(x)  # (B, C, h, w)


def build_network(name: str, options: EncoderOptions):
    """The whole torchvision network, classifier included, with the weights the options ask for."""
    import torchvision.models as tvm

    base, _, tag = name.partition(".")
    if base not in MODELS:
        raise unknown_name_error(FAMILY, name)
    enum_name, default_tag = MODELS[base]
    enum = getattr(tvm, enum_name)
    try:
        weights = enum[tag or default_tag]
    except KeyError:
        tags = ", ".join(w.name for w in enum)
        raise EncoderError(f"Unknown weights tag {tag!r} for torchvision:{base}. Tags: {tags}") from None
    net = getattr(tvm, base)(weights=None)
    if options.weights:
        load_into(net, load_weights_file(options.weights), options.weights)
    elif options.pretrained:
        load_into(net, fetch_weights(weights), weights.url)
    return net.eval(), weights


def fetch_weights(weights) -> dict:
    """torchvision's own loader (hub cache first, then a download); a clear error when offline."""
    filename = weights.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:
        raise WeightsError(
            f"Could not get the ImageNet weights file {filename} ({type(exc).__name__}: {exc}). "
            f"Offline? Download {weights.url} elsewhere and copy it to {cached}, "
            "or pass --encoder-weights PATH."
        ) from exc


def build(name: str, options: EncoderOptions) -> Encoder:
    net, weights = build_network(name, options)
    transform = weights.transforms()
    size = options.image_size or transform.crop_size[0]
    preprocess = Preprocess(
        size=(size, size), mean=tuple(transform.mean), std=tuple(transform.std), interpolation="bilinear"
    )
    if name.startswith("mobilenet_v2"):
        body, out_dim = net.features, net.last_channel
    else:
        body, out_dim = nn.Sequential(*list(net.children())[:-2]), net.fc.in_features
    grid = DEFAULT_GRID if options.grid is None else options.grid
    return TorchvisionEncoder(f"torchvision:{name}", preprocess, out_dim, grid, body).use_channels_last().eval()
