"""Detectron2 checkpointers for EfficientPS: saving that never leaves a half-written file, and
loading that says precisely when a checkpoint does not fit the model.

Saving: fvcore's ``Checkpointer.save`` writes each ``model_<iteration>.pth`` and
``last_checkpoint`` in place, so a process killed mid-save leaves a truncated file behind (and
possibly a ``last_checkpoint`` naming it). :class:`AtomicDetectionCheckpointer` sends both through
:func:`efficientps_d2.atomic_io.atomic_write`.

Loading: Detectron2's ``DetectionCheckpointer`` loads what fits and logs one warning per tensor
that does not: a checkpoint of another architecture or EfficientNet variant "loads" with most of
the model left random, and the run goes on. :class:`EfficientPSCheckpointer` checks the checkpoint
*before* copying any weight and:

- **raises** :class:`CheckpointMismatchError` when tensors have other shapes in the checkpoint than
  in the model (another variant, other class counts), naming them, unless
  ``allow_shape_mismatch=True`` (fine-tuning on new classes), which skips them with one warning;
- **raises** :class:`CheckpointMismatchError` when no tensor of the checkpoint names a tensor of the
  model (another architecture, or a torchvision state dict that needs converting first);
- **warns** once, grouped by module, about model tensors the checkpoint lacks (they stay randomly
  initialised, e.g. the FPN and heads after loading ImageNet backbone weights) and checkpoint
  tensors the model does not use.

With ``allow_missing=False`` (training, see ``MODEL.ALLOW_PARTIAL_WEIGHTS``) model tensors that the
checkpoint lacks are refused too, unless the checkpoint is a known partial kind: a converted
ImageNet backbone (:func:`is_partial_checkpoint`).

A file that is not a checkpoint at all (empty, truncated, an HTML page, another format) raises
:class:`CheckpointFileError`, naming the file and saying what it looks like; ``resume_or_load``
with ``resume=True`` then falls back to the newest intact checkpoint of ``save_dir`` (warning).

After :meth:`load`, :attr:`EfficientPSCheckpointer.last_report` holds the :class:`LoadReport`.
Everything else (URLs, ``.pkl`` files, resuming optimizer state) is Detectron2's behaviour.
"""

import logging
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Tuple
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .atomic_io import atomic_write

