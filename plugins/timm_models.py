"""timm encoders: any timm CNN, its last feature map (``forward_features``) as the grid, or
earlier stages (``--feature-layers``).

A ViT named here (``timm:vit_base_patch16_224``) is handed to the ViT-as-grid encoder.
Pretrained weights come from, in order: ``--encoder-weights FILE``, an offline source that a
plugin registered (``register_weights``), timm's own download from the Hugging Face Hub.
Registering the family imports nothing heavy; ``_timm`` (torch, timm) loads on first build.
"""

from __future__ import annotations

from sat_cli.model.encoders import EncoderFamily
from sat_cli.model.hookspecs import hookimpl


def _list_names():
    import timm

    return timm.list_models()


def build(name, options):
    from sat_cli_plugins._timm import build_cnn

    return build_cnn(name, options, FAMILY)


FAMILY = EncoderFamily(
    prefix="timm",
    build=build,
    description=(
        "any timm CNN (EfficientNet, ResNet, ConvNeXt, ...): its last feature map, native grid "
        "unless --grid; timm ViTs become patch grids. tf_efficientnet_lite0/1/2 have offline weights"
    ),
    examples=("timm:tf_efficientnet_lite0", "timm:efficientnet_b3", "timm:convnext_tiny"),
    list_names=_list_names,
    stage_layers=True,
)


@hookimpl
def register_encoders(register):
    register(FAMILY)
