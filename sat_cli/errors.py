"""Errors a user can act on. The CLI prints their message, never a traceback."""


class SatError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class EncoderError(SatError):
    """Unknown encoder prefix or model name."""


class WeightsError(SatError):
    """Pretrained weights are not available (offline and not cached, or a bad file)."""


class CheckpointError(SatError):
    """A model checkpoint that cannot be loaded."""


class DataError(SatError):
    """A caption data set that cannot be read."""
