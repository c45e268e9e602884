"""Commands: the ``sat`` click group (``main``) and its command modules; options in, one call out.

``sat = "sat_cli.cli:cli"`` (the console script) resolves here.
"""

from .main import cli

__all__ = ["cli"]
