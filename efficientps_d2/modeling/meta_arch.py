"""The EfficientPS meta-architecture: backbone, semantic head, Mask R-CNN, panoptic fusion."""

import contextlib
import dataclasses
import logging
import numbers
from typing import Dict, List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_sem_seg_head
from detectron2.structures import Boxes, ImageList, Instances
from torch.profiler import record_function

from ..data.image_files import check_model_input_format
from ..data.metadata import check_thing_semantic_ids, thing_semantic_ids_from_config
from .fast_inference import (
    InferenceNetwork,
    InferenceOptions,
    build_inference_network,
    check_supported,
    rpn_proposals,
)
from .fusion import panoptic_postprocess
from .inplace_abn import convert_to_inplace_abn
from .threaded_roi_align import thread_roi_poolers

logger = logging.getLogger(__name__)

# What EfficientPS keeps in __dict__ besides nn.Module's state: derived from its modules, rebuilt
# on demand (see _inference_network, _weight_tensors, _training_parts).
_CACHES = ("_inference_copy", "_weight_tensor_list", "_compiled_training")


def check_input_images(batched_inputs, input_format, whose="model", arrays=False):
    """The "image" of each of ``batched_inputs``, all checked before any runs: a list of dicts
    whose "image" is a (3, H, W) tensor (or numpy array, with ``arrays``) with at least one pixel,
    and whose optional "height"/"width" (the output size) are positive whole numbers. An (H, W, 3)
    image or a numpy array failed deep inside with a broadcast or attribute error, a (1, H, W) or
    (H, W) one ran as a broadcast gray image, an image without pixels failed in a convolution
    ("Kernel size can't be greater than actual input size"), an output size of 0 gave the input
    size and a negative or fractional one failed in an interpolation. ``whose``: the model named
    in the messages."""
    if not isinstance(batched_inputs, (list, tuple)):
        raise ValueError(
            f"The {whose} takes a list of input dicts (model([{{'image': chw_image}}])), got a "
            f"{type(batched_inputs).__name__}."
        )
    images = []
    for i, x in enumerate(batched_inputs):
        image = x.get("image") if isinstance(x, dict) else None
        if arrays and isinstance(image, np.ndarray):
            image = torch.as_tensor(image)
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            got = type(image).__name__
            if hasattr(image, "shape"):
                got = f"a {got} of shape {tuple(image.shape)}"
            raise ValueError(
                f"batched_inputs[{i}]['image'] must be a (3, H, W) torch tensor in the {whose}'s "
                f"input format ({input_format}), got {got}: pass an (H, W, 3) array as "
                "torch.as_tensor(image).permute(2, 0, 1), a grayscale image as 3 channels."
            )
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(
                f"batched_inputs[{i}]['image'] has no pixels: shape {tuple(image.shape)}."
            )
        for key in ("height", "width"):
            size = x.get(key)
            if size is not None and not _is_positive_whole_number(size):
                raise ValueError(
                    f"batched_inputs[{i}]['{key}'] is the output {key}, a positive whole number "
                    f"of pixels (or absent, for the image's own), got {size!r}."
                )
        images.append(image)
    return images


