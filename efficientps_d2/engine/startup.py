"""The start-up steps of train_net.py, one implementation for both kinds of config file.

The YAML flow (``Trainer`` in train_net.py) and the LazyConfig flow (:mod:`.lazy_train`) take the
same steps, each reading its own keys through
:class:`~efficientps_d2.config_adapter.ConfigAdapter`:

- :func:`setup`: both flows' entry: the config file loaded, :func:`start_run`, then the data
  check (:func:`efficientps_d2.data.check.validate_datasets`, which reads either kind);
- :func:`start_run`: on the CPU, SyncBN norms become Detectron2's naiveSyncBN (gloo all_reduce);
  the output folder is locked for a training run (a second run on it is refused) before anything
  is written, Detectron2's ``default_setup`` runs (its ``config.yaml`` written atomically, and
  by ``--eval-only`` as ``config_eval.yaml``: see :func:`saved_config_redirected`),
  ``efficientps_d2``'s loggers also write ``log.txt``, and temporary files of killed runs are
  removed under the lock;
- :func:`wrap_ddp`: DDP with ``device_ids=None`` for a CPU model (gloo), the local GPU otherwise;
- :func:`build_trainer`: ``AMPTrainer`` (autocast to the configured precision; resumes from a
  checkpoint of another AMP setting too) or ``SimpleTrainer``;
- :func:`build_checkpointer` / :func:`load_for_evaluation`: strict weight loading (misfits and
  weights that leave tensors random are refused unless opted in; converted ImageNet backbones are
  accepted), resuming from the newest intact checkpoint;
- :func:`verify_results`: Detectron2's check of the results against TEST.EXPECTED_RESULTS
  (``train.expected_results``);
- :class:`FinishedTrainingEvalHook`: Detectron2's ``EvalHook``, without the evaluation after a
  training that stopped at an error in its last iteration;
- :class:`ResumingPeriodicWriter`: Detectron2's ``PeriodicWriter`` with its writers made when the
  training starts, so that after ``--resume`` metrics.json and tensorboard hold each iteration
  once (:func:`prepare_metrics_file`, :func:`build_writers`).
"""

import contextlib
import json
import logging
import os
import time
from urllib.parse import urlparse

import detectron2.utils.comm as comm
import torch
from detectron2.config import CfgNode
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    create_ddp_model,
    default_setup,
    default_writers,
)
from detectron2.engine.hooks import EvalHook, PeriodicWriter
from detectron2.evaluation import verify_results as d2_verify_results
from detectron2.utils.events import EventWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..atomic_io import atomic_open, atomic_write, check_writable_folder, remove_stale_temporaries
from ..checkpoint import check_checkpoint_file
from ..config import find_config_file, is_yaml_config
from ..config_adapter import ConfigAdapter
from ..data.check import validate_datasets
from ..modeling.inplace_abn import InPlaceABN
from ..output_lock import lock_output_dir
from ..solver import check_gradient_clipping
from .lazy_config import INFERENCE_PARTS, TRAINING_PARTS, load_config

__all__ = [
    "FinishedTrainingEvalHook",
    "ResumableAMPTrainer",
    "ResumingPeriodicWriter",
    "build_checkpointer",
    "build_trainer",
    "build_writers",
    "check_amp_device",
    "check_evaluation",
    "check_input_format",
    "check_output_dir",
    "check_weights",
    "index_after_eval_hook",
    "load_for_evaluation",
    "prepare_metrics_file",
    "saved_config_redirected",
    "setup",
    "start_run",
    "use_naive_sync_bn",
    "verify_results",
    "warn_of_an_earlier_run",
    "wrap_ddp",
]

logger = logging.getLogger("efficientps_d2")


def use_naive_sync_bn(cfg):
    """On the CPU, sets every norm of the model that is "SyncBN" to "naiveSyncBN" (in place);
    returns the keys changed. torch's SyncBatchNorm runs on CUDA only; Detectron2's
    NaiveSyncBatchNorm syncs the same statistics with all_reduce, which gloo does on the CPU.

    The norms are the keys ``NORM`` or ``*_NORM`` under MODEL of a YAML config (MODEL.RESNETS.NORM,
    MODEL.RPN.HEAD_NORM, ...), and every ``norm`` or ``*_norm`` argument of a LazyConfig's model.
    """
    if ConfigAdapter(cfg).device != "cpu":
        return []
    if is_yaml_config(cfg):
        return _replace_yaml_norms(cfg.MODEL, "MODEL")
    return _replace_lazy_norms(cfg.model, "model")


