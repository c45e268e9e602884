"""Checkpoints: a folder with ``model.safetensors`` (weights) and ``config.json`` (vocabulary,
encoder spec, grid, preprocessing, decoder config, format version). Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import CheckpointError, SatError
from .encoders import EncoderOptions, Preprocess

FORMAT = "sat-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
DEFAULT_MODEL = Path(__file__).parent.parent / "models" / "default"
MODEL_FIELDS = ("encoder", "preprocess", "decoder", "vocab")  # the config parts that change the output


def resolve_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) for a checkpoint folder, its .safetensors file or its config.json."""
    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{p} looks like a pickle-based PyTorch file ({p.suffix}). sat never unpickles model files, "
            "because unpickling can run arbitrary code. Use a sat checkpoint folder "
            f"({WEIGHTS} + {CONFIG}), e.g. one written by 'sat train'; a checkpoint of sgrvinod's "
            "tutorial converts with 'sat import sgrvinod FILE --word-map WORDMAP.json --out DIR'."
        )
    if p.is_dir():
        weights, config = p / WEIGHTS, p / CONFIG
    elif p.suffix == ".safetensors":
        weights, config = p, p.with_name(CONFIG)
    elif p.name.endswith(".json"):
        weights, config = p.with_name(WEIGHTS), p
    elif not p.exists():
        raise CheckpointError(f"Model not found: {p}")
    else:
        raise CheckpointError(f"{p} is not a sat checkpoint (expected a folder with {WEIGHTS} and {CONFIG})")
    for f in (weights, config):
        if not f.is_file():
            raise CheckpointError(f"Incomplete checkpoint: {f} is missing")
    return weights, config


