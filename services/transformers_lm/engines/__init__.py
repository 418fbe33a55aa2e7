"""Engines run generation for the service: token ids in, `TokenStream`s out (see `../engine.py`)."""