def _is_positive_whole_number(value) -> bool:
    """Whether ``value`` is an int > 0 (a Python, numpy or one-element integer torch one)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            return False
        value = value.item()
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


@META_ARCH_REGISTRY.register()
class EfficientPS(GeneralizedRCNN):
    """EfficientPS (Mohan & Valada, IJCV 2021) as a Detectron2 meta-architecture.

    Training input: Detectron2's list of dicts with "image" (3, H, W), "sem_seg" (H, W) over all
    classes and "instances" (gt_boxes, gt_classes, gt_masks). Training output: a dict of losses
    ("loss_sem_seg", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask").

    Inference output, per image, at the requested "height"/"width" (the input size by default):
        "sem_seg": (num_classes, height, width) logits,
        "instances": Instances with pred_boxes, scores, pred_classes, pred_masks, pred_mask_logits,
        "panoptic_seg": (int32 (height, width) segment ids, list of segment dicts).
    Class ids are all-class contiguous ids (Detectron2's "standard" panoptic metadata, see
    ``efficientps_d2.data.metadata``), for things as for stuff.

    Inference runs under ``torch.inference_mode`` (outputs are inference tensors: clone one to
    change it in place), through an
    :class:`~efficientps_d2.modeling.fast_inference.InferenceNetwork` chosen by
    ``inference_options`` (MODEL.EFFICIENTPS.FAST_INFERENCE, INFERENCE_DTYPE, CUDA_GRAPH, COMPILE):
    this model's own modules, or a cached copy of the convolutional parts (backbone, semantic head,
    RPN, box and mask heads) that is fused (the default), cast, graphed or compiled. The copy is
    rebuilt whenever a weight, buffer or option changes and dropped by ``train()``; it costs one
    more set of weights. Changes are seen through the tensors' version counters and storage, as
    optimizers, ``load_state_dict`` and Detectron2's checkpointer make them; a write through
    ``.data`` is not seen: set ``fast_inference = False`` (or call ``train()``) around such code.
    """

    @configurable
    def __init__(
        self,
        *,
        sem_seg_head,
        thing_semantic_ids,
        confidence_thresh=0.5,
        overlap_thresh=0.5,
        stuff_area_limit=2048,
        mask_logit_scale=4.0,
        channels_last=True,
        fast_inference=True,
        inference_dtype="float32",
        cuda_graph=False,
        cuda_graph_cache_size=4,
        cuda_graph_roi_heads=False,
        compile=False,
        compile_mode="default",
        compile_training=False,
        inplace_abn=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Refused before the data loader reads a batch in it. The one rule, which the demo's
        # predictor (it builds the model) and the export tool share.
        check_model_input_format(self.input_format, "INPUT.FORMAT (model.input_format)")
        # Heads that inference cannot run (no mask head, Cascade) are refused before training.
        check_supported(self)
        # torchvision's CPU ROIAlign runs on one core, forward and backward: the poolers share
        # their ROIs out between two threads on the CPU (in training as in inference).
        thread_roi_poolers(self.roi_heads)
        self.sem_seg_head = sem_seg_head
        if inplace_abn:
            # The paper's norm layer: BatchNorm + LeakyReLU that keep half the activations.
            converted = convert_to_inplace_abn(self)
            log = logger.info if converted else logger.warning
            log(
                "MODEL.EFFICIENTPS.INPLACE_ABN: %d BatchNorm + LeakyReLU pairs made in-place "
                "activated BN (FrozenBN, GN and norms without a LeakyReLU stay as they are).",
                converted,
            )
        # A Python list, not a buffer: the fusion needs the ids on the host (a buffer on the GPU
        # would cost it a device read per image); the remap of pred_classes copies it over.
        self.thing_semantic_ids = [int(i) for i in thing_semantic_ids]
        # A YAML config's ids were checked as it was read; a LazyConfig's come from the metadata
        # of whichever data set dataloader.train.dataset.names names.
        check_thing_semantic_ids(
            self.thing_semantic_ids,
            getattr(self.roi_heads, "num_classes", None),
            getattr(sem_seg_head, "num_classes", None),
        )
        _check_fusion_settings(
            confidence_thresh, overlap_thresh, stuff_area_limit, mask_logit_scale
        )
        self.confidence_thresh = confidence_thresh
        self.overlap_thresh = overlap_thresh
        self.stuff_area_limit = stuff_area_limit
        self.mask_logit_scale = mask_logit_scale
        if channels_last:
            # Convs whose weight is channels-last produce channels-last outputs, so the whole
            # network runs in that layout; load_state_dict copies into it, keeping the layout.
            self.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        # How inference runs (see fast_inference.InferenceOptions); change it as a whole, e.g.
        # ``model.inference_options = dataclasses.replace(model.inference_options, ...)``, or
        # through the ``fast_inference`` and ``inference_dtype`` properties.
        self.inference_options = InferenceOptions(
            fast_inference=fast_inference,
            dtype=inference_dtype,
            cuda_graph=cuda_graph,
            cuda_graph_cache_size=cuda_graph_cache_size,
            cuda_graph_roi_heads=cuda_graph_roi_heads,
            compile=compile,
            compile_mode=compile_mode,
        )
        self.compile_training = compile_training

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        fusion = cfg.MODEL.PANOPTIC_FUSION
        ret.update(
            sem_seg_head=build_sem_seg_head(cfg, ret["backbone"].output_shape()),
            thing_semantic_ids=thing_semantic_ids_from_config(
                cfg, cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            ),
            confidence_thresh=fusion.CONFIDENCE_THRESH,
            overlap_thresh=fusion.OVERLAP_THRESH,
            stuff_area_limit=fusion.STUFF_AREA_LIMIT,
            mask_logit_scale=fusion.MASK_LOGIT_SCALE,
            channels_last=cfg.MODEL.EFFICIENTPS.CHANNELS_LAST,
            **InferenceOptions.config_kwargs(cfg),
            compile_training=cfg.MODEL.EFFICIENTPS.COMPILE_TRAINING,
            inplace_abn=cfg.MODEL.EFFICIENTPS.INPLACE_ABN,
        )
        return ret

    def preprocess_image(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """GeneralizedRCNN's normalisation and padding, after :func:`check_input_images`."""
        check_input_images(batched_inputs, self.input_format)
        return super().preprocess_image(batched_inputs)

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return self.inference(batched_inputs)
        _check_training_inputs(batched_inputs, self.input_format, self.roi_heads.num_classes)
        try:
            return self._training_losses(batched_inputs)
        except Exception as e:  # torch.compile (COMPILE_TRAINING) may wrap torch's ValueError
            named = _named_one_value_per_channel(e, batched_inputs)
            if named is None:
                raise
            raise named from e

    def _training_losses(self, batched_inputs):
        images = super().preprocess_image(batched_inputs)  # checked in forward
        backbone, sem_seg_head = self._training_parts()
        # In the weights' dtype, as inference casts: Detectron2 reads "YUV-BT.601" images as
        # float64, which the float32 convolutions refused ("expected scalar type Double").
        features = backbone(images.tensor.to(self.pixel_mean.dtype))

        gt_sem_seg = ImageList.from_tensors(
            # int64, as cross entropy takes it (Detectron2's DatasetMapper gives int64 too).
            [x["sem_seg"].to(self.device, torch.long) for x in batched_inputs],
            self.backbone.size_divisibility,
            self.sem_seg_head.ignore_value,
            self.backbone.padding_constraints,
        ).tensor
        _, losses = sem_seg_head(features, gt_sem_seg, images.image_sizes)

        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        # No cuDNN autotuning in the ROI heads, forward or backward (see _cudnn_benchmark_off).
        autotuning = self.device.type == "cuda" and torch.backends.cudnn.benchmark
        if autotuning:
            features = {k: _SetCudnnBenchmarkInBackward.apply(v, True) for k, v in features.items()}
        with _cudnn_benchmark_off(self.device):
            _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if autotuning:
            detector_losses = {
                k: _SetCudnnBenchmarkInBackward.apply(v, False) for k, v in detector_losses.items()
            }
        losses.update(proposal_losses)
        losses.update(detector_losses)
        return losses

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances=None,
        do_postprocess=True,
    ):
        """Runs the network; with ``do_postprocess`` also resizes and fuses (see class docstring).

        Without it, returns a tuple (semantic logits at the padded input size (N, C, H, W), list
        of N detector Instances in input coordinates, list of N input (height, width) sizes
        before padding): what test-time augmentation merges, and what :meth:`postprocess` takes
        image by image. An empty ``batched_inputs`` gives an empty list of outputs (without
        ``do_postprocess``: logits of shape (0, C, 0, 0) and two empty lists).

        ``detected_instances`` keeps ``GeneralizedRCNN.inference``'s signature; EfficientPS
        detects its own instances, so anything but None is refused.
        """
        if detected_instances is not None or not self.roi_heads.mask_on:
            # Detectron2's GeneralizedRCNNWithTTA (tools/train_net.py's TEST.AUG.ENABLED) calls
            # inference with its mask head off, then with given boxes: it stopped with "got
            # multiple values for argument 'do_postprocess'".
            raise NotImplementedError(
                "EfficientPS.inference takes no detected_instances and needs its mask head on "
                "(roi_heads.mask_on), as Detectron2's GeneralizedRCNNWithTTA does not leave it: "
                "EfficientPS's test-time augmentation (TEST.AUG.ENABLED in train_net.py and "
                "demo.py) is efficientps_d2.modeling.EfficientPSWithTTA."
            )
        # Checked before any work, the inference copy's build included.
        if not check_input_images(batched_inputs, self.input_format):
            # Detectron2's ImageList refuses an empty batch with a bare assertion.
            if do_postprocess:
                return []
            classes = self.sem_seg_head.num_classes
            return torch.empty(0, classes, 0, 0, device=self.device), [], []
        network = self._inference_network()
        # Each stage named for torch.profiler (the benchmark's host time per stage); without a
        # profiler running, a marker costs a few microseconds.
        with torch.inference_mode():
            with record_function("EfficientPS.dense"):
                images = super().preprocess_image(batched_inputs)  # checked above
                features, sem_seg_logits, objectness, proposal_boxes = network.dense(images.tensor)
            with record_function("EfficientPS.proposals"):
                proposals = rpn_proposals(
                    self.proposal_generator, images, objectness, proposal_boxes
                )
            with record_function("EfficientPS.detection"), _cudnn_benchmark_off(self.device):
                detections = network.detect(self.roi_heads, features, proposals)
            if not do_postprocess:
                return sem_seg_logits, detections, images.image_sizes
            with record_function("EfficientPS.postprocess"):
                return [
                    self.postprocess(logits, det, image_size, x.get("height"), x.get("width"))
                    for logits, det, image_size, x in zip(
                        sem_seg_logits, detections, images.image_sizes, batched_inputs
                    )
                ]

    def _inference_network(self) -> InferenceNetwork:
        """The :class:`~efficientps_d2.modeling.fast_inference.InferenceNetwork` that inference
        runs under ``self.inference_options``: this model's own modules, or a cached copy of them
        (fused, cast, graphed or compiled), rebuilt whenever one of the model's weights or buffers
        or the options change."""
        options = self.inference_options
        if not options.needs_copy(self.device):
            return build_inference_network(self, options)
        # A weight that is loaded, trained or moved changes its version counter or storage.
        signature = [options] + [(t._version, t.data_ptr()) for t in self._weight_tensors()]
        cached = self.__dict__.get("_inference_copy")  # not a submodule: no state_dict entries
        if cached is None or cached[0] != signature:
            self.__dict__.pop("_inference_copy", None)  # free the stale copy first
            cached = (signature, build_inference_network(self, options))
            self.__dict__["_inference_copy"] = cached
        return cached[1]

    @property
    def fast_inference(self) -> bool:
        """MODEL.EFFICIENTPS.FAST_INFERENCE: run a fused copy of the convolutional parts."""
        return self.inference_options.fast_inference

    @fast_inference.setter
    def fast_inference(self, enabled: bool):
        self.inference_options = dataclasses.replace(self.inference_options, fast_inference=enabled)

    @property
    def inference_dtype(self) -> str:
        """MODEL.EFFICIENTPS.INFERENCE_DTYPE: the dense network's dtype in inference."""
        return self.inference_options.dtype

    @inference_dtype.setter
    def inference_dtype(self, dtype: str):
        self.inference_options = dataclasses.replace(self.inference_options, dtype=dtype)

    def _training_parts(self):
        """(backbone, semantic head) for the training forward: the modules themselves, or with
        ``compile_training`` (MODEL.EFFICIENTPS.COMPILE_TRAINING) torch.compile wrappers of them
        (same parameters; kept outside the module tree, so no state_dict entries)."""
        if not self.compile_training:
            return self.backbone, self.sem_seg_head
        compiled = self.__dict__.get("_compiled_training")
        if (
            compiled is None
            or compiled[0] is not self.backbone
            or compiled[1] is not self.sem_seg_head
        ):
            compiled = (
                self.backbone,
                self.sem_seg_head,
                torch.compile(self.backbone),
                torch.compile(self.sem_seg_head),
            )
            self.__dict__["_compiled_training"] = compiled
        return compiled[2], compiled[3]

    def _weight_tensors(self):
        """Every parameter and buffer, listed once and kept until ``train``/``eval``, a
        conversion (``to``, ``cuda``, ``float``, ...) or ``load_state_dict`` may replace them:
        walking the module tree on every call would cost milliseconds (B5: ~1,100 tensors)."""
        tensors = self.__dict__.get("_weight_tensor_list")
        if tensors is None:
            tensors = [
                t
                for module in self.modules()
                for table in (module._parameters, module._buffers)
                for t in table.values()
                if t is not None
            ]
            self.__dict__["_weight_tensor_list"] = tensors
        return tensors

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_weight_tensor_list", None)  # conversions may replace the tensors
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_weight_tensor_list", None)  # load_state_dict(assign=True) replaces
        return super()._load_from_state_dict(*args, **kwargs)

    def train(self, mode: bool = True):
        self.__dict__.pop("_weight_tensor_list", None)
        if mode:
            self.__dict__.pop("_inference_copy", None)
        return super().train(mode)

    def __getstate__(self):
        # The caches (inference copy, weight list, compiled training wrappers) are rebuilt on
        # demand from the model's own tensors: a deep copy, pickle or torch.save(model) would
        # otherwise carry a second set of weights, or a torch.compile wrapper of the old modules.
        state = super().__getstate__()
        for cache in _CACHES:
            state.pop(cache, None)
        return state

    def postprocess(self, sem_seg_logits, detections, image_size, height=None, width=None):
        """Resizes one image's outputs to (height, width) and fuses them into a panoptic result.

        Args:
            sem_seg_logits: (C, H_pad, W_pad) logits; detections: Instances at ``image_size``.
        """
        height = height or image_size[0]
        width = width or image_size[1]
        with torch.inference_mode():
            return panoptic_postprocess(
                sem_seg_logits,
                detections,
                image_size,
                height,
                width,
                thing_semantic_ids=self.thing_semantic_ids,
                confidence_thresh=self.confidence_thresh,
                overlap_thresh=self.overlap_thresh,
                stuff_area_limit=self.stuff_area_limit,
                mask_logit_scale=self.mask_logit_scale,
            )