def _replace_yaml_norms(node, prefix):
    changed = []
    for key, value in node.items():
        name = f"{prefix}.{key}"
        if isinstance(value, CfgNode):
            changed += _replace_yaml_norms(value, name)
        elif (key == "NORM" or key.endswith("_NORM")) and value == "SyncBN":
            setattr(node, key, "naiveSyncBN")  # refused, as any change, if cfg is frozen
            changed.append(name)
    return changed


def _replace_lazy_norms(node, prefix):
    changed = []
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    for key in keys:
        child = node._get_node(key)  # not resolved: interpolations stay as they are
        name = f"{prefix}[{key}]" if isinstance(node, ListConfig) else f"{prefix}.{key}"
        if isinstance(child, (DictConfig, ListConfig)):
            changed += _replace_lazy_norms(child, name)
        elif (str(key) == "norm" or str(key).endswith("_norm")) and child._value() == "SyncBN":
            node[key] = "naiveSyncBN"
            changed.append(name)
    return changed


_output_dir_lock = None  # held (open) for the life of the training process


def setup(args):
    """train_net.py's start-up for either kind of config: loads ``args.config_file`` (YAML or
    LazyConfig) with ``args.opts``, refuses a LazyConfig without the parts the run needs, an
    output folder that is a file, test-time augmentation settings or expected results that
    cannot be used (expected results also where training would evaluate nothing), mappers that
    read images in another format than the model takes, AMP training on the CPU, an unknown
    SOLVER.CLIP_GRADIENTS.CLIP_TYPE and ``--eval-only``
    without weights or without anything to evaluate (before anything is written), takes the
    steps of :func:`start_run` (naive SyncBN on the CPU, lock, ``default_setup``, log.txt, stale
    temporaries removed), then checks the data sets (names, class counts and every panoptic PNG
    are checked now, not found wrong hours later). Returns the config."""
    needs = INFERENCE_PARTS if args.eval_only else TRAINING_PARTS
    # A model zoo name becomes its file: Detectron2's default_setup opens args.config_file to log
    # it, which failed for a name after the output folder was locked.
    args.config_file = find_config_file(args.config_file)
    cfg = load_config(args.config_file, args.opts, needs)
    config = ConfigAdapter(cfg)
    check_output_dir(config)
    if args.eval_only:
        check_evaluation(config)
    # What is used after training is checked now: the TTA settings and the expected results
    # (reading them checks them), which need something evaluated to be checked against.
    if config.tta_enabled:
        config.tta_settings()
    if config.expected_results and not args.eval_only:
        key = config.keys["expected_results"]
        check_evaluation(config, f"{key} is set but training would evaluate nothing")
    check_input_format(cfg)
    if not args.eval_only:
        check_amp_device(config)
        if config.is_yaml:  # a LazyConfig's optimizer is its own call
            check_gradient_clipping(cfg)
    check_weights(config, eval_only=args.eval_only, resume=args.resume)
    cfg = start_run(cfg, args)
    validate_datasets(cfg, training=not args.eval_only)
    return cfg


def check_output_dir(config):
    """Refuses, before anything is read or written, an OUTPUT_DIR / ``train.output_dir`` that is
    a file or lies under one, a broken symbolic link counted as a file (os.makedirs would fail
    there with a bare "File exists" or "Not a directory"), or that cannot be written (the lock or
    log.txt failed with a bare "Permission denied"). ``config``: a :class:`ConfigAdapter`."""
    check_writable_folder(
        config.output_dir,
        config.keys["output_dir"],
        NotADirectoryError,
        hint=f"Set it to a folder (e.g. {config.override('output_dir', './output')}).",
    )


