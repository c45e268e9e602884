"""The torchvision encoder module and its weights (torch is imported here, not at registration)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sat_cli.errors import EncoderError, WeightsError
from sat_cli.model.backbone import Encoder, load_into, load_weights_file
from sat_cli.model.encoders import EncoderFamily, EncoderOptions, Preprocess, unknown_name_error
from sat_cli_plugins.torchvision_resnet import DEFAULT_GRID, MODELS


class TorchvisionEncoder(Encoder):
    def __init__(self, spec, preprocess, out_dim, grid, body: nn.Module):
        super().__init__(spec, preprocess, out_dim, grid)
        self.backbone = body

    def feature_map(self, x):
        return self.backbone(x)  # (B, C, h, w)


def build_network(name: str, options: EncoderOptions, family: EncoderFamily):
    """The whole torchvision network, classifier included, with the weights the options ask for."""
    import torchvision.models as tvm

    base, _, tag = name.partition(".")
    if base not in MODELS:
        raise unknown_name_error(family, name)
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
    from sat_cli_plugins._timm import _reachable

    if not cached.exists() and not _reachable(weights.url):  # fail at once, not after the retries
        raise WeightsError(f"The ImageNet weights file {filename} is not cached ({cached}) and {weights.url} "
                           "cannot be reached: download it elsewhere and copy it there, or pass --encoder-weights PATH.")
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:
        raise WeightsError(
            f"Could not get the ImageNet weights file {filename} ({type(exc).__name__}: {exc}). "
            f"Offline? Download {weights.url} elsewhere and copy it to {cached}, "
            "or pass --encoder-weights PATH."
        ) from exc


def build(name: str, options: EncoderOptions, family: EncoderFamily) -> Encoder:
    net, weights = build_network(name, options, family)
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
