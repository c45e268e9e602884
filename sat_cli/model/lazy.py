"""A checkpoint whose identity (path, config, fingerprint) is read at once and whose model (torch,
the encoder stack, the weights, the device) is built on first use of anything else: `sat caption`
holds one, so a rerun with nothing new to caption never imports torch or builds the model."""

from __future__ import annotations

from pathlib import Path


class LazyCheckpoint:
    lazy = True

    def __init__(self, path=None, encoder_weights: str | None = None, device: str = "auto",
                 precision: str = "auto"):
        from .checkpoint import fingerprint_of, read_config

        path, weights_path, config = read_config(path)
        self._args = (path, encoder_weights, device, precision)
        self._model = None
        self.config = config
        self.path = str(Path(path))
        self.fingerprint = fingerprint_of(weights_path, config)
        self.run_device, self.run_precision = device, precision  # what was asked, until built

    @property
    def built(self) -> bool:
        return self._model is not None

    @property
    def encoder_spec(self) -> str:
        return self.config["encoder"]["spec"]

    def decode_defaults(self) -> dict:
        return dict(self.config.get("decode", {}))

    def build(self):
        """The Checkpoint, loaded and prepared for inference (once)."""
        if self._model is None:
            from .checkpoint import load_checkpoint
            from ..runtime import Dist, resolve_device, resolve_precision

            path, encoder_weights, device, precision = self._args
            dist = Dist()
            dev = resolve_device(device, dist.local_rank if dist.world > 1 else None)
            model = load_checkpoint(path, encoder_weights=encoder_weights)
            self._model = model.for_inference(dev, resolve_precision(dev, precision))
            self.run_device, self.run_precision = str(self._model.device), self._model.precision
        return self._model

    def __getattr__(self, name):  # anything else (encoder, decoder, device...) needs the model
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.build(), name)
