"""EfficientPS's model zoo: the shipped configs by name, and a registry of trained checkpoints.

from efficientps_d2 import model_zoo

cfg = model_zoo.get_config("Cityscapes-PanopticSegmentation/efficientps_b5.yaml")
model = model_zoo.get("Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml")
"""

from .model_zoo import (
    CHECKPOINTS,
    get,
    get_checkpoint_url,
    get_config,
    get_config_file,
    list_checkpoints,
    list_configs,
    register_checkpoint,
)

__all__ = [
    "CHECKPOINTS",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "list_checkpoints",
    "list_configs",
    "register_checkpoint",
]
