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

import efficientps_d2  # noqa: F401  # isort: skip  (first: imports detectron2 without fvcore noise)
import functools
import logging
import os
import weakref
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, TrainerBase, default_argument_parser, launch
from detectron2.utils.logger import setup_logger

from efficientps_d2.config import tta_config
from efficientps_d2.config_adapter import ConfigAdapter
from efficientps_d2.data import EfficientPSDatasetMapper
from efficientps_d2.engine import is_lazy_config, lazy_train, startup
from efficientps_d2.evaluation import build_evaluator
from efficientps_d2.solver import build_optimizer
from efficientps_d2.visualization import add_panoptic_visualization

logger = logging.getLogger("efficientps_d2")


class Trainer(DefaultTrainer):
    """DefaultTrainer with EfficientPS's mapper, evaluators, atomic checkpoints, with VIS_PERIOD > 0
    panoptic pictures in tensorboard and with TEST.AUG.ENABLED an evaluation with test-time
    augmentation after training. Its writers are made when the training starts, after resuming,
    so that metrics.json and tensorboard hold each iteration once (ResumingPeriodicWriter)."""

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
        model = startup.wrap_ddp(model, cfg.MODEL.DEVICE, broadcast_buffers=False)
        # AMPTrainer autocasts to SOLVER.AMP.PRECISION (bfloat16 or float16).
        self._trainer = startup.build_trainer(model, data_loader, optimizer, ConfigAdapter(cfg))
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = None  # made in build_hooks, which needs self.cfg
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def train(self):
        """DefaultTrainer.train, with the results checked by :func:`startup.verify_results`, as
        after --eval-only and in the LazyConfig flow: an expected task that was not evaluated
        fails the check (exit 1) where Detectron2's verify_results raised KeyError."""
        TrainerBase.train(self, self.start_iter, self.max_iter)
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            # DefaultTrainer's EvalHook evaluates after the last step: the results are set.
            # (Expected results without a test data set are refused at start-up.)
            startup.verify_results(self.cfg, self._last_eval_results)
            return self._last_eval_results

    def build_hooks(self):
        # DefaultTrainer made a plain DetectionCheckpointer; its hooks take whatever is here.
        # Misfit or partial weights are refused unless MODEL.ALLOW_PARTIAL_WEIGHTS (see
        # build_checkpointer); resuming skips unreadable checkpoints.
        self.checkpointer = startup.build_checkpointer(
            self._trainer.model, ConfigAdapter(self.cfg), trainer=weakref.proxy(self)
        )
        # Its EvalHook also evaluated after an error in the last iteration (see
        # FinishedTrainingEvalHook); its PeriodicWriter made the writers before resuming, which
        # wrote the iterations after the last checkpoint twice (see ResumingPeriodicWriter).
        # Its writers, made at the start, purge tensorboard's events after the checkpoint resumed
        # from (see startup.build_writers).
        hook_list = [
            startup.ResumingPeriodicWriter.replacing(
                startup.FinishedTrainingEvalHook.replacing(h),
                self.cfg.OUTPUT_DIR,
                functools.partial(startup.build_writers, self.cfg.OUTPUT_DIR, self.max_iter),
            )
            for h in super().build_hooks()
        ]
        hook_list = add_panoptic_visualization(self.cfg, hook_list)
        if tta_config(self.cfg).ENABLED:
            # After training, right after the plain evaluation (so before the writer: its results
            # reach metrics.json); train() checks both against TEST.EXPECTED_RESULTS, as
            # --eval-only does. (Detectron2's train_net adds it last and checks the plain ones.)
            hook_list.insert(
                startup.index_after_eval_hook(hook_list),
                startup.FinishedTrainingEvalHook(0, self._test_with_tta),
            )
        return hook_list

    def _test_with_tta(self):
        results = self.test_with_TTA(self.cfg, self.model)
        self._last_eval_results = {**getattr(self, "_last_eval_results", {}), **results}
        return results

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        # EfficientPS's mapper, skipping unreadable samples up to
        # DATALOADER.MAX_UNREADABLE_FRACTION; tools (visualize_data) read the same loader.
        return ConfigAdapter(cfg).build_train_loader()

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


def main(args):
    if is_lazy_config(args.config_file):
        # A Detectron2 LazyConfig (.py): Detectron2's lazyconfig_train_net flow.
        return lazy_train.main(args)
    # The start-up the LazyConfig flow shares (efficientps_d2.engine.startup): naive SyncBN on the
    # CPU, OUTPUT_DIR lock, default_setup, log.txt, stale temporaries removed, data sets checked.
    cfg = startup.setup(args)
    if args.eval_only:
        model = startup.load_for_evaluation(
            Trainer.build_model(cfg), ConfigAdapter(cfg), resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if tta_config(cfg).ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            startup.verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)  # with TEST.AUG.ENABLED, its hooks evaluate with TTA after training
    trainer.resume_or_load(resume=args.resume)
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
