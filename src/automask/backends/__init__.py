"""Backends: model code that turns an image and prompts into scores (see `base.Backend`)."""

from automask.backends.base import Backend, Scores

__all__ = ["Backend", "Scores"]
