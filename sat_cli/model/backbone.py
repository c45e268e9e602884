"""The Encoder module every plugin returns: image batch in, grid of feature vectors out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError
from .encoders import Preprocess


class Encoder(nn.Module):
    """Base class. Subclasses set ``self.backbone`` and implement :meth:`feature_map`.

    ``forward`` takes uint8 images (B, 3, H, W) already resized to ``preprocess.size``,
    normalizes them on the model's device and returns features (B, P, C), P = grid cells.
    """

    # Images per forward pass on the CPU when no gradients are needed: a larger batch spills the
    # activations out of the cache (384-px Lite0 on a 2-core Xeon: 37 ms/image in chunks of 8,
    # 39 at 16, 58 at 32), so callers can pass large batches (beam search wants them) for free.
    # Smaller chunks are faster on an idle machine (chunks of 2: 26-30 ms) but each pass costs
    # ~1.2 s when another process keeps the cores busy (the OpenMP threads wait for each other at
    # every layer), so fewer passes win there: 8 is the compromise (bench/caption_bench.py --only chunks).
    CPU_CHUNK = 8

    def __init__(self, spec: str, preprocess: Preprocess, out_dim: int, grid: int | None = None):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.out_dim = out_dim  # C
        self.grid = grid
        self.layers: tuple[int, ...] | None = None  # stages that form the grid (None: the last map)
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)
        self._grid_shape: tuple[int, int] | None = None
        self.input_channels_last = False

    def layer_channels(self) -> list[tuple[int, int]]:
        """(layer, channels) of each block of the grid's channels, in order: one block, the last
        map (-1), unless a subclass concatenates several layers."""
        return [(-1, self.out_dim)]

    def use_channels_last(self) -> "Encoder":
        """Run the convolutions on channels-last tensors: the same numbers up to rounding, and
        much faster on CPUs (Lite0 at 384 px: 38 instead of 91 ms per image) and on GPUs in fp16."""
        self.to(memory_format=torch.channels_last)
        self.input_channels_last = True
        return self

    def fold_batch_norm(self) -> int:
        """For inference only: fold every batch norm that follows a convolution into the weights
        and bias of that convolution (its frozen statistics), keeping the norm layer's activation.
        Each fold saves one pass over a layer's activations (384-px Lite0 on a 2-core CPU: 30 instead
        of 40 ms per image). Pairs are found by registration order (a convolution and the norm
        registered right after it in the same module); a probe image checks the result, and if the
        features moved by more than rounding the encoder is restored unchanged. Returns the number
        of folded pairs. Afterwards the encoder cannot be trained or saved as its architecture."""
        if self.training:
            raise RuntimeError("fold_batch_norm() is for inference: call eval() first")
        pairs = []  # (parent, name of the norm, conv, norm)
        for parent in self.backbone.modules():
            children = list(parent.named_children())
            for (_, conv), (name, norm) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) \
                        and norm.track_running_stats and norm.num_features == conv.out_channels:
                    pairs.append((parent, name, conv, norm))
        if not pairs:
            return 0
        p = next(self.parameters())
        grid = self._grid_shape
        probe = torch.randint(0, 256, (1, 3, *self.preprocess.size), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0)).to(p.device)
        with torch.no_grad():
            try:  # a 64 px corner of the probe checks the fold as well, for a fraction of the cost
                before = self.encode(probe[:, :, :64, :64])
                probe = probe[:, :, :64, :64]
            except RuntimeError:  # a network that takes only its own input size
                before = self.encode(probe)
            self._grid_shape = grid  # the probe's grid is not the model's
            saved = [(conv.weight.detach().clone(), conv.bias) for _, _, conv, _ in pairs]
            for parent, name, conv, norm in pairs:
                scale = (norm.weight if norm.affine else 1.0) / torch.sqrt(norm.running_var + norm.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                shift = norm.bias if norm.affine else 0.0
                conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(shift + (bias - norm.running_mean) * scale, requires_grad=False)
                rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
                setattr(parent, name, nn.Sequential(*rest) if rest else nn.Identity())
            after = self.encode(probe)
            self._grid_shape = grid
            if not torch.allclose(after, before, rtol=1e-3, atol=1e-3 * float(before.abs().max()) + 1e-6):
                for (parent, name, conv, norm), (weight, bias) in zip(pairs, saved):  # undo, in place
                    conv.weight.copy_(weight)
                    conv.bias = bias
                    setattr(parent, name, norm)
                return 0
        return len(pairs)  # weights were updated in place: a channels-last layout stays

    def set_preprocess(self, preprocess: Preprocess):
        """Use a checkpoint's recorded preprocessing (size, mean, std)."""
        self.preprocess = preprocess
        self.mean.copy_(torch.tensor(preprocess.mean).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(preprocess.std).view(1, 3, 1, 1))
        self._grid_shape = None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images (B, 3, H, W) -> feature map (B, C, h, w)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if len(images) > self.CPU_CHUNK and images.device.type == "cpu" and not torch.is_grad_enabled():
            return torch.cat([self.encode(chunk) for chunk in images.split(self.CPU_CHUNK)])
        return self.encode(images)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """One pass: uint8 or float images (B, 3, H, W) -> features (B, P, C)."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        x = (x - self.mean) / self.std
        if self.input_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        else:  # batches come with channels-last strides (inputs.images.collate)
            x = x.contiguous()
        fmap = self.feature_map(x)  # (B, C, h, w)
        if self.grid and tuple(fmap.shape[-2:]) != (self.grid, self.grid):
            fmap = F.adaptive_avg_pool2d(fmap, self.grid)
        self._grid_shape = tuple(fmap.shape[-2:])
        return fmap.flatten(2).transpose(1, 2)  # (B, P, C)

    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the feature grid for an input of ``preprocess.size``."""
        if self._grid_shape is None:
            p = next(self.parameters())
            with torch.no_grad():
                self(torch.zeros(1, 3, *self.preprocess.size, dtype=torch.uint8, device=p.device))
        return self._grid_shape


def load_weights_file(path: str) -> dict:
    """A state dict from a .safetensors file or a .pth/.pt file of tensors (never unpickles code)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"Encoder weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"Could not read encoder weights from {p}: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{p} does not hold a state dict")
    return state


def load_into(module: nn.Module, state: dict, source: str, ignore_prefixes: tuple[str, ...] = ()):
    """Load a state dict strictly, but let classifier heads we drop anyway be missing or extra."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = {k for k in module.state_dict() if not k.startswith(ignore_prefixes)}
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise WeightsError(
            f"Weights from {source} do not fit this model: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    module.load_state_dict(state, strict=False)
