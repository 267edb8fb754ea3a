# Train and test loaders for a panoptic data set in Detectron2's "standard" metadata, with
# EfficientPS's mapper (all-class semantic target, thing instances) and evaluators.
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from omegaconf import OmegaConf

from efficientps_d2.data import EfficientPSDatasetMapper
from efficientps_d2.data.unreadable import build_train_loader_skipping_unreadable
from efficientps_d2.engine.lazy_config import thing_semantic_ids_of
from efficientps_d2.evaluation import build_dataset_evaluator


def panoptic_dataloader(
    *, train, test, train_augmentations, test_augmentations, batch_size, num_workers=4
):
    """``dataloader.train``, ``.test`` and ``.evaluator`` for the data sets ``train``/``test``."""
    dataloader = OmegaConf.create()
    # Detectron2's build_detection_train_loader, skipping unreadable samples (see below).
    dataloader.train = L(build_train_loader_skipping_unreadable)(
        dataset=L(get_detection_dataset_dicts)(names=train, filter_empty=False),
        mapper=L(EfficientPSDatasetMapper)(
            is_train=True,
            augmentations=train_augmentations,
            # The model's image format: one override (model.input_format) sets all three.
            image_format="${model.input_format}",
            thing_semantic_ids=L(thing_semantic_ids_of)(dataset_name="${...dataset.names}"),
            ignore_label=255,
            # The model's semantic classes: one override (model.sem_seg_head.num_classes) sets both.
            num_classes="${model.sem_seg_head.num_classes}",
        ),
        total_batch_size=batch_size,
        num_workers=num_workers,
        # A sample whose image or panoptic PNG cannot be read is skipped with a counted warning;
        # training stops, naming the files, when more than this fraction of the training data
        # set has proved unreadable (as DATALOADER.MAX_UNREADABLE_FRACTION; 0: at the first).
        max_unreadable_fraction=0.01,
    )
    dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=test, filter_empty=False),
        mapper=L(EfficientPSDatasetMapper)(
            is_train=False,
            augmentations=test_augmentations,
            image_format="${model.input_format}",
            thing_semantic_ids=[],  # unused at inference
            ignore_label=255,
            num_classes="${model.sem_seg_head.num_classes}",
        ),
        num_workers=num_workers,
    )
    dataloader.evaluator = L(build_dataset_evaluator)(
        dataset_name="${..test.dataset.names}",
        output_folder="${...train.output_dir}/inference",
    )
    return dataloader
