"""Model: the network and its files (decoder, beam search, vocabulary, encoders, checkpoints, plugin hooks).

Import the modules themselves (``sat_cli.model.checkpoint``); this package imports nothing, so
``vocab``, ``encoders`` and ``hookspecs`` stay free of torch.
"""