def _check_fusion_settings(confidence_thresh, overlap_thresh, stuff_area_limit, mask_logit_scale):
    """Refuses, when the model is built, fusion settings that the first inference would refuse
    without naming the key (MASK_LOGIT_SCALE) or that it would take without a word though they
    have no meaning (a score or a fraction outside [0, 1], a negative area)."""
    key = "MODEL.PANOPTIC_FUSION."
    if not 0 <= confidence_thresh <= 1:
        raise ValueError(f"{key}CONFIDENCE_THRESH must be in [0, 1], got {confidence_thresh}.")
    if not 0 <= overlap_thresh <= 1:
        raise ValueError(f"{key}OVERLAP_THRESH must be in [0, 1], got {overlap_thresh}.")
    if not stuff_area_limit >= 0:
        raise ValueError(f"{key}STUFF_AREA_LIMIT must be at least 0, got {stuff_area_limit}.")
    if not mask_logit_scale > 0:
        raise ValueError(f"{key}MASK_LOGIT_SCALE must be positive, got {mask_logit_scale}.")


def _check_training_inputs(batched_inputs, input_format, num_things):
    """Refuses, before any work, a training batch whose images :func:`check_input_images`
    refuses, that is empty, or whose dicts lack targets, have a semantic map of another size
    than their image (which padding would have hidden) or instances that
    :func:`_instance_problems` finds."""
    images = check_input_images(batched_inputs, input_format)
    if not images:
        raise ValueError("EfficientPS got an empty training batch (batched_inputs is []).")
    for i, (x, image) in enumerate(zip(batched_inputs, images)):
        for key in ("sem_seg", "instances"):
            if key not in x:
                raise ValueError(
                    f"EfficientPS needs '{key}' in every training input dict, missing in "
                    f"batched_inputs[{i}] (efficientps_d2.data.EfficientPSDatasetMapper makes "
                    "the targets from panoptic annotations; the model is in training mode: call "
                    "model.eval() to predict)."
                )
        sem_seg = x["sem_seg"]
        if isinstance(sem_seg, torch.Tensor) and tuple(sem_seg.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"batched_inputs[{i}]['sem_seg'] must be an (H, W) map of its image's size "
                f"{tuple(image.shape[-2:])}, got shape {tuple(sem_seg.shape)}."
            )
        problems = _instance_problems(x["instances"], num_things)
        if problems:
            file_name = x.get("file_name")
            raise ValueError(
                f"Training input batched_inputs[{i}]{f' ({file_name})' if file_name else ''}: "
                f"{'; '.join(problems)}."
            )