__all__ = [
    "AtomicDetectionCheckpointer",
    "CheckpointFileError",
    "CheckpointMismatchError",
    "EfficientPSCheckpointer",
    "LoadReport",
    "check_checkpoint_exists",
    "check_checkpoint_file",
    "describe_file",
    "describe_load_error",
    "is_partial_checkpoint",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 8  # tensors named in one message
# The settings that fix tensor shapes, and those that group the optimizer's parameters, as a
# YAML config names them (the checkpointer's defaults; ConfigAdapter gives a LazyConfig's).
SHAPE_KEYS = (
    "the backbone (MODEL.TWO_WAY_FPN.BOTTOM_UP, MODEL.EFFICIENTNET.VARIANT, MODEL.RESNETS), "
    "MODEL.TWO_WAY_FPN.OUT_CHANNELS and the class counts (MODEL.SEM_SEG_HEAD.NUM_CLASSES, "
    "MODEL.ROI_HEADS.NUM_CLASSES)"
)
GROUPING_KEYS = "SOLVER.BIAS_LR_FACTOR, SOLVER.WEIGHT_DECAY_NORM, SOLVER.WEIGHT_DECAY_BIAS, ..."


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """Same as ``DetectionCheckpointer``, but saves atomically when ``save_dir`` is local."""

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # remote storage: keep fvcore's own behaviour
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(save_file, lambda f: f.write(last_filename_basename.encode()))


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


class CheckpointFileError(ValueError):
    """A file given as a checkpoint cannot be read as one (empty, truncated, another format)."""


# ``__author__`` of checkpoints that hold only part of EfficientPS by design.
PARTIAL_CHECKPOINT_AUTHORS = ("efficientps_d2.tools.convert_torchvision_weights",)


def is_partial_checkpoint(checkpoint):
    """Whether a loaded checkpoint dict is a known partial kind (a converted ImageNet backbone,
    marked by its ``__author__``), whose missing FPN and head tensors are expected."""
    author = str(checkpoint.get("__author__", "")) if isinstance(checkpoint, dict) else ""
    return author.startswith(PARTIAL_CHECKPOINT_AUTHORS)


_MAGIC = [
    (b"PK\x03\x04", "a zip archive (torch's checkpoint format) that is truncated or corrupt"),
    (b"\x89HDF", "an HDF5 file (e.g. Keras weights), not a torch checkpoint"),
    (b"\x89PNG", "a PNG image, not a checkpoint"),
    (b"\xff\xd8\xff", "a JPEG image, not a checkpoint"),
    (b"\x1f\x8b", "a gzip archive: unpack it first"),
]


def describe_file(path):
    """A few words on what the file at ``path`` looks like, for errors about unreadable weights."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"unreadable ({e})"
    if size == 0:
        return "an empty file (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"{what} ({size} bytes)"
    if head[:1] == b"\x80":
        return f"a pickle ({size} bytes) that torch cannot load"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a checkpoint: unknown binary data ({size} bytes, starts with {head[:8]!r})"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file ({size} bytes, starts with {first!r}), not a checkpoint"


def describe_load_error(error):
    """The useful part of a torch.load error, without torch's advice to pass weights_only=False
    (which is not what a file of another format or a truncated one needs)."""
    message = str(error)
    marker = "WeightsUnpickler error:"
    if marker in message:
        detail = [line.strip() for line in message.split(marker, 1)[1].splitlines() if line.strip()]
        return f"unpickling: {detail[0] if detail else 'failed'}"
    if isinstance(error, EOFError):
        return "the data ends early"
    first = message.strip().splitlines()[0].split(". ")[0][:200] if message.strip() else ""
    return f"{type(error).__name__}: {first}"


@dataclass
class LoadReport:
    """What one checkpoint load did.

    Attributes:
        path: the checkpoint loaded.
        loaded: number of model tensors that received a value from the checkpoint.
        loaded_names: their names (empty for heuristically matched ``.pkl`` files).
        missing: model tensors the checkpoint lacks (left as they were: random or pre-loaded).
        unexpected: checkpoint tensors the model does not have.
        incorrect_shapes: (name, shape in the checkpoint, shape in the model) of skipped tensors.
    """

    path: str
    loaded: int = 0
    loaded_names: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    incorrect_shapes: List[Tuple[str, tuple, tuple]] = field(default_factory=list)

    def summary(self):
        """A few human-readable lines."""
        lines = [f"Loaded {self.loaded} tensors from '{self.path}'."]
        if self.loaded_names:
            lines[0] = lines[0][:-1] + f": {group_names(self.loaded_names)}."
        if self.incorrect_shapes:
            lines.append(
                f"Skipped {len(self.incorrect_shapes)} tensors of another shape: "
                + _list_shapes(self.incorrect_shapes)
            )
        if self.missing:
            lines.append(
                f"{len(self.missing)} model tensors are not in the checkpoint and keep their "
                f"initial (random) values: {group_names(self.missing)}"
            )
        if self.unexpected:
            lines.append(
                f"{len(self.unexpected)} checkpoint tensors are not used by the model: "
                f"{group_names(self.unexpected)}"
            )
        return "\n".join(lines)


def group_names(names, depth=2):
    """'backbone.top_down_laterals (12), sem_seg_head.dpc32 (40)': names counted by prefix."""
    counts = Counter(".".join(n.split(".")[:depth]) for n in names)
    return ", ".join(f"{prefix} ({count})" for prefix, count in sorted(counts.items()))


def _list_shapes(shapes):
    shown = "; ".join(
        f"'{name}' {tuple(ckpt)} in the checkpoint vs {tuple(model)} in the model"
        for name, ckpt, model in shapes[:_MAX_LISTED]
    )
    more = f"; and {len(shapes) - _MAX_LISTED} more" if len(shapes) > _MAX_LISTED else ""
    return shown + more


def _optimizer_settings(optimizer):
    """{"base learning rate": [...], "weight decay": [...], "momentum": [...]}: the distinct values
    of an optimizer's parameter groups ({} for None)."""
    if optimizer is None:
        return {}
    groups = optimizer.param_groups
    return {
        "base learning rate": sorted({g.get("initial_lr", g["lr"]) for g in groups}),
        "weight decay": sorted({g.get("weight_decay", 0.0) for g in groups}),
        "momentum": sorted({g.get("momentum", 0.0) for g in groups}),
    }


def _strip_common_prefix(names, prefix="module."):
    # fvcore strips "module." (from DistributedDataParallel) only when every key has it.
    if names and all(n.startswith(prefix) for n in names):
        return {n[len(prefix) :]: n for n in names}
    return {n: n for n in names}


def _architecture_hint(checkpoint_names):
    names = list(checkpoint_names)
    if any(n.startswith("features.") for n in names) and all(
        n.startswith(("features.", "classifier.")) for n in names
    ):
        return (
            " It looks like a torchvision EfficientNet state dict: convert it first with "
            "`python -m efficientps_d2.tools.convert_torchvision_weights --variant bN IN OUT`."
        )
    if any(n.startswith(("layer1.", "conv1.", "res2.")) for n in names):
        return (
            " It looks like a ResNet checkpoint: it fits a model whose "
            "MODEL.TWO_WAY_FPN.BOTTOM_UP is 'build_resnet_backbone' (the efficientps_R_50 configs)."
        )
    return ""


def check_checkpoint_exists(path, key="MODEL.WEIGHTS"):
    """Raises FileNotFoundError (IsADirectoryError for a folder), naming the config ``key`` that
    set it, for a local checkpoint ``path`` that is not a file ("" and URLs pass: nothing to
    load, or fetched on loading)."""
    if path and not urlparse(path).scheme and not os.path.isfile(path):
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"Checkpoint '{path}' ({key}) is a folder; name a checkpoint file in it (e.g. "
                f"'{os.path.join(path, 'model_final.pth')}')."
            )
        raise FileNotFoundError(f"Checkpoint '{path}' ({key}) does not exist.")