def check_amp_device(config):
    """Refuses AMP training on the CPU (SOLVER.AMP.ENABLED / ``train.amp.enabled`` with
    MODEL.DEVICE / ``train.device`` "cpu", which a CUDA config becomes on a machine without
    CUDA): Detectron2's AMPTrainer asserts "CUDA is required for AMP training!" at the first
    iteration. ``config``: a :class:`ConfigAdapter`."""
    if config.amp_enabled and str(config.device).startswith("cpu"):
        reason = "" if torch.cuda.is_available() else " (this machine has no CUDA)"
        raise ValueError(
            f"{config.keys['amp_enabled']} is True but the model runs on the CPU{reason}: AMP "
            f"training needs CUDA. Set {config.override('amp_enabled', False)} to train in "
            "float32."
        )


def check_input_format(cfg):
    """Refuses a LazyConfig whose mappers read images in another format than its model takes
    (``dataloader.{train,test}.mapper.image_format`` vs ``model.input_format``): the model would
    train and evaluate on other colours than it takes (e.g. swapped channels) without any error.
    (A YAML config has one key, INPUT.FORMAT.)"""
    if is_yaml_config(cfg):
        return
    model_format = OmegaConf.select(cfg, "model.input_format", default=None)
    for split in ("train", "test"):
        key = f"dataloader.{split}.mapper.image_format"
        image_format = OmegaConf.select(cfg, key, default=None)
        if None not in (model_format, image_format) and image_format != model_format:
            raise ValueError(
                f"{key} is {image_format!r} but model.input_format is {model_format!r}: the "
                f"model would see images in another format than it takes. Set "
                f"model.input_format={image_format} (the shipped configs' mappers follow it) "
                "or make them equal."
            )


def check_evaluation(config, reason="--eval-only has nothing to evaluate"):
    """Refuses ``--eval-only``, or with ``reason`` expected results to check after training,
    with nothing to evaluate, before the model is built: no test data set (DATASETS.TEST /
    ``dataloader.test.dataset.names``) or, in a LazyConfig, no ``dataloader.evaluator``
    (Detectron2 then returns no results, with exit status 0, after the weights are loaded or, for
    a LazyConfig, after a whole inference pass; expected results were found missing after the
    whole training). ``config``: a :class:`ConfigAdapter`."""
    if not config.test_dataset_names:
        key = config.keys["test_dataset_names"]
        raise ValueError(f"{reason}: {key} names no data set.")
    if not config.is_yaml and config.cfg.get("dataloader", {}).get("evaluator") is None:
        raise ValueError(
            f"{reason}: the config has no dataloader.evaluator (e.g. "
            "L(build_dataset_evaluator)(dataset_name=..., output_folder=...) of "
            "efficientps_d2.evaluation)."
        )


def check_weights(config, *, eval_only, resume):
    """Refuses, before the data check (minutes on Cityscapes) and the model are built, weights
    that cannot be loaded: a local MODEL.WEIGHTS / ``train.init_checkpoint`` file that does not
    exist or cannot be a checkpoint (empty, cut short, an HTML page:
    :func:`~efficientps_d2.checkpoint.check_checkpoint_file`), a URL or ``torchvision://`` name
    that cannot be fetched (it is fetched and cached now, as loading would) or whose fetched
    copy cannot be a checkpoint (an HTML error page, cut short: looked at as a local file), or with
    ``eval_only`` none at all (Detectron2 would evaluate a randomly initialised model). Neither
    is read when ``resume`` finds a checkpoint in the output folder. ``config``: a
    :class:`ConfigAdapter`."""
    weights = config.weights
    if resume and os.path.isfile(os.path.join(config.output_dir, "last_checkpoint")):
        return
    check_checkpoint_file(weights, config.keys["weights"])  # before the work, not after it
    if urlparse(weights).scheme:
        # Fetched (torchvision://: downloaded and converted) and cached now, so that an offline
        # machine or a misspelt name stops before the data check, not after it.
        local = PathManager.get_local_path(weights)
        check_checkpoint_file(local, config.keys["weights"], fetched_from=weights)
    if weights or not eval_only:
        return
    where = f" and {config.output_dir} holds no checkpoint to --resume from" if resume else ""
    raise ValueError(
        f"--eval-only has no weights to evaluate: {config.keys['weights']} is empty{where}. "
        f"Name the trained weights (e.g. {config.override('weights', 'output/model_final.pth')})."
    )


