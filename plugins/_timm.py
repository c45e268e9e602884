"""What the timm and ViT plugins share, kept apart so that registering them imports no torch:
building a timm model with the weights the options ask for, its preprocessing, and the two
encoder modules (a CNN's feature map, or a ViT's patch tokens, as the grid)."""

from __future__ import annotations

import os

import torch

from sat_cli.errors import EncoderError, WeightsError
from sat_cli.model.backbone import Encoder, load_into, load_weights_file
from sat_cli.model.encoders import EncoderFamily, EncoderOptions, Preprocess, offline_weights, unknown_name_error


class TimmCNNEncoder(Encoder):
    def __init__(self, spec, preprocess, out_dim, grid, model, channels_last: bool, layers=None):
        super().__init__(spec, preprocess, out_dim, grid)
        self.backbone = model
        self.channels_last = channels_last  # some timm models return (B, h, w, C)
        self.layers = None if layers in (None, (-1,)) else tuple(layers)

    def layer_channels(self) -> list[tuple[int, int]]:
        if self.layers is None:
            return super().layer_channels()
        info = self.backbone.feature_info
        return [(i, self.backbone.num_features if i == -1 else info[i]["num_chs"]) for i in self.layers]

    def feature_map(self, x):
        if self.layers is None:
            fmap = self.backbone.forward_features(x)
            return fmap.permute(0, 3, 1, 2) if self.channels_last else fmap  # (B, C, h, w)
        return stage_maps(self.backbone, x, self.layers)


def stage_maps(model, x, layers: tuple[int, ...]):
    """The maps of ``layers`` (stage indices, -1 for the last map) pooled to the coarsest of
    them and concatenated: (B, sum of channels, h, w)."""
    import torch.nn.functional as F

    stages = sorted({i for i in layers if i >= 0})
    last = -1 in layers
    out = model.forward_intermediates(x, indices=stages, intermediates_only=not last, stop_early=not last)
    final, inter = out if last else (None, out)
    by_index = dict(zip(stages, inter))
    maps = [final if i == -1 else by_index[i] for i in layers]
    h = min(m.shape[-2] for m in maps)
    w = min(m.shape[-1] for m in maps)
    return torch.cat([m if m.shape[-2:] == (h, w) else F.adaptive_avg_pool2d(m, (h, w)) for m in maps], dim=1)


def check_layers(model, name: str, layers) -> tuple[int, ...] | None:
    """Validate --feature-layers against the model's stages; None when it is the default."""
    if layers in (None, (-1,), [-1]):
        return None
    n = len(getattr(model, "feature_info", []) or [])
    if not hasattr(model, "forward_intermediates") or not n:
        raise EncoderError(f"timm:{name} does not expose its stages: --feature-layers needs a timm CNN "
                           "with forward_intermediates")
    bad = [i for i in layers if not (i == -1 or 0 <= i < n)]
    if bad or len(set(layers)) != len(layers) or not layers:
        raise EncoderError(f"--feature-layers {','.join(map(str, layers))}: timm:{name} has stages 0..{n - 1} "
                           "(0 = stride 2, each next one half the resolution) and -1, the last feature map; "
                           "each at most once")
    return tuple(layers)


def create_model(prefix: str, name: str, options: EncoderOptions, family: EncoderFamily):
    """The whole timm model, classifier included, with the weights the options ask for."""
    import timm

    if not timm.is_model(name):
        raise unknown_name_error(family, name)
    spec = f"{prefix}:{name}"
    offline = offline_weights().get(spec) or offline_weights().get(f"timm:{name}")
    if options.weights or not options.pretrained or offline:
        model = timm.create_model(name, pretrained=False)
        if options.weights:
            load_into(model, load_weights_file(options.weights), options.weights)
        elif options.pretrained:
            loader, description = offline
            load_into(model, loader(), description or spec)
    else:
        fail_fast_offline(name)
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:
            cfg = timm.models.get_pretrained_cfg(name)
            hub = getattr(cfg, "hf_hub_id", None) if cfg else None
            where = f"the Hugging Face Hub repo {hub} (file model.safetensors)" if hub else "its download URL"
            raise WeightsError(
                f"timm could not load pretrained weights for {name} from {where} "
                f"({type(exc).__name__}: {str(exc)[:200]}). Offline? Download that file elsewhere and "
                "pass --encoder-weights PATH, or point HF_HOME at a cache that holds it."
            ) from exc
    return model.eval()


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """One TCP connection to the URL's host (skipped behind a proxy, which may be the only way out)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def fail_fast_offline(name: str) -> None:
    """Weights neither cached nor reachable (HF_HUB_OFFLINE, or no route to the host): a clear
    error at once, instead of the hub's retries and warnings for most of a minute."""
    import timm
    import torch

    cfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None) if cfg else None
    url = getattr(cfg, "url", None) if cfg else None
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo = hub.split("@")[0]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
            return
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        if offline or not _reachable(endpoint):
            why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} cannot be reached"
            raise WeightsError(
                f"The pretrained weights of {name} are not in the Hugging Face cache and {why}: get "
                f"model.safetensors of the Hub repo {repo} elsewhere and pass --encoder-weights PATH, "
                "or point HF_HOME at a cache that holds it.")
    elif url:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
        if not os.path.exists(cached) and not _reachable(url):
            raise WeightsError(f"The pretrained weights of {name} are not cached ({cached}) and {url} cannot be "
                               "reached: download it elsewhere and pass --encoder-weights PATH.")


def preprocess_for(model, options: EncoderOptions) -> Preprocess:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    if options.image_size and not model.pretrained_cfg.get("fixed_input_size", False):
        height = width = options.image_size
    interpolation = cfg.get("interpolation", "bicubic")
    return Preprocess(
        size=(height, width),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
    )


def is_vit(model) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens") and hasattr(
        model, "forward_intermediates"
    )


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
    preprocess = preprocess_for(model, options)
    if options.image_size and tuple(model.patch_embed.img_size) != preprocess.size:
        model.set_input_size(img_size=preprocess.size)
    model.reset_classifier(0)
    return ViTGridEncoder(spec, preprocess, model.num_features, options.grid, model).eval()


def build_cnn(name: str, options: EncoderOptions, family: EncoderFamily) -> Encoder:
    model = create_model("timm", name, options, family)
    if is_vit(model):
        return wrap_vit(f"timm:{name}", model, options)
    preprocess = preprocess_for(model, options)
    model.reset_classifier(0)
    layers = check_layers(model, name, options.layers)
    with torch.no_grad():  # one small forward tells the layout (and channels) of the feature map
        small = not model.pretrained_cfg.get("fixed_input_size", False)  # 64 px: as telling, 30x cheaper
        probe = torch.zeros(1, 3, *(min(s, 64) if small else s for s in preprocess.size))
        out = model.forward_features(probe) if layers is None else stage_maps(model, probe, layers)
    channels_last = layers is None and out.shape[1] != model.num_features and out.shape[-1] == model.num_features
    out_dim = model.num_features if layers is None else out.shape[1]
    encoder = TimmCNNEncoder(f"timm:{name}", preprocess, out_dim, options.grid, model, channels_last, layers)
    return encoder.use_channels_last().eval()


def build_vit(name: str, options: EncoderOptions, family: EncoderFamily) -> Encoder:
    model = create_model("vit", name, options, family)
    if not is_vit(model):
        raise unknown_name_error(family, name)
    return wrap_vit(f"vit:{name}", model, options)
