"""ViT-as-grid: a timm Vision Transformer's final patch tokens, without the class and register
tokens, reshaped to the patch grid (14x14 for a /16 model at 224 px). The module lives in
``_timm`` and loads on first build."""

from __future__ import annotations

from sat_cli.model.encoders import EncoderFamily
from sat_cli.model.hookspecs import hookimpl


def _list_names():
    import timm

    return [n for n in timm.list_models() if n.startswith(("vit_", "deit", "eva", "beit", "test_vit"))]


def build(name, options):
    from sat_cli_plugins._timm import build_vit

    return build_vit(name, options, FAMILY)


FAMILY = EncoderFamily(
    prefix="vit",
    build=build,
    description="timm Vision Transformers (ViT, DeiT, EVA, ...): final patch tokens as the grid",
    examples=("vit:vit_base_patch16_224", "vit:deit_small_patch16_224"),
    list_names=_list_names,
)


@hookimpl
def register_encoders(register):
    register(FAMILY)
