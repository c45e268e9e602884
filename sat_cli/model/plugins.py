"""The plugin manager: built-in encoder plugins plus third-party ones from entry points."""

import importlib
import os
import sys

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "sat_cli"

DEFAULT_PLUGINS = (
    "sat_cli_plugins.torchvision_resnet",
    "sat_cli_plugins.timm_models",
    "sat_cli_plugins.vit_grid",
    "sat_cli_plugins.efficientnet_lite",
)

pm = pluggy.PluginManager("sat_cli")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins():
    """Register the built-in plugins and those installed under the ``sat_cli`` entry point group.

    Runs once, on first use (never at import). ``SAT_NO_ENTRYPOINTS=1`` skips third-party plugins.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in DEFAULT_PLUGINS:
        if pm.get_plugin(name) is None:
            pm.register(importlib.import_module(name), name=name)
    if not os.environ.get("SAT_NO_ENTRYPOINTS"):
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken third-party plugin must not break the tool
            print(f"sat: warning: could not load a plugin: {exc}", file=sys.stderr)
    pm.check_pending()


def plugin_names():
    """Names of the registered plugins, built-in first."""
    load_plugins()
    return [pm.get_name(p) for p in pm.get_plugins()]
