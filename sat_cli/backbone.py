"""Moved to :mod:`sat_cli.model.backbone` (the ``Encoder`` base class and the weight loaders).

This alias keeps plugins written against ``sat_cli.backbone`` working for one release and warns;
import ``sat_cli.model.backbone`` instead. Every name is the new module's own object.
"""

import warnings

from .model import backbone as _moved
from .model.backbone import *  # noqa: F401,F403

warnings.warn("sat_cli.backbone has moved to sat_cli.model.backbone; the old path goes away in the next release",
              DeprecationWarning, stacklevel=2)


def __getattr__(name):  # names ``import *`` leaves out (private helpers) come from the new module too
    return getattr(_moved, name)