def start_run(cfg, args):
    """train_net.py's set-up of a run, before the data check: naive SyncBN on the CPU, the output
    folder locked (training, main process) before anything is written there, Detectron2's
    ``default_setup`` (the config saved atomically, by ``--eval-only`` as config_eval.yaml:
    :func:`saved_config_redirected`), our loggers in ``log.txt``, stale temporaries of killed
    runs removed, and a warning where a run without --resume starts on another run's checkpoints
    (:func:`warn_of_an_earlier_run`).

    A YAML ``cfg`` is frozen afterwards.
    """
    global _output_dir_lock
    sync_bn_keys = use_naive_sync_bn(cfg)
    if is_yaml_config(cfg):
        cfg.freeze()
    config = ConfigAdapter(cfg)
    lock = None
    if not args.eval_only and comm.is_main_process():
        # A second run on the same folder is refused here (OutputDirInUseError names its PID).
        lock = _output_dir_lock = lock_output_dir(config.output_dir)
    # config.yaml describes the run that made the folder's checkpoints, as Detectron2's users and
    # our readers of it (a LazyConfig run's config.yaml, given to --eval-only, demo.py, the export
    # tools) take it: an evaluation writes its own config next to its results instead.
    with saved_config_redirected(config.output_dir, _saved_config_name(args)):
        default_setup(cfg, args)
    # default_setup logs only detectron2's and fvcore's loggers to log.txt; add ours.
    setup_logger(config.output_dir, distributed_rank=comm.get_rank(), name="efficientps_d2")
    if lock is not None:
        remove_stale_temporaries(config.output_dir)  # of killed runs; never read
        if not args.resume:
            warn_of_an_earlier_run(config)
    if config.device == "cpu":
        logger.warning("CUDA is not available: running on the CPU.")
    if sync_bn_keys:
        logger.warning(f"On the CPU, {sync_bn_keys} use naiveSyncBN instead of SyncBN.")
    return cfg


SAVED_CONFIG = "config.yaml"  # Detectron2's default_setup saves the run's config under this name
EVAL_CONFIG = "config_eval.yaml"  # ... which an --eval-only run saves under this one instead


def _saved_config_name(args):
    return EVAL_CONFIG if args.eval_only else SAVED_CONFIG


@contextlib.contextmanager
def saved_config_redirected(output_dir, name=SAVED_CONFIG):
    """While Detectron2's ``default_setup`` runs in this block, its save of the config to
    ``<output_dir>/config.yaml`` (a YAML dump, or ``LazyConfig.save``, whose fallback is
    ``config.yaml.pkl``) writes ``<output_dir>/<name>`` (``<name>.pkl``) instead, atomically
    (:func:`~efficientps_d2.atomic_io.atomic_open`), and its log line names that file.

    ``default_setup`` writes config.yaml in place: a run killed then left it cut short. Both of
    its writes open the file through Detectron2's ``PathManager.open``, which is intercepted here
    for those two paths only; every other path, and every other process, opens as before."""
    saved = os.path.abspath(os.path.join(output_dir, SAVED_CONFIG))
    written = os.path.abspath(os.path.join(output_dir, name))
    redirects = {saved: written, f"{saved}.pkl": f"{written}.pkl"}
    open_in_place = PathManager.open
    shadowed = vars(PathManager).get("open")  # an instance attribute someone else set, if any

    def open_redirected(path, mode="r", buffering=-1, **kwargs):
        target = redirects.get(os.path.abspath(path)) if isinstance(path, str) else None
        if target is None or "w" not in mode:
            return open_in_place(path, mode, buffering, **kwargs)
        return atomic_open(target, mode, **kwargs)

    class NameWrittenFile(logging.Filter):  # "Full config saved to <output_dir>/config.yaml"
        def filter(self, record):
            if isinstance(record.msg, str) and record.msg.startswith("Full config saved to"):
                record.msg = f"Full config saved to {os.path.join(output_dir, name)}"
            return True

    d2_logger = logging.getLogger("detectron2")  # default_setup's logger
    log_filter = NameWrittenFile()
    PathManager.open = open_redirected
    d2_logger.addFilter(log_filter)
    try:
        yield
    finally:
        d2_logger.removeFilter(log_filter)
        if shadowed is None:
            del PathManager.open
        else:
            PathManager.open = shadowed


