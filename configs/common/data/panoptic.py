# Train and test loaders for a panoptic data set in Detectron2's "standard" metadata, with
# EfficientPS's mapper (all-class semantic target, thing instances) and evaluators.
from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from omegaconf import OmegaConf

from efficientps_d2.data import EfficientPSDatasetMapper
from efficientps_d2.engine.lazy_config import thing_semantic_ids_of
from efficientps_d2.evaluation import build_dataset_evaluator


def panoptic_dataloader(
    *, train, test, num_classes, train_augmentations, test_augmentations, batch_size, num_workers=4
):
    """``dataloader.train``, ``.test`` and ``.evaluator`` for the data sets ``train``/``test``."""
    dataloader = OmegaConf.create()
    dataloader.train = L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names=train, filter_empty=False),
        mapper=L(EfficientPSDatasetMapper)(
            is_train=True,
            augmentations=train_augmentations,
            image_format="RGB",
            thing_semantic_ids=L(thing_semantic_ids_of)(dataset_name=train),
            ignore_label=255,
            num_classes=num_classes,
        ),
        total_batch_size=batch_size,
        num_workers=num_workers,
    )
    dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=test, filter_empty=False),
        mapper=L(EfficientPSDatasetMapper)(
            is_train=False,
            augmentations=test_augmentations,
            image_format="RGB",
            thing_semantic_ids=[],  # unused at inference
            ignore_label=255,
            num_classes=num_classes,
        ),
        num_workers=num_workers,
    )
    dataloader.evaluator = L(build_dataset_evaluator)(
        dataset_name="${..test.dataset.names}",
        output_folder="${...train.output_dir}/inference",
    )
    return dataloader
