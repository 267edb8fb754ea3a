"""EfficientPS's model zoo: the shipped configs by name, and the models they build.

from efficientps_d2 import model_zoo

cfg = model_zoo.get_config("Cityscapes-PanopticSegmentation/efficientps_b5.yaml")
model = model_zoo.get("Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml")
"""

from .model_zoo import *  # noqa: F401,F403  (the public names are model_zoo.__all__)
from .model_zoo import __all__  # noqa: F401