def _instance_problems(instances, num_things):
    """What Detectron2 fails on, without naming the image, in one image's ground-truth
    instances: an empty or non-finite box (the RPN's box loss became inf: the log of a zero
    width) or a class outside [-1, T) (-1 is ignored; T or more failed in cross entropy with
    "Target 5 is out of bounds", on a GPU with a device assertion that ends the process). Checked
    where they are on the CPU, as the data loader gives them: on a GPU the check would wait for
    the device."""
    fields = instances.get_fields() if isinstance(instances, Instances) else {}
    boxes, classes = fields.get("gt_boxes"), fields.get("gt_classes")
    problems = []
    if isinstance(boxes, Boxes) and boxes.tensor.device.type == "cpu":
        b = boxes.tensor
        bad = ~(torch.isfinite(b).all(dim=1) & boxes.nonempty())
        if bad.any():
            k = int(bad.nonzero()[0])
            problems.append(
                f"instance {k}'s gt_boxes {b[k].tolist()} is empty or not finite (drop such "
                "instances: Detectron2's detection_utils.filter_empty_instances)"
            )
    if isinstance(classes, torch.Tensor) and classes.device.type == "cpu" and len(classes):
        if int(classes.min()) < -1 or int(classes.max()) >= num_things:
            problems.append(
                f"its gt_classes {classes.tolist()} are not all thing classes in [0, "
                f"{num_things}) (or -1, ignored; MODEL.ROI_HEADS.NUM_CLASSES = {num_things})"
            )
    return problems


