"""Inputs: finding and decoding photo files (``images``, ``formats``) and file names as bytes (``paths``)."""
