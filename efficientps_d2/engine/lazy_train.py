"""train_net.py's flow for Detectron2 LazyConfig (``.py``) files, as Detectron2's
``tools/lazyconfig_train_net.py`` does it: instantiate the config's ``model``, ``optimizer``,
``dataloader`` and ``lr_multiplier``, train with ``AMPTrainer`` or ``SimpleTrainer`` and hooks,
checkpoint with an (atomic) ``DetectionCheckpointer`` and evaluate with ``inference_on_dataset``.

The config follows Detectron2's layout (``configs/common/train.py``): ``train.output_dir``,
``train.init_checkpoint``, ``train.max_iter``, ``train.amp.enabled``, ``train.ddp``,
``train.checkpointer`` (``period``, ``max_to_keep``), ``train.eval_period``,
``train.log_period``, ``train.device``; ``dataloader.evaluator`` is optional.
"""

import logging

import detectron2.utils.comm as comm
from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format

from ..checkpoint import AtomicDetectionCheckpointer, EfficientPSCheckpointer
from .lazy_config import load_config

__all__ = ["do_test", "do_train", "main", "setup"]

logger = logging.getLogger("efficientps_d2")


def setup(args):
    """Loads ``args.config_file`` with ``args.opts`` (``key=value``) and runs ``default_setup``."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    if cfg.train.device == "cpu":
        logger.warning("CUDA is not available: running on the CPU.")
    return cfg


def do_test(cfg, model):
    """Evaluates ``model`` on ``dataloader.test`` with ``dataloader.evaluator``; {} without one."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process() and results:
        print_csv_format(results)
    return results


def do_train(args, cfg):
    """Trains from ``train.init_checkpoint`` (or, with ``args.resume``, the last checkpoint)."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    logger.info("Model:\n{}".format(model))

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
        model, train_loader, optimizer
    )
    checkpointer = AtomicDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if main_process
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main_process
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    """train_net.py's entry for a ``.py`` config: train, or with ``--eval-only`` evaluate."""
    cfg = setup(args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        # Evaluating a checkpoint that does not fit the model is always a mistake: refuse it.
        EfficientPSCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume
        )
        return do_test(cfg, model)
    do_train(args, cfg)
