"""train_net.py's flow for Detectron2 LazyConfig (``.py``) files, as Detectron2's
``tools/lazyconfig_train_net.py`` does it: instantiate the config's ``model``, ``optimizer``,
``dataloader`` and ``lr_multiplier``, train with ``AMPTrainer`` or ``SimpleTrainer`` and hooks,
and evaluate with ``inference_on_dataset``.

The start-up steps are the YAML flow's, shared through :mod:`.startup`: the output folder lock and
removal of stale temporaries, ``efficientps_d2``'s loggers in ``log.txt``, naive SyncBN and DDP
without device ids on the CPU, the data check (before training and before ``--eval-only``),
strict weight loading (``train.allow_partial_weights`` opts in to partial weights), resuming from
the newest intact checkpoint, the AMP precision, and the panoptic pictures in tensorboard
(``train.vis_period``, as VIS_PERIOD). ``train.tta`` is TEST.AUG: test-time augmentation after
training and with ``--eval-only``. The training loader of ``configs/common/data/panoptic.py``
skips unreadable samples up to ``dataloader.train.max_unreadable_fraction`` (as
DATALOADER.MAX_UNREADABLE_FRACTION), and ``train.expected_results`` (TEST.EXPECTED_RESULTS) is
checked with Detectron2's ``verify_results`` after training and after ``--eval-only``.

The config follows Detectron2's layout (``configs/common/train.py``): ``train.output_dir``,
``train.init_checkpoint``, ``train.allow_partial_weights``, ``train.max_iter``,
``train.amp.enabled``, ``train.amp.precision``, ``train.ddp``, ``train.checkpointer``
(``period``, ``max_to_keep``), ``train.eval_period``, ``train.log_period``, ``train.device``,
``train.check_pngs``, ``train.vis_period``, ``train.tta`` (``enabled``, ``min_sizes``,
``max_size``, ``flip``), ``train.expected_results``; ``dataloader.evaluator`` is optional.
"""

import functools
import logging
import os

import detectron2.utils.comm as comm
from detectron2.config import instantiate
from detectron2.engine import hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from omegaconf import OmegaConf

from ..config_adapter import ConfigAdapter
from ..visualization import add_panoptic_visualization
from .startup import (
    FinishedTrainingEvalHook,
    ResumingPeriodicWriter,
    build_checkpointer,
    build_trainer,
    build_writers,
    load_for_evaluation,
    setup,
    verify_results,
    wrap_ddp,
)

__all__ = ["do_test", "do_test_with_tta", "do_train", "main"]

logger = logging.getLogger("efficientps_d2")


def do_test(cfg, model):
    """Evaluates ``model`` on ``dataloader.test`` with ``dataloader.evaluator``; {} without one."""
    if "evaluator" not in cfg.dataloader:
        return {}
    return _evaluate(cfg, model, instantiate(cfg.dataloader.evaluator))


def do_test_with_tta(cfg, model):
    """:func:`do_test` through :class:`EfficientPSWithTTA` with ``train.tta``'s sizes and flip; the
    results are named "<task>_TTA" and the evaluator writes to ``<output_dir>/inference_TTA``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    tta_model = ConfigAdapter(cfg).build_tta_model(model)
    evaluator = OmegaConf.to_container(cfg.dataloader.evaluator, resolve=True)
    evaluator["output_folder"] = os.path.join(cfg.train.output_dir, "inference_TTA")
    return _evaluate(cfg, tta_model, instantiate(evaluator), suffix="_TTA")


def _evaluate(cfg, model, evaluator, suffix=""):
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), evaluator)
    results = {f"{task}{suffix}": value for task, value in results.items()}
    if comm.is_main_process() and results:
        print_csv_format(results)
    return results


def do_train(args, cfg):
    """Trains from ``train.init_checkpoint`` (or, with ``args.resume``, the last checkpoint);
    returns the results of the last evaluation, checked against ``train.expected_results``."""
    config = ConfigAdapter(cfg)
    model = config.build_model()
    logger.info("Model:\n{}".format(model))

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = config.build_train_loader()
    model = wrap_ddp(model, config.device, **cfg.train.ddp)
    trainer = build_trainer(model, train_loader, optimizer, config)
    checkpointer = build_checkpointer(model, config, trainer=trainer)
    main_process = comm.is_main_process()
    last = {}  # {"results": of the last evaluation}, as DefaultTrainer's _last_eval_results

    def test_and_keep_results():
        last["results"] = do_test(cfg, model)
        return last["results"]

    def test_with_tta_and_keep_results():  # checked with the plain ones, as --eval-only does
        results = do_test_with_tta(cfg, model)
        last["results"] = {**last.get("results", {}), **results}
        return results

    hook_list = add_panoptic_visualization(  # with train.vis_period > 0
        cfg,
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if main_process
                else None
            ),
            FinishedTrainingEvalHook(cfg.train.eval_period, test_and_keep_results),
            # After training, as the YAML flow's TEST.AUG.ENABLED: right after the plain
            # evaluation, before the writer, so that its results reach metrics.json.
            (
                FinishedTrainingEvalHook(0, test_with_tta_and_keep_results)
                if config.tta_enabled
                else None
            ),
            (  # its writers made after resuming: metrics.json holds each iteration once
                ResumingPeriodicWriter(
                    cfg.train.output_dir,
                    functools.partial(build_writers, cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main_process
                else None
            ),
        ],
    )
    trainer.register_hooks(hook_list)
    checkpointer.resume_or_load(config.weights, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    results = last.get("results", {})
    if main_process and config.expected_results:  # with nothing to evaluate, refused by setup
        verify_results(cfg, results)
    return results


def main(args):
    """train_net.py's entry for a ``.py`` config: train, or with ``--eval-only`` evaluate."""
    cfg = setup(args)  # the start-up both flows share, the data check included
    if args.eval_only:
        config = ConfigAdapter(cfg)
        model = wrap_ddp(config.build_model(), config.device)
        load_for_evaluation(model, config, resume=args.resume)
        results = do_test(cfg, model)
        if config.tta_enabled:
            results.update(do_test_with_tta(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    return do_train(args, cfg)
