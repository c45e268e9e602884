"""Moved to :mod:`sat_cli.model.hookspecs` (the plugin hook specifications and the ``hookimpl`` marker).

This alias keeps plugins written against ``sat_cli.hookspecs`` working for one release and warns;
import ``sat_cli.model.hookspecs`` instead. Every name is the new module's own object.
"""

import warnings

from .model import hookspecs as _moved
from .model.hookspecs import *  # noqa: F401,F403

warnings.warn("sat_cli.hookspecs has moved to sat_cli.model.hookspecs; the old path goes away in the next release",
              DeprecationWarning, stacklevel=2)


def __getattr__(name):  # names ``import *`` leaves out (private helpers) come from the new module too
    return getattr(_moved, name)
