"""Training goes on past a few unreadable samples, and stops when there are too many.

One corrupt JPEG among thousands should not stop a training run at the iteration that draws it.
:class:`SkipUnreadable` wraps a training mapper: when the mapper cannot read a sample's files
(``OSError``: missing, truncated or corrupt image or PNG) it logs a counted warning and returns
None, and Detectron2's ``MapDataset`` draws another sample instead. When more than
``max_fraction`` of the data set has proved unreadable it raises :class:`UnreadableDataError`: a
data set that broken needs fixing, not training around.

A YAML config sets the fraction in ``DATALOADER.MAX_UNREADABLE_FRACTION`` (train_net.py's
``Trainer`` wraps its mapper); a LazyConfig builds its training loader with
:func:`build_train_loader_skipping_unreadable`, whose ``max_unreadable_fraction`` argument
(``dataloader.train.max_unreadable_fraction``) is the same setting.

Faults of content (wrong sizes, bad ids) are not skipped: ``efficientps_d2.data.check`` refuses
them before training. With ``DATALOADER.NUM_WORKERS`` > 0 (``dataloader.train.num_workers``) each
worker process counts its own failures, so the limit applies per worker.
"""

import logging

from detectron2.data import build_detection_train_loader

__all__ = ["SkipUnreadable", "UnreadableDataError", "build_train_loader_skipping_unreadable"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


class UnreadableDataError(RuntimeError):
    """Too many training samples cannot be read."""


class SkipUnreadable:
    """Calls ``mapper``; returns None (skip) for a sample whose files cannot be read.

    Args:
        mapper: the training mapper, e.g. :class:`EfficientPSDatasetMapper`.
        num_samples: size of the training data set.
        max_fraction: the largest fraction of ``num_samples`` that may be unreadable
            (``DATALOADER.MAX_UNREADABLE_FRACTION``); 0 stops at the first one.
        key: the config key that sets ``max_fraction``, for messages.
    """

    def __init__(
        self, mapper, *, num_samples, max_fraction, key="DATALOADER.MAX_UNREADABLE_FRACTION"
    ):
        if not 0 <= max_fraction < 1:
            raise ValueError(f"{key} must be in [0, 1), got {max_fraction}.")
        self.key = key
        self.mapper = mapper
        self.num_samples = num_samples
        self.max_fraction = max_fraction
        self.unreadable = {}  # file name -> error, of every sample that failed

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except OSError as e:
            name = dataset_dict.get("file_name", "?")
            self.unreadable[name] = str(e)
            count = len(self.unreadable)
            if count > self.max_fraction * self.num_samples:
                listed = "; ".join(list(self.unreadable.values())[:_MAX_LISTED])
                raise UnreadableDataError(
                    f"{count} of the {self.num_samples} training samples cannot be read, more "
                    f"than {self.key}={self.max_fraction} allows: "
                    f"{listed}"
                ) from e
            logger.warning(f"Skipping unreadable training sample ({count} so far): {e}")
            return None


def build_train_loader_skipping_unreadable(
    dataset, *, mapper, max_unreadable_fraction=0.01, **kwargs
):
    """Detectron2's ``build_detection_train_loader`` (its LazyConfig arguments: ``dataset``,
    ``mapper``, ``total_batch_size``, ``num_workers``, ...) with ``mapper`` wrapped in
    :class:`SkipUnreadable`: unreadable samples are skipped until more than
    ``max_unreadable_fraction`` of ``dataset`` has proved unreadable, which stops training.

    ``dataset`` is a list of data set dicts (or a map-style data set: its length sizes the limit).
    """
    mapper = SkipUnreadable(
        mapper,
        num_samples=len(dataset),
        max_fraction=max_unreadable_fraction,
        key="dataloader.train.max_unreadable_fraction",
    )
    return build_detection_train_loader(dataset, mapper=mapper, **kwargs)
