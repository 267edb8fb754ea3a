"""Training and config-file plumbing beyond Detectron2's ``DefaultTrainer`` (LazyConfig support)."""

from . import lazy_train
from .lazy_config import is_lazy_config, load_config, thing_semantic_ids_of

__all__ = ["is_lazy_config", "lazy_train", "load_config", "thing_semantic_ids_of"]
