"""``torchvision://`` checkpoints: torchvision's ImageNet EfficientNets as MODEL.WEIGHTS.

Detectron2's own configs start from ImageNet weights named in MODEL.WEIGHTS
(``detectron2://ImageNetPretrained/...``), resolved by a path handler of Detectron2's
``PathManager``. EfficientPS does the same with torchvision's EfficientNet weights::

    MODEL:
      WEIGHTS: "torchvision://efficientnet_b5"          # the variant's default ImageNet weights
      WEIGHTS: "torchvision://EfficientNet_B5_Weights.IMAGENET1K_V1"   # or one weights entry

:class:`TorchvisionEfficientNetHandler` (registered on ``detectron2.utils.file_io.PathManager``
when ``efficientps_d2`` is imported) resolves such a name to a local Detectron2 checkpoint:

1. torchvision's file is read from torch's hub cache, ``$TORCH_HOME/hub/checkpoints/<name>``
   (``torch.hub.get_dir()``; e.g. ``efficientnet_b5_lukemelas-1a07897c.pth``), where torchvision
   itself keeps it; when it is not there, it is downloaded into that folder through
   torchvision's weights API (``WeightsEnum.get_state_dict``, hash checked);
2. it is converted by :mod:`efficientps_d2.tools.convert_torchvision_weights` (trunk tensors
   renamed to ``backbone.bottom_up.*``; squeeze-and-excitation and the classifier dropped and
   reported), and the result is cached as ``<iopath cache>/efficientps_d2/<name>_efficientps.pth``
   (``$FVCORE_CACHE``, default ``~/.torch/iopath_cache``), written atomically under a file lock so
   that several processes of one run convert it once.

Offline, copy torchvision's file into the hub folder (the error names the file, its URL and the
folder), or convert any local copy yourself and name the result in MODEL.WEIGHTS.

Squeeze-and-excitation weights are dropped, as EfficientPS removes SE; a model that keeps it
(MODEL.EFFICIENTNET.SQUEEZE_EXCITATION True) takes a file converted by hand with
``convert_torchvision_weights --squeeze-excitation`` (else its SE weights stay random, reported).
"""

import logging
import os
import re
from typing import Callable, Optional

import torch
from detectron2.utils.file_io import PathHandler, PathManager
from iopath.common.file_io import file_lock, get_cache_dir

from .atomic_io import atomic_write, check_writable_file

__all__ = [
    "PREFIX",
    "PretrainedWeightsUnavailable",
    "TorchvisionEfficientNetHandler",
    "register_torchvision_handler",
    "resolve_weights",
]

logger = logging.getLogger(__name__)

PREFIX = "torchvision://"
_MODEL_NAME = re.compile(r"^efficientnet_(b[0-7])$")
_WEIGHTS_NAME = re.compile(r"^EfficientNet_(B[0-7])_Weights\.\w+$")


class PretrainedWeightsUnavailable(RuntimeError):
    """torchvision's weights file is neither in the local cache nor downloadable."""


def resolve_weights(name):
    """``"efficientnet_b5"`` or ``"EfficientNet_B5_Weights.IMAGENET1K_V1"`` -> (variant, weights).

    ``weights`` is torchvision's ``WeightsEnum`` member (its ``url`` names the file); a model name
    gives the variant's default weights.
    """
    from torchvision.models import get_model_weights, get_weight

    model = _MODEL_NAME.match(name)
    if model:
        return model.group(1), get_model_weights(name).DEFAULT
    weights = _WEIGHTS_NAME.match(name)
    if weights:
        try:
            return weights.group(1).lower(), get_weight(name)
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"MODEL.WEIGHTS '{PREFIX}{name}': torchvision has no {name} ({e}).")
    raise ValueError(
        f"MODEL.WEIGHTS '{PREFIX}{name}' names no torchvision EfficientNet: use "
        f"'{PREFIX}efficientnet_bN' (N = 0 ... 7) or "
        f"'{PREFIX}EfficientNet_BN_Weights.IMAGENET1K_V1'."
    )


def _download(weights):
    # torchvision's own path: load_state_dict_from_url into torch.hub.get_dir()/checkpoints.
    return weights.get_state_dict(progress=True, check_hash=True)