def read_safetensors(path: Path) -> dict:
    """Tensors from a safetensors file; anything else (a pickle, say) is refused unread."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        raise CheckpointError(
            f"{path} is not a safetensors file (it may be a renamed pickle); sat never unpickles model files"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc


def fingerprint_of(weights: Path, config: dict) -> str:
    """sha256 of the weights file and of the parts of the config that change the output."""
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    core = {k: config.get(k) for k in MODEL_FIELDS}
    h.update(json.dumps(core, sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A loaded model: encoder + decoder + vocabulary, on one device."""

    encoder: object
    decoder: object
    vocab: object
    config: dict
    fingerprint: str
    path: str
    device: object = None
    precision: str = "fp32"  # of the encoder's forward pass (see for_inference)
    extra: dict = field(default_factory=dict)

    @property
    def encoder_spec(self) -> str:
        return self.config["encoder"]["spec"]

    @property
    def preprocess(self) -> Preprocess:
        return self.encoder.preprocess

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the feature grid: the shape of each attention map."""
        return self.encoder.grid_shape()

    def decode_defaults(self) -> dict:
        return dict(self.config.get("decode", {}))

    def to(self, device):
        self.encoder.to(device)
        self.decoder.to(device)
        self.device = device
        return self

    def for_inference(self, device, precision: str = "fp32"):
        """Move to ``device``, run the encoder in ``precision`` and make it inference-only (batch
        norms folded into their convolutions): what `sat caption`, `sat eval` and the Python API
        run. Not for training or saving."""
        self.to(device)
        self.precision = precision
        self.encoder.fold_batch_norm()
        return self


def read_config(path: str | Path | None = None) -> tuple[Path, Path, dict]:
    """A checkpoint folder's (path, weights file, checked config), without torch (default: the
    model shipped with sat)."""
    if path is None:
        if not (DEFAULT_MODEL / WEIGHTS).is_file():
            raise CheckpointError("No default model is installed with this copy of sat: pass --model PATH")
        path = DEFAULT_MODEL
    weights_path, config_path = resolve_paths(path)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{config_path} is not a sat checkpoint config (format: {found!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format version {config['format_version']}; this sat reads up to "
            f"{FORMAT_VERSION}. Upgrade sat."
        )
    return Path(path), weights_path, config


def load_checkpoint(path: str | Path | None = None, encoder_weights: str | None = None) -> Checkpoint:
    """Load a checkpoint folder (default: the model shipped with sat) on the CPU."""
    from .backbone import load_into
    from .decoder import Decoder, DecoderConfig
    from .encoders import create_encoder
    from .vocab import Vocab

    path, weights_path, config = read_config(path)
    state = read_safetensors(weights_path)
    enc = config["encoder"]
    in_checkpoint = enc.get("weights") == "checkpoint"
    options = EncoderOptions(
        grid=enc.get("grid"),
        image_size=enc.get("image_size"),
        pretrained=not in_checkpoint and encoder_weights is None,
        weights=encoder_weights if not in_checkpoint else None,
        layers=tuple(enc["layers"]) if enc.get("layers") else None,
    )
    try:
        encoder = create_encoder(enc["spec"], options)
    except SatError:
        raise
    encoder.set_preprocess(Preprocess.from_dict(config["preprocess"]))
    if in_checkpoint:
        enc_state = {k[len("encoder."):]: v.float() for k, v in state.items() if k.startswith("encoder.")}
        load_into(encoder, enc_state, str(weights_path))
    decoder = Decoder(DecoderConfig.from_dict(config["decoder"]))
    dec_state = {k[len("decoder."):]: v.float() for k, v in state.items() if k.startswith("decoder.")}
    try:
        decoder.load_state_dict(dec_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"Decoder weights in {weights_path} do not match its config: {exc}") from exc
    decoder.eval()
    encoder.eval()
    return Checkpoint(
        encoder=encoder, decoder=decoder, vocab=Vocab(config["vocab"]), config=config,
        fingerprint=fingerprint_of(weights_path, config), path=str(Path(path)),
    )


def save_checkpoint(path: str | Path, encoder, decoder, vocab, *, include_encoder: bool = False,
                    decode: dict | None = None, training: dict | None = None, half: bool = False) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` (atomically replaced)."""
    import torch
    from safetensors.torch import save_file

    from ..atomic import folder, usual_mode

    out = Path(path)
    dtype = torch.float16 if half else torch.float32
    tensors = {f"decoder.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in decoder.state_dict().items()}
    if include_encoder:
        for k, v in encoder.state_dict().items():
            v = v.detach().cpu()
            tensors[f"encoder.{k}"] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    grid = encoder.grid
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sat_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoder": {
            "spec": encoder.spec,
            "grid": grid,
            "image_size": encoder.preprocess.size[0],
            "weights": "checkpoint" if include_encoder else "pretrained",
            "out_dim": encoder.out_dim,
            **({"layers": list(encoder.layers)} if getattr(encoder, "layers", None) else {}),
        },
        "preprocess": encoder.preprocess.to_dict(),
        "decoder": decoder.config.to_dict(),
        "vocab": list(vocab.itos),
        "decode": decode or {},
        "training": training or {},
    }
    # A new folder is built under a temporary name and renamed in; in an existing one each file is
    # written beside its target and renamed over it. A failure leaves the previous checkpoint.
    with folder(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        os.chmod(tmp / WEIGHTS, usual_mode())  # safetensors creates the file owner-only
        (tmp / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return out


def _comparable(ck, key: str):
    """A config part as the model reads it: the decoder with its defaults filled in, so a config
    written before a field existed equals one that spells out that field's default."""
    if key == "decoder":
        from dataclasses import asdict

        return asdict(ck.decoder.config)
    return ck.config.get(key)


def average_checkpoints(paths: list, out: str | Path, half: bool = False) -> Path:
    """Write the uniform average of the weights of several checkpoints of one model (same
    encoder, preprocessing, vocabulary and sizes: typically epochs of one run) to ``out``."""
    import torch

    if len(paths) < 2:
        raise SatError("averaging needs at least two checkpoints")
    cks = [load_checkpoint(p) for p in paths]
    first = cks[0]
    for ck in cks[1:]:
        for key in MODEL_FIELDS:
            if _comparable(ck, key) != _comparable(first, key):
                raise CheckpointError(
                    f"{ck.path} and {first.path} differ in their {key}: only checkpoints of one model "
                    "(same encoder, preprocessing, vocabulary and sizes, e.g. epochs of one run) can be averaged")

    def mean_into(modules):
        states = [m.state_dict() for m in modules]
        averaged = {}
        for name, value in states[0].items():
            if value.is_floating_point():
                averaged[name] = torch.stack([s[name].float() for s in states]).mean(0).to(value.dtype)
            else:  # counters such as batch norm's num_batches_tracked
                averaged[name] = value
        modules[0].load_state_dict(averaged)

    mean_into([ck.decoder for ck in cks])
    with_encoder = first.config["encoder"].get("weights") == "checkpoint"
    if with_encoder:
        mean_into([ck.encoder for ck in cks])
    training = dict(first.config.get("training") or {})
    training["averaged_from"] = [
        {"path": str(ck.path), "fingerprint": ck.fingerprint, "epoch": (ck.config.get("training") or {}).get("epoch")}
        for ck in cks]
    return save_checkpoint(out, first.encoder, first.decoder, first.vocab, include_encoder=with_encoder,
                           decode=first.config.get("decode"), training=training, half=half)
