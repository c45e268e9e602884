"""sat: caption folders of photos with a Show, Attend and Tell model."""

__version__ = "0.1.0"
