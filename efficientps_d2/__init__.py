"""EfficientPS panoptic segmentation as a Detectron2 extension.

Importing this package registers its backbone, heads, meta-architecture and data sets with
Detectron2.
"""

import warnings


def _check_detectron2():
    try:
        with warnings.catch_warnings():
            # fvcore (imported by detectron2.layers) scripts its focal losses at import, and
            # recent torch (2.14) warns twice that torch.jit.script is deprecated: noise at every
            # start-up that no user of this package can act on. Only this import is silenced.
            warnings.filterwarnings(
                "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
            )
            import detectron2.modeling  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "efficientps_d2 needs detectron2, which is not on PyPI under its own name and could "
            f"not be imported ({e}). Run `bash scripts/setup_env.sh` from the efficientps_d2 "
            "source tree (it installs a pure-Python detectron2 into .venv), or install detectron2 "
            "yourself: "
            "`pip install 'git+https://github.com/facebookresearch/detectron2.git'`."
        ) from e


_check_detectron2()

from . import data  # noqa: E402,F401  (registers the built-in data sets)
from . import modeling  # noqa: E402,F401  (registers the components)
from .torchvision_weights import register_torchvision_handler  # noqa: E402

register_torchvision_handler()  # MODEL.WEIGHTS "torchvision://efficientnet_bN"
from .config import add_efficientps_config, setup_cfg  # noqa: E402

__version__ = "0.1.0"
__all__ = ["add_efficientps_config", "setup_cfg", "__version__"]