def check_checkpoint_file(path, key="MODEL.WEIGHTS", *, fetched_from=None):
    """:func:`check_checkpoint_exists`, then a look at the file's first bytes (not a load): raises
    :class:`CheckpointFileError`, naming the file and ``key``, for one that cannot be a checkpoint:
    empty, a zip archive cut short (torch's format; its directory is at the end), an HTML or XML
    page (a failed download), an image, an HDF5 or gzip file. Others (pickles, ``.pkl``) pass;
    loading judges them.

    ``fetched_from``: the URL that ``path`` is the downloaded copy of (``PathManager``'s cache);
    the error names both, and says to delete the copy, which would otherwise be reused."""
    check_checkpoint_exists(path, key)
    if not path or urlparse(path).scheme:
        return
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        broken = not zipfile.is_zipfile(path)
    else:
        broken = not head or head.lstrip().startswith(b"<")
        broken = broken or any(head.startswith(magic) for magic, _ in _MAGIC)
    if broken and fetched_from:
        raise CheckpointFileError(
            f"Checkpoint '{fetched_from}' ({key}) cannot be loaded: its downloaded copy '{path}' "
            f"is {describe_file(path)}. Delete that copy (it is reused, not fetched again) and "
            "check the URL."
        )
    if broken:
        raise CheckpointFileError(
            f"Checkpoint '{path}' ({key}) cannot be loaded: it is {describe_file(path)}."
        )


