"""Helpers the test modules share: tiny models (``models``) and checkpoint builders (``checkpoints``)."""
