"""Encoder specs (``prefix:name``), the registry of encoder families and their options.

Plugins register families through the ``register_encoders`` hook; this module turns a spec
string into an :class:`~sat_cli.model.backbone.Encoder`. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Callable

from ..errors import EncoderError
from .plugins import load_plugins, pm


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the encoder's input: resize the whole image, then normalize."""

    size: tuple[int, int] = (224, 224)  # (height, width) after resizing; no crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"  # bicubic | bilinear

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        return cls(
            size=tuple(data["size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bicubic"),
        )


@dataclass(frozen=True)
class EncoderOptions:
    grid: int | None = None  # pool the feature map to grid x grid; None keeps the native map
    image_size: int | None = None  # input size override (square); None: the weights' own size
    pretrained: bool = True  # load ImageNet weights (offline source first, then download)
    weights: str | None = None  # a local weights file (.safetensors or a .pth state dict)
    # Which feature maps form the grid: None or (-1,) the last one; otherwise indices into the
    # backbone's stages (timm ``feature_info``: 0 = stride 2 ... 4 = stride 32) and -1 for the
    # last map, pooled to the coarsest of them and concatenated along channels (timm CNNs only).
    layers: tuple[int, ...] | None = None


@dataclass
class EncoderFamily:
    """One family of encoders, e.g. every timm CNN under the prefix ``timm``."""

    prefix: str
    build: Callable[[str, EncoderOptions], object]  # (name, options) -> Encoder
    description: str
    examples: tuple[str, ...] = ()
    list_names: Callable[[], list[str]] | None = None  # known model names, for error messages
    plugin: str = ""
    stage_layers: bool = False  # builds grids from earlier stages (EncoderOptions.layers)


_computed: dict = {}  # hook results per set of registered plugins: computed once, redone if plugins change


def _once(kind: str, compute):
    load_plugins()
    key = (kind, tuple(id(p) for p in pm.get_plugins()))
    if key not in _computed:
        _computed[key] = compute()
    return _computed[key]


def families() -> dict[str, EncoderFamily]:
    """Every registered encoder family by prefix (the hooks run once per set of plugins)."""
    return _once("families", _collect_families)


def _collect_families() -> dict[str, EncoderFamily]:
    found: dict[str, EncoderFamily] = {}
    for impl in pm.hook.register_encoders.get_hookimpls():

        def register(family: EncoderFamily, _plugin=impl.plugin_name):
            family.plugin = family.plugin or _plugin
            if family.prefix in found:
                raise EncoderError(
                    f"Encoder prefix {family.prefix!r} is registered twice "
                    f"(by {found[family.prefix].plugin} and {family.plugin})"
                )
            found[family.prefix] = family

        impl.function(**({"register": register} if "register" in impl.argnames else {}))
    return found


def offline_weights() -> dict[str, tuple[Callable[[], dict], str]]:
    """Pretrained weights that plugins provide without a download, by spec."""

    def collect():
        found: dict[str, tuple[Callable[[], dict], str]] = {}

        def register(spec: str, loader: Callable[[], dict], description: str = ""):
            found[spec] = (loader, description)

        pm.hook.register_weights(register=register)
        return found

    return _once("weights", collect)


def print_families(as_json: bool = False) -> None:
    """`sat encoders`: the families, their plugins and the offline weights (a table or JSON)."""
    import json
    import sys

    fams, offline = families(), offline_weights()
    if as_json:
        sys.stdout.write(json.dumps([
            {"prefix": f.prefix, "plugin": f.plugin, "description": f.description, "examples": list(f.examples)}
            for f in fams.values()
        ] + [{"offline_weights": spec, "source": src} for spec, (_, src) in offline.items()], indent=2) + "\n")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding

    # One block per family rather than a table: names stay whole in an 80-column terminal.
    console = Console()
    for f in fams.values():
        console.print(f"[bold]{escape(f.prefix)}[/]  (plugin {escape(f.plugin)})", highlight=False)
        console.print(Padding(escape(f.description), (0, 0, 0, 2)), highlight=False)
        for example in f.examples:
            console.print(Padding(escape(example), (0, 0, 0, 4)), highlight=False, overflow="ignore", crop=False)
    if offline:
        console.print("Offline ImageNet weights: " + ", ".join(f"{spec} ({src})" for spec, (_, src) in offline.items()))


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``prefix:name``; a helpful error when the prefix is unknown."""
    prefix, sep, name = spec.partition(":")
    known = families()
    if not sep or not name:
        raise EncoderError(
            f"Encoder spec {spec!r} is not of the form prefix:name. "
            f"Prefixes: {', '.join(sorted(known))}. Example: timm:tf_efficientnet_lite0"
        )
    if prefix not in known:
        hint = difflib.get_close_matches(prefix, list(known), n=1)
        raise EncoderError(
            f"Unknown encoder prefix {prefix!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f". Known prefixes: {', '.join(sorted(known))}. Run 'sat encoders' to list them."
        )
    return prefix, name


def unknown_name_error(family: EncoderFamily, name: str) -> EncoderError:
    """An error for a model name the family does not know, listing what exists."""
    names = family.list_names() if family.list_names else []
    if len(names) <= 20:
        return EncoderError(
            f"Unknown {family.prefix} model {name!r}. Available: "
            + ", ".join(f"{family.prefix}:{n}" for n in names)
        )
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    shown = close or names[:20]
    return EncoderError(
        f"Unknown {family.prefix} model {name!r}. "
        + ("Close matches: " if close else "Some of them: ")
        + ", ".join(f"{family.prefix}:{n}" for n in shown)
        + f" ({len(names)} in all; 'python -c \"import timm; print(timm.list_models())\"' lists timm's)"
    )


def create_encoder(spec: str, options: EncoderOptions | None = None):
    """Build the encoder a spec names.

    >>> create_encoder("timm:tf_efficientnet_lite0")          # offline ImageNet weights
    >>> create_encoder("torchvision:resnet101", EncoderOptions(grid=14))
    >>> create_encoder("vit:vit_small_patch16_224", EncoderOptions(pretrained=False))
    """
    prefix, name = parse_spec(spec)
    family, options = families()[prefix], options or EncoderOptions()
    if options.layers not in (None, (-1,)) and not family.stage_layers:
        raise EncoderError(f"{prefix}: encoders build their grid from the last feature map only; "
                           "--feature-layers works with timm CNNs (timm:...)")
    return family.build(name, options)