class TorchvisionEfficientNetHandler(PathHandler):
    """Resolves ``torchvision://efficientnet_bN`` to a converted EfficientPS backbone checkpoint.

    Args:
        hub_dir: torch's hub folder; torchvision's files are in its ``checkpoints/`` subfolder.
            Default: ``torch.hub.get_dir()`` at the time of the call (``$TORCH_HOME/hub``).
        cache_dir: where converted checkpoints are kept. Default:
            ``<iopath's get_cache_dir()>/efficientps_d2``.
        download: ``download(weights) -> state_dict``, called with torchvision's ``WeightsEnum``
            member when its file is not in ``hub_dir``; default: torchvision's
            ``weights.get_state_dict`` (which stores the file in torch's hub folder).
    """

    def __init__(
        self,
        hub_dir: Optional[str] = None,
        cache_dir: Optional[str] = None,
        download: Optional[Callable] = None,
    ):
        super().__init__()
        self.hub_dir = hub_dir
        self.cache_dir = cache_dir
        self.download = download or _download

    def _get_supported_prefixes(self):
        return [PREFIX]

    def torchvision_file(self, weights):
        """Where torchvision keeps the file of ``weights`` (it may not exist yet)."""
        hub_dir = self.hub_dir or torch.hub.get_dir()
        return os.path.join(hub_dir, "checkpoints", os.path.basename(weights.url))

    def converted_file(self, weights):
        cache_dir = self.cache_dir or os.path.join(get_cache_dir(), "efficientps_d2")
        stem = os.path.splitext(os.path.basename(weights.url))[0]
        return os.path.join(cache_dir, f"{stem}_efficientps.pth")

    def _get_local_path(self, path, force=False, **kwargs):
        self._check_kwargs(kwargs)
        variant, weights = resolve_weights(path[len(PREFIX) :])
        output = self.converted_file(weights)
        with file_lock(output):
            if force or not os.path.isfile(output):
                self._convert(path, variant, weights, output)
        return output

    def _convert(self, path, variant, weights, output):
        from .tools.convert_torchvision_weights import (
            WeightConversionError,
            convert_torchvision_efficientnet,
            convert_torchvision_file,
        )

        # A fault of the cache, not of torchvision's file: said so before that file is read.
        check_writable_file(output, "cached conversion", WeightConversionError)
        local = self.torchvision_file(weights)
        if os.path.isfile(local):
            logger.info(f"{path}: converting torchvision's '{local}'.")
            try:
                checkpoint, report = convert_torchvision_file(local, variant)
            except WeightConversionError as e:  # a broken or misnamed copy in the hub folder
                raise WeightConversionError(
                    f"MODEL.WEIGHTS '{path}': torchvision's file in the hub folder cannot be "
                    f"used. {e} Delete '{local}' (it is then downloaded again from "
                    f"{weights.url}) or replace it with that file."
                ) from e
        else:
            logger.info(f"{path}: '{local}' is not there; downloading {weights.url}.")
            try:
                state_dict = self.download(weights)
            except Exception as e:
                raise PretrainedWeightsUnavailable(_offline_message(path, weights, local, e)) from e
            checkpoint, report = convert_torchvision_efficientnet(state_dict, variant)
        atomic_write(output, lambda f: torch.save(checkpoint, f), remove_stale=True)
        logger.info(f"{path}: {report.summary()}\nCached as '{output}'.")

    def _open(self, path, mode="r", **kwargs):
        return open(self._get_local_path(path), mode)

    def _isfile(self, path, **kwargs):
        return self._exists(path)

    def _exists(self, path, **kwargs):
        try:
            resolve_weights(path[len(PREFIX) :])
        except ValueError:
            return False
        return True


def _offline_message(path, weights, local, error):
    name = f"{type(weights).__name__}.{weights.name}"
    return (
        f"MODEL.WEIGHTS '{path}': torchvision's {name} are not in the local cache and could not "
        f"be downloaded from {weights.url} ({type(error).__name__}: {error}). Without network, "
        f"either copy that file (as downloaded, e.g. by `torchvision.models.get_weight('{name}')"
        f".get_state_dict()` on a machine with network) to '{local}' (set TORCH_HOME to use "
        "another torch hub folder), or convert a local copy yourself with `python -m "
        "efficientps_d2.tools.convert_torchvision_weights --variant "
        f"{_variant_of(weights)} FILE.pth backbone.pth` and set MODEL.WEIGHTS backbone.pth; "
        "or set MODEL.WEIGHTS '' to train from scratch."
    )


def _variant_of(weights):
    return type(weights).__name__.split("_")[1].lower()


def register_torchvision_handler(handler=None):
    """Registers ``handler`` (default: a new one) for ``torchvision://`` on Detectron2's
    ``PathManager``, replacing any earlier one; returns it."""
    handler = handler or TorchvisionEfficientNetHandler()
    PathManager.register_handler(handler, allow_override=True)
    return handler
