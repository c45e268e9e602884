"""Plugin hooks. A plugin module implements one or more of these with ``@hookimpl``."""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("sat_cli")
hookimpl = HookimplMarker("sat_cli")


@hookspec
def register_encoders(register):
    """Register encoder families.

    :param register: call ``register(EncoderFamily(...))`` once per family; the family's
        ``prefix`` is the part before the colon in a spec such as ``timm:efficientnet_b3``.
    """


@hookspec
def register_weights(register):
    """Register pretrained weights that are available without a download.

    :param register: call ``register(spec, loader, description)``; ``loader()`` returns the
        state dict of the backbone that ``spec`` (``prefix:name``) builds.
    """
