"""elemental: turn SmolVLM2-500M into an on-device image classifier and ship it to Android."""

__version__ = "0.1.0"
