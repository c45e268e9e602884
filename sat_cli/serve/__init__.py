"""`sat serve`: a caption service that photo managers and scripts already know how to call
(PhotoPrism's Vision API, the Ollama API, sat's own). ``create_app`` builds the ASGI app."""

from .app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
