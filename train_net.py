#!/usr/bin/env python
"""Trains and evaluates EfficientPS with Detectron2's DefaultTrainer.

    python train_net.py \
        --config-file configs/Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CONFIG --resume          # continue from the last checkpoint
    python train_net.py --config-file CONFIG --num-gpus 8      # DDP through detectron2's launch
    # A LazyConfig (.py) file, with key=value overrides (Detectron2's lazyconfig_train_net flow):
    python train_net.py --config-file \
        configs/Synthetic-PanopticSegmentation/efficientps_b0_quick.py train.max_iter=100
"""

import logging
import os
import weakref
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from efficientps_d2 import setup_cfg
from efficientps_d2.atomic_io import remove_stale_temporaries
from efficientps_d2.checkpoint import EfficientPSCheckpointer
from efficientps_d2.config import configure_amp_trainer, tta_config
from efficientps_d2.data import EfficientPSDatasetMapper
from efficientps_d2.data.check import validate_datasets
from efficientps_d2.data.unreadable import SkipUnreadable
from efficientps_d2.engine import is_lazy_config, lazy_train
from efficientps_d2.evaluation import build_evaluator
from efficientps_d2.output_lock import lock_output_dir
from efficientps_d2.solver import build_optimizer
from efficientps_d2.visualization import add_panoptic_visualization

logger = logging.getLogger("efficientps_d2")


class Trainer(DefaultTrainer):
    """DefaultTrainer with EfficientPS's mapper, evaluators, atomic checkpoints and, with
    VIS_PERIOD > 0, panoptic pictures in tensorboard."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, copied because it wraps the model in DDP inline with
        # device_ids=[local rank], which DDP refuses for a CPU model (gloo); here CPU models get
        # device_ids=None. Everything else is as in Detectron2.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cuda = cfg.MODEL.DEVICE.startswith("cuda")
        model = create_ddp_model(
            model, broadcast_buffers=False, device_ids=[comm.get_local_rank()] if on_cuda else None
        )
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        configure_amp_trainer(self._trainer, cfg)  # SOLVER.AMP.PRECISION (bfloat16 or float16)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = None  # made in build_hooks, which needs self.cfg
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        # DefaultTrainer made a plain DetectionCheckpointer; its hooks take whatever is here.
        # Weights that do not fit are refused as in evaluation, and so are weights that leave
        # tensors random, unless MODEL.ALLOW_PARTIAL_WEIGHTS (fine-tuning on other classes) or
        # the file is a converted ImageNet backbone; resuming skips unreadable checkpoints.
        partial = self.cfg.MODEL.ALLOW_PARTIAL_WEIGHTS
        self.checkpointer = EfficientPSCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            allow_shape_mismatch=partial,
            allow_missing=partial,
            trainer=weakref.proxy(self),
        )
        return add_panoptic_visualization(self.cfg, super().build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        # The data set dicts as Detectron2 would load them, loaded here to size the skip limit.
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        mapper = SkipUnreadable(
            EfficientPSDatasetMapper(cfg, True),
            num_samples=len(dataset),
            max_fraction=cfg.DATALOADER.MAX_UNREADABLE_FRACTION,
        )
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=EfficientPSDatasetMapper(cfg, False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        from efficientps_d2.modeling.test_time_augmentation import EfficientPSWithTTA

        logger.info("Running inference with test-time augmentation ...")
        model = EfficientPSWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name)
            )
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in results.items()})


_output_dir_lock = None  # held (open) for the life of the training process


def setup(args):
    global _output_dir_lock
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    # torch's SyncBatchNorm runs on CUDA only; Detectron2's NaiveSyncBatchNorm syncs the same
    # statistics with all_reduce, which gloo does on the CPU.
    sync_bn_keys = [k for k in _NORM_KEYS if cfg.MODEL.DEVICE == "cpu" and _get(cfg, k) == "SyncBN"]
    for key in sync_bn_keys:
        cfg.merge_from_list([key, "naiveSyncBN"])
    cfg.freeze()
    if not args.eval_only and comm.is_main_process():
        # Before anything is written there: a second run on the same OUTPUT_DIR is refused.
        _output_dir_lock = lock_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    # default_setup logs only detectron2's and fvcore's loggers to OUTPUT_DIR/log.txt; add ours.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="efficientps_d2")
    if _output_dir_lock is not None:
        remove_stale_temporaries(cfg.OUTPUT_DIR)  # of killed runs; never read
    if cfg.MODEL.DEVICE == "cpu":
        logger.warning("CUDA is not available: running on the CPU.")
    if sync_bn_keys:
        logger.warning(f"On the CPU, {sync_bn_keys} use naiveSyncBN instead of SyncBN.")
    return cfg


# Config keys that choose a norm layer (detectron2.layers.get_norm names).
_NORM_KEYS = (
    "MODEL.EFFICIENTNET.NORM",
    "MODEL.TWO_WAY_FPN.NORM",
    "MODEL.SEM_SEG_HEAD.NORM",
    "MODEL.RPN.HEAD_NORM",
    "MODEL.ROI_BOX_HEAD.NORM",
    "MODEL.ROI_MASK_HEAD.NORM",
)


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def main(args):
    if is_lazy_config(args.config_file):
        # A Detectron2 LazyConfig (.py): Detectron2's lazyconfig_train_net flow.
        return lazy_train.main(args)
    cfg = setup(args)
    # Names, class counts and every panoptic PNG are checked now, not found wrong hours later.
    validate_datasets(cfg, training=not args.eval_only)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # Evaluating a checkpoint that does not fit the model is always a mistake: refuse it.
        EfficientPSCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if tta_config(cfg).ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if tta_config(cfg).ENABLED:
        from detectron2.engine import hooks

        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
