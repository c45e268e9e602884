"""sat: caption folders of photos with a Show, Attend and Tell model.

    >>> import sat_cli
    >>> cap = sat_cli.load()                        # the shipped model
    >>> cap(["photo.jpg"])[0].text
    'a cat lying on a bed'

See :mod:`sat_cli.api` for the Python API; ``sat --help`` for the command line.
"""

__version__ = "0.1.0"
__all__ = ["load", "Captioner", "Result", "Caption", "__version__"]


def __getattr__(name):  # torch is imported on first use, not by `import sat_cli`
    if name in ("load", "Captioner", "Result", "Caption"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sat_cli' has no attribute {name!r}")
