"""ViT-as-grid: a timm Vision Transformer's final patch tokens, without the class and register
tokens, reshaped to the patch grid (14x14 for a /16 model at 224 px)."""

from __future__ import annotations

from sat_cli.backbone import Encoder
from sat_cli.encoders import EncoderFamily, EncoderOptions, unknown_name_error
from sat_cli.hookspecs import hookimpl


def _list_names():
    import timm

    return [n for n in timm.list_models() if n.startswith(("vit_", "deit", "eva", "beit", "test_vit"))]


FAMILY = EncoderFamily(
    prefix="vit",
    build=lambda name, options: build(name, options),
    description="timm Vision Transformers (ViT, DeiT, EVA, ...): final patch tokens as the grid",
    examples=("vit:vit_base_patch16_224", "vit:deit_small_patch16_224"),
    list_names=_list_names,
)


@hookimpl
def register_encoders(register):
    register(FAMILY)


class ViTGridEncoder(Encoder):
    def __init__(self, spec, preprocess, out_dim, grid, model):
        super().__init__(spec, preprocess, out_dim, grid)
        self.backbone = model

    def feature_map(self, x):
        # last block's patch tokens, final norm applied, prefix tokens dropped: (B, C, gh, gw)
        return self.backbone.forward_intermediates(
            x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[-1]


def wrap_vit(spec: str, model, options: EncoderOptions) -> Encoder:
    from sat_cli_plugins.timm_models import preprocess_for

    preprocess = preprocess_for(model, options)
    if options.image_size and tuple(model.patch_embed.img_size) != preprocess.size:
        model.set_input_size(img_size=preprocess.size)
    model.reset_classifier(0)
    return ViTGridEncoder(spec, preprocess, model.num_features, options.grid, model).eval()


def build(name: str, options: EncoderOptions) -> Encoder:
    from sat_cli_plugins.timm_models import create_model, is_vit

    model = create_model("vit", name, options, FAMILY)
    if not is_vit(model):
        raise unknown_name_error(FAMILY, name)
    return wrap_vit(f"vit:{name}", model, options)
