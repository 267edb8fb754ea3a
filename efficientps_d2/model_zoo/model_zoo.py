"""Configs by name, trained checkpoints by name, and models built from both.

Names are the configs' paths relative to the source tree's ``configs/`` folder, e.g.
"Cityscapes-PanopticSegmentation/efficientps_b5.yaml". That folder is the single source of truth:
``setup.py`` ships it inside the package as ``efficientps_d2/model_zoo/configs`` (a symlink in the
source tree, copied files in a wheel), and an editable install without it falls back to the source
tree's ``configs/``.

There are no released EfficientPS weights for this implementation yet, so :data:`CHECKPOINTS` holds
``None`` for every shipped config; :func:`register_checkpoint` adds a local file or URL.
"""

import os
from typing import Dict, Optional
from urllib.parse import urlparse

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

_HERE = os.path.dirname(os.path.abspath(__file__))
# Packaged copy (wheel) or build-time symlink (source tree), then the source tree itself.
_CONFIG_ROOTS = (
    os.path.join(_HERE, "configs"),
    os.path.join(os.path.dirname(os.path.dirname(_HERE)), "configs"),
)
_MARKER = "Base-EfficientPS.yaml"

# Config name -> trained checkpoint (URL or local path); None: nothing released for it.
CHECKPOINTS: Dict[str, Optional[str]] = {
    "Cityscapes-PanopticSegmentation/efficientps_b5.yaml": None,
    "Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml": None,
    "COCO-PanopticSegmentation/efficientps_b5.yaml": None,
}


def _configs_root():
    for root in _CONFIG_ROOTS:
        if os.path.isfile(os.path.join(root, _MARKER)):
            return root
    raise RuntimeError(
        "efficientps_d2's configs are not installed: none of "
        f"{[os.path.normpath(r) for r in _CONFIG_ROOTS]} holds '{_MARKER}'. Reinstall the package "
        "(`pip install .` from the source tree ships them)."
    )


def list_configs():
    """Names of the shipped model configs (the ``Base-*.yaml`` files they inherit are left out)."""
    root = _configs_root()
    names = []
    for folder, _, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(".yaml") and not f.startswith("Base-"):
                rel = os.path.relpath(os.path.join(folder, f), root)
                names.append(rel.replace(os.sep, "/"))
    return sorted(names)


def _normalise(name):
    name = name.replace("\\", "/")
    return name[len("configs/") :] if name.startswith("configs/") else name


def get_config_file(name):
    """Path of a shipped config file.

    Args:
        name: path relative to ``configs/``, e.g.
            "Cityscapes-PanopticSegmentation/efficientps_b5.yaml".
    Raises:
        RuntimeError: unknown name (the known ones are listed).
    """
    name = _normalise(name)
    root = _configs_root()
    path = os.path.normpath(os.path.join(root, name))
    inside = path.startswith(os.path.normpath(root) + os.sep)
    if not inside or not name.endswith(".yaml") or not os.path.isfile(path):
        raise RuntimeError(
            f"'{name}' is not in efficientps_d2's model zoo; the configs are: {list_configs()}."
        )
    return path


def list_checkpoints():
    """Config names that have a trained checkpoint (released or registered)."""
    return sorted(k for k, v in CHECKPOINTS.items() if v)


def register_checkpoint(name, path_or_url):
    """Registers (or, with None, removes) the trained checkpoint of a shipped config.

    Args:
        name: a config name of :func:`list_configs`.
        path_or_url: a local checkpoint file (checked to exist, stored as an absolute path), an
            http(s) URL, or None to remove the entry.
    """
    name = _normalise(name)
    get_config_file(name)  # raises for unknown names
    if path_or_url is None:
        CHECKPOINTS[name] = None
        return
    if not urlparse(str(path_or_url)).scheme:
        path_or_url = os.path.abspath(os.path.expanduser(str(path_or_url)))
        if not os.path.isfile(path_or_url):
            raise FileNotFoundError(f"Checkpoint '{path_or_url}' (for '{name}') does not exist.")
    CHECKPOINTS[name] = str(path_or_url)


def get_checkpoint_url(name):
    """The trained checkpoint (URL or local path) registered for a config name.

    Raises:
        RuntimeError: the config has no checkpoint (the names that have one are listed).
    """
    name = _normalise(name)
    get_config_file(name)
    url = CHECKPOINTS.get(name)
    if not url:
        available = list_checkpoints()
        raise RuntimeError(
            f"No trained checkpoint is registered for '{name}'. Configs with a checkpoint: "
            f"{available if available else 'none (no EfficientPS weights are released yet)'}. "
            "Register your own with efficientps_d2.model_zoo.register_checkpoint(name, path)."
        )
    return url


def get_config(name, trained=False):
    """The Detectron2 config of a shipped config name, EfficientPS's keys included.

    Args:
        name: see :func:`get_config_file`.
        trained: set MODEL.WEIGHTS to the registered trained checkpoint (else the config's own
            MODEL.WEIGHTS is kept).
    """
    from ..config import setup_cfg

    cfg = setup_cfg(get_config_file(name), freeze=False)
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_url(name)
    return cfg


def get(name, trained=False, device=None):
    """Builds the model of a shipped config and loads its weights (if any).

    Args:
        name: see :func:`get_config_file`.
        trained: load the registered trained checkpoint (see :func:`get_config`).
        device: e.g. "cpu" or "cuda"; default: the config's MODEL.DEVICE when CUDA is available,
            else "cpu".
    Returns:
        the EfficientPS model, in training mode like Detectron2's ``model_zoo.get``; call
        ``.eval()`` before inference.
    """
    from detectron2.modeling import build_model

    from ..checkpoint import EfficientPSCheckpointer

    cfg = get_config(name, trained)
    if device is not None:
        cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    EfficientPSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model