def warn_of_an_earlier_run(config):
    """Warns where a training run without --resume starts in an output folder that holds another
    run's checkpoints: Detectron2 overwrites those of the same names (model_final.pth), its
    metrics.json is moved aside when training starts (:func:`prepare_metrics_file`), and a later
    --resume, before this run's first checkpoint, would continue that run instead. ``config``: a
    :class:`ConfigAdapter`."""
    path = os.path.join(config.output_dir, "last_checkpoint")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        last = f.read().strip()
    logger.warning(
        f"{config.keys['output_dir']} '{config.output_dir}' holds the checkpoints of an earlier "
        f"run (last_checkpoint names '{last}'). This run starts afresh (no --resume): it "
        "overwrites that run's checkpoints of the same names and moves its metrics.json aside. "
        "To continue that run, stop this one and add --resume; to keep it, set another "
        f"{config.keys['output_dir']}."
    )


METRICS_FILE = "metrics.json"  # the JSONWriter's file in the output folder (default_writers)


def prepare_metrics_file(output_dir, start_iter):
    """Readies ``<output_dir>/metrics.json`` for a training that starts at iteration
    ``start_iter`` (``trainer.start_iter``), before Detectron2's ``JSONWriter`` opens it to
    append; only the main process, which holds the output folder's lock, calls it. Returns the
    path an earlier run's file was moved to, or None.

    - Resumed from a checkpoint (``start_iter`` > 0): the records of iterations >= ``start_iter``
      go, those that the killed run logged after its last checkpoint, which this run logs again
      (they appeared twice, and plots zigzagged). Lines without an "iteration" (or not JSON)
      stay, except a cut-short last line (the killed run's last write), which would merge with
      the next record. The file is rewritten atomically, only where something goes.
    - Started afresh (no --resume, or nothing to resume from): a metrics.json that is not empty
      holds an earlier run's records. Detectron2 appends to it, so the file held two runs whose
      iterations restart at 0, which a later --resume could not tell apart (it would drop the
      earlier run's records of the same iterations). It is renamed (atomically: nothing is lost)
      to ``metrics.<time of its last record>.json``, with a warning naming it.
    """
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    if start_iter > 0:
        _drop_records_from(path, start_iter)
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
    moved, n = os.path.join(output_dir, f"metrics.{stamp}.json"), 1
    while os.path.lexists(moved):
        n += 1
        moved = os.path.join(output_dir, f"metrics.{stamp}-{n}.json")
    os.rename(path, moved)
    logger.warning(
        f"{path} held the records of an earlier run; this run starts at iteration 0, so they "
        f"are kept in {moved} and {METRICS_FILE} holds this run's."
    )
    return moved


def _drop_records_from(path, start_iter):
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not line.endswith(b"\n"):
                logger.warning(f"Dropped the cut-short last line of {path}: {line[:80]!r}")
                continue
            record = None
        iteration = record.get("iteration") if isinstance(record, dict) else None
        if type(iteration) in (int, float) and iteration >= start_iter:
            continue
        kept.append(line if line.endswith(b"\n") else line + b"\n")
    if kept == lines:
        return
    atomic_write(path, lambda f: f.writelines(kept))
    logger.info(
        f"Resuming from iteration {start_iter}: dropped {len(lines) - len(kept)} lines of {path} "
        "logged after the checkpoint, which this run logs again."
    )


def build_writers(output_dir, max_iter, start_iter=0):
    """Detectron2's ``default_writers(output_dir, max_iter)`` for a training that starts at
    iteration ``start_iter``: where it resumes (``start_iter`` > 0), tensorboard's writer gets
    ``purge_step=start_iter``, which makes TensorBoard discard the events of steps >=
    ``start_iter`` written before (the killed run's after its last checkpoint; TensorBoard's
    Python and fast loaders both honour it). Call :func:`prepare_metrics_file` first: the
    ``JSONWriter`` opens metrics.json to append here."""
    writers = default_writers(output_dir, max_iter)
    if start_iter <= 0:
        return writers
    # default_writers' TensorboardXWriter opens nothing before its first write: replaced freely.
    return [
        (
            TensorboardXWriter(output_dir, purge_step=start_iter)
            if isinstance(w, TensorboardXWriter)
            else w
        )
        for w in writers
    ]


