"""Training goes on past a few unreadable samples, and stops when there are too many.

One corrupt JPEG among thousands should not stop a training run at the iteration that draws it.
:class:`SkipUnreadable` wraps a training mapper: when the mapper cannot read a sample's files
(``OSError``: missing, truncated or corrupt image or PNG) it logs a counted warning and returns
None, and Detectron2's ``MapDataset`` draws another sample instead. When more than
``max_fraction`` of the data set has proved unreadable it raises :class:`UnreadableDataError`: a
data set that broken needs fixing, not training around.

Faults of content (wrong sizes, bad ids) are not skipped: ``efficientps_d2.data.check`` refuses
them before training. With ``DATALOADER.NUM_WORKERS`` > 0 each worker process counts its own
failures, so the limit applies per worker.
"""

import logging

__all__ = ["SkipUnreadable", "UnreadableDataError"]

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
    """

    def __init__(self, mapper, *, num_samples, max_fraction):
        if not 0 <= max_fraction < 1:
            raise ValueError(
                f"DATALOADER.MAX_UNREADABLE_FRACTION must be in [0, 1), got {max_fraction}."
            )
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
                    f"than DATALOADER.MAX_UNREADABLE_FRACTION={self.max_fraction} allows: "
                    f"{listed}"
                ) from e
            logger.warning(f"Skipping unreadable training sample ({count} so far): {e}")
            return None
