#!/usr/bin/env python
"""Trains and evaluates EfficientPS with Detectron2's DefaultTrainer.

    python train_net.py \
        --config-file configs/Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CONFIG --resume          # continue from the last checkpoint
    python train_net.py --config-file CONFIG --num-gpus 8      # DDP through detectron2's launch
"""

import logging
import os
import weakref
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

from efficientps_d2 import setup_cfg
from efficientps_d2.checkpoint import AtomicDetectionCheckpointer, EfficientPSCheckpointer
from efficientps_d2.config import tta_config
from efficientps_d2.data import EfficientPSDatasetMapper
from efficientps_d2.evaluation import build_evaluator
from efficientps_d2.solver import build_optimizer
from efficientps_d2.visualization import add_panoptic_visualization

logger = logging.getLogger("efficientps_d2")


class Trainer(DefaultTrainer):
    """DefaultTrainer with EfficientPS's mapper, evaluators, atomic checkpoints and, with
    VIS_PERIOD > 0, panoptic pictures in tensorboard."""

    def build_hooks(self):
        # DefaultTrainer made a plain DetectionCheckpointer; its hooks take whatever is here.
        # Loading stays Detectron2's (mismatched heads are skipped), as fine-tuning needs.
        self.checkpointer = AtomicDetectionCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return add_panoptic_visualization(self.cfg, super().build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=EfficientPSDatasetMapper(cfg, True))

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


def setup(args):
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    if cfg.MODEL.DEVICE == "cpu":
        logger.warning("CUDA is not available: running on the CPU.")
    return cfg


def main(args):
    cfg = setup(args)
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