class ResumingPeriodicWriter(PeriodicWriter):
    """Detectron2's ``PeriodicWriter``, whose writers are made when the training starts, once the
    iteration it starts from (``trainer.start_iter``, set by resuming) is known: metrics.json is
    readied for it (:func:`prepare_metrics_file`), then ``make_writers(start_iter)`` (e.g.
    :func:`build_writers` of ``output_dir`` and ``max_iter``) makes them. Detectron2 makes them
    with the hook, before resuming; its ``JSONWriter`` then appended the resumed run's records
    after the killed run's (the iterations after the last checkpoint twice)."""

    def __init__(self, output_dir, make_writers, period=20):
        super().__init__([], period=period)
        self._output_dir = output_dir
        self._make_writers = make_writers

    @classmethod
    def replacing(cls, hook, output_dir, make_writers):
        """This hook in place of a plain ``PeriodicWriter`` (DefaultTrainer's, whose writers,
        which have written nothing, are closed); other hooks as they are."""
        if type(hook) is not PeriodicWriter:
            return hook
        for writer in hook._writers:  # Detectron2 keeps the constructor's arguments as these.
            writer.close()
        return cls(output_dir, make_writers, period=hook._period)

    def before_train(self):
        start_iter = self.trainer.start_iter
        prepare_metrics_file(self._output_dir, start_iter)
        writers = list(self._make_writers(start_iter))
        for writer in writers:
            assert isinstance(writer, EventWriter), writer
        self._writers = writers


class FinishedTrainingEvalHook(EvalHook):
    """Detectron2's ``EvalHook``, whose evaluation after training runs only when the training
    finished. ``EvalHook`` evaluates when ``trainer.iter + 1 >= max_iter``, which also holds when
    the last iteration failed or was interrupted (its checkpoint save too: a full disk, Ctrl-C):
    the whole evaluation (minutes to hours) then ran on weights that were never saved, its files
    and metrics replacing the last evaluation's, before the error was shown. A finished loop
    leaves ``trainer.iter == max_iter`` (``TrainerBase.train``'s own signal of success)."""

    @classmethod
    def replacing(cls, hook):
        """This hook in place of a plain ``EvalHook`` (DefaultTrainer's); other hooks as they
        are."""
        if type(hook) is not EvalHook:
            return hook
        # Detectron2 keeps the constructor's arguments as these attributes.
        return cls(hook._period, hook._func, eval_after_train=hook._eval_after_train)

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:  # the loop stopped at an error
            self._eval_after_train = False
        super().after_train()


def index_after_eval_hook(hook_list):
    """The index after the last ``EvalHook`` of a training's hooks (after all of them where there
    is none): where an evaluation after training (test-time augmentation) goes, so that it runs
    after the plain one and before the ``PeriodicWriter`` writes the results to metrics.json."""
    indices = [i for i, h in enumerate(hook_list) if isinstance(h, EvalHook)]
    return indices[-1] + 1 if indices else len(hook_list)


def wrap_ddp(model, device, **kwargs):
    """Detectron2's ``create_ddp_model`` (a no-op for one process), with the local GPU as device
    for a CUDA model and ``device_ids=None`` for a CPU one, which DDP requires (gloo)."""
    device_ids = [comm.get_local_rank()] if str(device).startswith("cuda") else None
    return create_ddp_model(model, device_ids=device_ids, **kwargs)


