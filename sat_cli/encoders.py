"""Moved to :mod:`sat_cli.model.encoders` (``EncoderFamily``, ``EncoderOptions``, ``Preprocess`` and the encoder registry).

This alias keeps plugins written against ``sat_cli.encoders`` working for one release and warns;
import ``sat_cli.model.encoders`` instead. Every name is the new module's own object.
"""

import warnings

from .model import encoders as _moved
from .model.encoders import *  # noqa: F401,F403

warnings.warn("sat_cli.encoders has moved to sat_cli.model.encoders; the old path goes away in the next release",
              DeprecationWarning, stacklevel=2)


def __getattr__(name):  # names ``import *`` leaves out (private helpers) come from the new module too
    return getattr(_moved, name)