def _named_one_value_per_channel(error, batched_inputs):
    """For a training step that failed with ``error``: the error naming the image, where it is
    torch's "Expected more than 1 value per channel when training" (a BatchNorm layer in training
    mode at a level where a lone image is one position), which names none; else None."""
    cause = error
    while cause is not None and "more than 1 value per channel" not in str(cause):
        cause = cause.__cause__ or cause.__context__
    if cause is None or len(batched_inputs) != 1:
        return None
    file_name = batched_inputs[0].get("file_name")
    return ValueError(
        f"The training image batched_inputs[0]{f' ({file_name})' if file_name else ''} is "
        f"{tuple(batched_inputs[0]['image'].shape[-2:])} (H, W), alone in its batch: at the "
        "network's coarsest level it is one position, where a BatchNorm layer cannot train on one "
        "value per channel. Train on larger images (INPUT.CROP.SIZE, INPUT.MIN_SIZE_TRAIN) or on "
        "at least 2 images per process (SOLVER.IMS_PER_BATCH)."
    )


@contextlib.contextmanager
def _cudnn_benchmark_off(device):
    """cuDNN autotuning off for the ROI heads, whose batch (proposals or detections per step)
    changes every time: with ``cudnn.benchmark`` each new count re-tunes the mask head's convs
    (about a minute per size on an H200 in training). Padding the ROI batch to a fixed size
    would avoid that too, but the padding would enter the mask head's BatchNorm statistics;
    these 14 x 14 convs lose nothing measurable to cuDNN's heuristic choice."""
    if device.type != "cuda" or not torch.backends.cudnn.benchmark:
        yield
        return
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = True


class _SetCudnnBenchmarkInBackward(torch.autograd.Function):
    """Identity whose backward sets ``torch.backends.cudnn.benchmark``: on the ROI heads' losses
    (off) and on the features they read (back on), it brackets their backward pass as
    :func:`_cudnn_benchmark_off` brackets their forward."""

    @staticmethod
    def forward(ctx, x, enabled):
        ctx.enabled = enabled
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        torch.backends.cudnn.benchmark = ctx.enabled
        return grad, None