class ResumableAMPTrainer(AMPTrainer):
    """Detectron2's ``AMPTrainer``, which also resumes from a checkpoint that holds no gradient
    scaler state: one written with AMP off (no "grad_scaler"), or under bfloat16 AMP, whose
    disabled scaler saves an empty state. ``AMPTrainer`` raises a KeyError or "The source state
    dict is empty" there, after the model is built; here the scaler starts from its initial
    scale, as in a new run (it adapts within a few steps)."""

    def load_state_dict(self, state_dict):
        if state_dict.get("grad_scaler"):
            super().load_state_dict(state_dict)
            return
        SimpleTrainer.load_state_dict(self, state_dict)
        if self.grad_scaler.is_enabled():
            logger.warning(
                "The checkpoint holds no gradient scaler state (it was trained without float16 "
                "AMP): the scaler starts from its initial scale."
            )


def build_trainer(model, data_loader, optimizer, config):
    """:class:`ResumableAMPTrainer` autocasting to ``config.amp_precision`` ("float16" or
    "bfloat16") when AMP is on, else ``SimpleTrainer``. The precision is checked either way: a
    value that is neither is refused, naming its key. ``config``: a :class:`ConfigAdapter`."""
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    precision = config.amp_precision
    if precision not in dtypes:
        key = config.keys["amp_precision"]
        raise ValueError(f"{key} must be one of {sorted(dtypes)}, got {precision!r}.")
    if not config.amp_enabled:
        return SimpleTrainer(model, data_loader, optimizer)
    grad_scaler = None  # Detectron2's default: a GradScaler, enabled when CUDA is available
    if precision == "bfloat16":
        # bfloat16 cannot underflow where float32 does not; scaling would only add the scaler's
        # inf/nan check, a host sync, to every step.
        grad_scaler = torch.amp.GradScaler("cuda", enabled=False)
        if any(isinstance(m, InPlaceABN) for m in model.modules()):
            logger.warning(
                "In-place activated BN under bfloat16 AMP rebuilds each norm's input from its "
                "bfloat16 output: a norm whose weight is small against its bias gets an "
                "imprecise weight gradient (SOLVER.AMP.PRECISION float16 rounds 8 times finer; "
                "without AMP, or with MODEL.EFFICIENTPS.INPLACE_ABN False, there is no such loss)."
            )
    return ResumableAMPTrainer(
        model, data_loader, optimizer, grad_scaler=grad_scaler, precision=dtypes[precision]
    )


def _checkpointer(model, config, **kwargs):
    return config.checkpointer(model, config.output_dir, **kwargs)


def build_checkpointer(model, config, **checkpointables):
    """The training checkpointer: weights that do not fit are refused as in evaluation, and so
    are weights that leave tensors random, unless ``allow_partial_weights`` (fine-tuning on other
    classes) or the file is a converted ImageNet backbone; resuming skips unreadable
    checkpoints. Saving is atomic."""
    partial = config.allow_partial_weights
    return _checkpointer(
        model, config, allow_shape_mismatch=partial, allow_missing=partial, **checkpointables
    )


def load_for_evaluation(model, config, *, resume):
    """Loads the weights to evaluate (or, with ``resume``, the last checkpoint of the output
    folder) into ``model``. A checkpoint that does not fit the model is always a mistake here:
    it is refused; so is one that would leave model tensors random (a converted ImageNet
    backbone too), unless ``allow_partial_weights`` (MODEL.ALLOW_PARTIAL_WEIGHTS)."""
    checkpointer = _checkpointer(
        model, config, allow_missing=config.allow_partial_weights, for_evaluation=True
    )
    checkpointer.resume_or_load(config.weights, resume=resume)
    return model


def verify_results(cfg, results):
    """Detectron2's ``verify_results`` for either kind of config: each ``[task, metric, expected,
    tolerance]`` row of TEST.EXPECTED_RESULTS (``train.expected_results``) is compared with
    ``results`` ({task: {metric: value}}); a metric that is off, missing (its task too) or not
    finite logs both and exits with status 1. Returns True otherwise. Call it on the main
    process, as Detectron2 does."""
    expected = ConfigAdapter(cfg).expected_results
    # A task that was not evaluated (a misspelt one) is a missing metric, not Detectron2's
    # KeyError after the whole run.
    results = {**{row[0]: {} for row in expected}, **results}
    # Detectron2 reads TEST.EXPECTED_RESULTS; a LazyConfig's rows are passed the same way.
    return d2_verify_results(CfgNode({"TEST": {"EXPECTED_RESULTS": expected}}), results)