class EfficientPSCheckpointer(AtomicDetectionCheckpointer):
    """``DetectionCheckpointer`` that refuses checkpoints that do not fit (see module docstring).

    Saving is :class:`~efficientps_d2.checkpoint.AtomicDetectionCheckpointer`'s (atomic).

    Args:
        model, save_dir, checkpointables: as for ``DetectionCheckpointer``.
        allow_shape_mismatch: skip tensors of another shape with a warning instead of raising
            (e.g. to fine-tune a trained model on a data set with other classes).
        allow_missing: accept checkpoints that lack model tensors (they keep their initial
            values) with a warning; False raises unless :func:`is_partial_checkpoint`.
        for_evaluation: the weights are to be evaluated: with ``allow_missing=False`` a
            checkpoint that lacks model tensors is refused whatever its kind (a converted
            ImageNet backbone would be scored with random heads).
        weights_key, partial_key: the config keys that name the weights and opt in to partial
            ones, for messages (a LazyConfig's ``train.init_checkpoint``, ...).
        shape_keys, grouping_keys: the same, in words, for the settings that fix the model's
            tensor shapes and that group the optimizer's parameters.
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        allow_shape_mismatch=False,
        allow_missing=True,
        for_evaluation=False,
        weights_key="MODEL.WEIGHTS",
        partial_key="MODEL.ALLOW_PARTIAL_WEIGHTS",
        shape_keys=SHAPE_KEYS,
        grouping_keys=GROUPING_KEYS,
        **checkpointables,
    ):
        super().__init__(model, save_dir, **checkpointables)
        self.weights_key, self.partial_key = weights_key, partial_key
        self.shape_keys, self.grouping_keys = shape_keys, grouping_keys
        self.allow_shape_mismatch = allow_shape_mismatch
        self.allow_missing = allow_missing
        self.for_evaluation = for_evaluation
        self.last_report = None
        self._path = None
        self._resume_hint = None  # set while resuming (see resume_or_load)

    def load(self, path, *args, **kwargs):
        """Loads ``path`` (local file or URL); raises FileNotFoundError for a missing local file."""
        check_checkpoint_exists(path, self.weights_key)
        self._path = path
        self.last_report = None
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # Detectron2 resets this only on success; a failed load must not block the next one.
            self._parsed_url_during_load = None

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except CheckpointFileError:
            raise
        except Exception as e:  # pickle errors of .pkl files: say which file and what it is
            raise CheckpointFileError(
                f"Checkpoint '{self._path or filename}' cannot be loaded: it is "
                f"{describe_file(filename)} ({describe_load_error(e)})."
            ) from e

    def _torch_load(self, f):
        try:
            loaded = super()._torch_load(f)
        except Exception as e:  # torch's zip and unpickling errors
            raise CheckpointFileError(
                f"Checkpoint '{self._path or f}' cannot be loaded: it is {describe_file(f)} "
                f"({describe_load_error(e)})."
            ) from e
        if not isinstance(loaded, dict) or not isinstance(loaded.get("model", {}), dict):
            inner = loaded.get("model") if isinstance(loaded, dict) else loaded
            raise CheckpointFileError(
                f"Checkpoint '{self._path or f}' holds a {type(inner).__name__}, not a state dict "
                "(a dict of tensors, or a dict with one under 'model')."
            )
        return loaded

    def resume_or_load(self, path, *, resume=True):
        """As Detectron2's, but when resuming from a checkpoint of ``save_dir`` that cannot be read
        (truncated, deleted, or ``last_checkpoint`` is empty), falls back to the newest one that
        can, with a warning.

        Resuming is strict whatever ``allow_shape_mismatch`` / ``allow_missing`` say (they are for
        the weights a run starts from): a checkpoint of ``save_dir`` whose tensors or training
        state (optimizer, scheduler) do not fit this run was written with another config, and
        raises :class:`CheckpointMismatchError` naming it. Skipping the misfits let the run load
        the old optimizer's momentum of other shapes and stop at its first step with torch's
        "The size of tensor a must match the size of tensor b"."""
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        last = self.get_checkpoint_file()
        if os.path.isdir(last):  # an empty last_checkpoint (fvcore's, cut short by a kill)
            logger.warning(
                f"'{os.path.join(self.save_dir, 'last_checkpoint')}' names no checkpoint file."
            )
            last = None
        candidates = ([last] if last else []) + [f for f in self._saved_checkpoints() if f != last]
        for candidate in candidates:
            try:
                checkpoint = self._load_to_resume(candidate)
            except (CheckpointFileError, FileNotFoundError) as e:
                logger.warning(f"Cannot resume from '{candidate}': {e}")
                continue
            if candidate != last:
                instead = f", instead of '{last}' (named by last_checkpoint)" if last else ""
                logger.warning(
                    f"Resumed from '{candidate}', the newest intact checkpoint in "
                    f"'{self.save_dir}'{instead}."
                )
            return checkpoint
        raise CheckpointFileError(
            f"No intact checkpoint in '{self.save_dir}' to resume from (tried {candidates}); "
            f"start without --resume, or from {self.weights_key}."
        )

    def _load_to_resume(self, path):
        hint = (
            f"--resume continues the run in '{self.save_dir}', whose checkpoints were written "
            "with another config: resume with that config, or train this one in another output "
            "folder."
        )
        if self.for_evaluation:  # --eval-only --resume
            hint = (
                f"--resume evaluates the last checkpoint of '{self.save_dir}', which was written "
                f"with another config: use that config, or name the weights ({self.weights_key}) "
                "without --resume."
            )
        optimizer = getattr(self.checkpointables.get("trainer"), "optimizer", None)
        configured = _optimizer_settings(optimizer)
        lenient = self.allow_shape_mismatch, self.allow_missing
        self.allow_shape_mismatch, self.allow_missing = False, False
        self._resume_hint = hint  # instead of the hints to load partial weights
        try:
            checkpoint = self.load(path)
        except (CheckpointFileError, CheckpointMismatchError):
            raise
        except (KeyError, RuntimeError, ValueError) as e:  # the optimizer's or a hook's state
            raise CheckpointMismatchError(
                f"Cannot resume from '{path}': its training state does not fit this run's "
                f"({type(e).__name__}: {e}); e.g. settings that group the parameters otherwise "
                f"({self.grouping_keys}) changed. {hint}"
            ) from e
        finally:
            self.allow_shape_mismatch, self.allow_missing = lenient
            self._resume_hint = None
        self._warn_of_resumed_settings(path, configured, _optimizer_settings(optimizer))
        return checkpoint

    def _warn_of_resumed_settings(self, path, configured, resumed):
        # torch's optimizer.load_state_dict restores the saved learning rate, weight decay and
        # momentum (and Detectron2's scheduler its base rates): a resumed run trains with those,
        # not with the config's, which Detectron2 does without a word.
        changed = [
            f"{name} {resumed[name]} (the config gives {configured[name]})"
            for name in configured
            if configured[name] != resumed.get(name)
        ]
        if changed:
            logger.warning(
                f"Resuming from '{path}' restores the optimizer settings it was saved with: "
                f"{'; '.join(changed)}. To train with the config's, start a new run from its "
                f"weights ({self.weights_key} set to '{path}', without --resume)."
            )

    def _saved_checkpoints(self):
        """Paths of the visible ``*.pth`` files of ``save_dir``, newest first."""
        if not self.save_dir or "://" in self.save_dir or not os.path.isdir(self.save_dir):
            return []
        paths = [
            os.path.join(self.save_dir, f)
            for f in os.listdir(self.save_dir)
            if f.endswith(".pth") and not f.startswith(".")
        ]
        return sorted(paths, key=os.path.getmtime, reverse=True)

    def _load_model(self, checkpoint):
        heuristics = checkpoint.get("matching_heuristics", False)
        checkpoint_names = set(_strip_common_prefix(list(checkpoint["model"])))
        if not heuristics:
            # Checked before anything is copied, so a refused checkpoint leaves the model intact.
            # (Heuristically matched .pkl files are only known after Detectron2's matching.)
            self._check_fits(checkpoint["model"])
            known_partial = is_partial_checkpoint(checkpoint) and not self.for_evaluation
            if not self.allow_missing and not known_partial:
                self._refuse_missing(checkpoint_names)
        incompatible = super()._load_model(checkpoint)
        model_names = set(self.model.state_dict())
        incorrect = {k for k, _, _ in incompatible.incorrect_shapes}
        if heuristics:  # names were rewritten by the matching; count what the model received
            checkpoint_names = model_names - set(incompatible.missing_keys)
        loaded_names = sorted((checkpoint_names & model_names) - incorrect)
        self.last_report = LoadReport(
            path=str(self._path),
            loaded=len(loaded_names),
            loaded_names=loaded_names,
            missing=list(incompatible.missing_keys),
            unexpected=list(incompatible.unexpected_keys),
            incorrect_shapes=list(incompatible.incorrect_shapes),
        )
        if heuristics:
            self._raise_if_unfit(self.last_report.incorrect_shapes, self.last_report.loaded)
        return incompatible

    def _refuse_missing(self, checkpoint_names):
        # BatchNorm's step counters are not weights (checkpoints of frozen BN have none).
        missing = [
            n
            for n in self.model.state_dict()
            if n not in checkpoint_names and not n.endswith("num_batches_tracked")
        ]
        if not missing:
            return
        if self.for_evaluation:
            use = "be evaluated with"
            hint = f"Name trained weights (e.g. a model_final.pth), or set {self.partial_key} "
            hint += "True to evaluate them anyway."
        else:
            use = "train from"
            hint = f"Set {self.partial_key} True to load it anyway (converted ImageNet backbones "
            hint += "of efficientps_d2.tools.convert_torchvision_weights are accepted as they are)."
        raise CheckpointMismatchError(
            f"Checkpoint '{self._path}' lacks {len(missing)} tensors of the model, which would "
            f"{use} random values: {group_names(missing)}. {self._resume_hint or hint}"
        )

    def _check_fits(self, checkpoint_state):
        model_state = self.model.state_dict()
        names = _strip_common_prefix(list(checkpoint_state))
        incorrect, matched = [], 0
        for name, original in names.items():
            if name not in model_state:
                continue
            matched += 1
            shape = tuple(getattr(checkpoint_state[original], "shape", ()))
            if shape != tuple(model_state[name].shape):
                incorrect.append((name, shape, tuple(model_state[name].shape)))
        if not checkpoint_state:
            raise CheckpointMismatchError(f"Checkpoint '{self._path}' holds no model tensors.")
        self._raise_if_unfit(incorrect, matched - len(incorrect), list(names))

    def _raise_if_unfit(self, incorrect, matched, checkpoint_names=()):
        if matched == 0 and not incorrect:
            names = list(checkpoint_names)
            raise CheckpointMismatchError(
                f"Checkpoint '{self._path}' does not fit this {type(self.model).__name__}: none "
                f"of its {len(names)} tensor names is a tensor of the model (checkpoint: "
                f"{names[:3]}, model: {list(self.model.state_dict())[:3]})."
                + _architecture_hint(names)
                + (f" {self._resume_hint}" if self._resume_hint else "")
            )
        if incorrect and not self.allow_shape_mismatch:
            skip = f", or set {self.partial_key} True to skip them (training)"
            hint = self._resume_hint or (
                f"Check {self.shape_keys} against the checkpoint's config"
                + ("." if self.for_evaluation else skip + ".")
            )
            raise CheckpointMismatchError(
                f"Checkpoint '{self._path}' was made for another model: {len(incorrect)} tensors "
                f"have other shapes ({_list_shapes(incorrect)}). {hint}"
            )

    def _log_incompatible_keys(self, incompatible):
        # One grouped message instead of Detectron2's one warning per tensor.
        report = self.last_report
        if report is None:
            return super()._log_incompatible_keys(incompatible)
        if report.missing or report.unexpected or report.incorrect_shapes:
            logger.warning(report.summary())
        else:
            logger.info(report.summary())
