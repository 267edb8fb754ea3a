"""Data: the panoptic dataset mapper, built-in synthetic data, custom data registration."""

from .custom import register_panoptic_dataset

__all__ = ["register_panoptic_dataset"]
