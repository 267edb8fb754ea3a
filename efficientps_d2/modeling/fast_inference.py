"""Every inference fast path of EfficientPS, in one place.

What ``EfficientPS.inference`` runs is an :class:`InferenceNetwork`: a :class:`DenseNetwork`
(backbone + 2-way FPN + semantic head layers + RPN head convs: everything whose shapes depend only
on the padded input size) and the ROI heads' box and mask heads. Built by
:func:`build_inference_network` from the model and its :class:`InferenceOptions`
(MODEL.EFFICIENTPS.FAST_INFERENCE, INFERENCE_DTYPE, CUDA_GRAPH, COMPILE), it is either the
model's own modules (all options off) or a cached copy of them that is

- fused: BatchNorm folded into the convs and conv + LeakyReLU fused (:func:`fuse_for_inference`);
- cast: the dense network's weights in bfloat16 / float16, with its outputs in float32;
- graphed: the dense network replayed as a CUDA graph captured once per padded input size that
  comes again (:class:`SizeLRUCache`), on CUDA only; with CUDA_GRAPH_ROI_HEADS the box and mask
  heads too, at fixed row counts (:class:`FixedShapeRoiHeads`);
- compiled: the dense network through ``torch.compile``.

The dense network also decodes the RPN's proposals (the anchors of the model's anchor generator,
made on the device, and its box transform) and picks each level's pre-NMS top-k: their shapes too
depend only on the input size (and the top-k), and on a GPU these ~160 small operators would
otherwise each cost a kernel launch from Python. The RPN's NMS and the ROI heads' pooling, box
predictor and NMS always run from the model itself, and every setting is read from the model at
each call, so changing e.g. ``roi_heads.box_predictor.test_score_thresh`` takes effect with or
without a fast path: through :func:`rpn_proposals`, :func:`pool_rois`, :func:`box_detections` and
:func:`batched_nms`, which give Detectron2's results bit for bit in fewer operator calls and host
waits (on a GPU each call costs host time, and each read waits for the device). They run on
every device; the CUDA graph and compile options are for a GPU.
"""

import collections
import copy
import dataclasses
import functools
import logging
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import torchvision
from detectron2.layers import FrozenBatchNorm2d, cat
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead, mask_rcnn_inference
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.torch_version import TorchVersion
from torchvision.ops import batched_nms as torchvision_batched_nms
from torchvision.ops import nms

from .inplace_abn import InPlaceABN
from .instance_head import SeparableConvMaskHead
from .layers import sequential_neighbours

__all__ = [
    "ConvLeakyReLU",
    "DenseNetwork",
    "FixedShapeRoiHeads",
    "InferenceNetwork",
    "InferenceOptions",
    "SizeLRUCache",
    "batched_nms",
    "box_detections",
    "box_scores",
    "build_inference_network",
    "clip_boxes_",
    "detect_boxes",
    "detect_masks",
    "fold_batch_norms",
    "fuse_conv_leaky_relu",
    "fuse_for_inference",
    "pool_rois",
    "pool_rois_fixed",
    "rpn_proposals",
    "select_detections",
    "top_anchors",
]

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------------------
# Inference fast path: BatchNorm folded into the preceding conv, conv + LeakyReLU fused.
# -------------------------------------------------------------------------------------------------

# oneDNN's fused "conv + unary op" kernel (the one Inductor emits on CPU); absent in some builds.
_FUSED_CONV_OP = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


class ConvLeakyReLU(nn.Module):
    """Inference-only ``leaky_relu(conv(x))``, one fused oneDNN kernel on CPU for float32.

    Elsewhere (GPU, other dtypes, autograd, empty inputs, and under ``torch.jit.trace``, which
    cannot record the kernel's optional-scalar list: Detectron2's ``FlopCountAnalysis`` traces
    the model) it runs the conv and the activation one after the other. Built by
    :func:`fuse_conv_leaky_relu`; the conv must have no norm/activation.
    """

    def __init__(self, conv: nn.Conv2d, negative_slope: float):
        super().__init__()
        if not _is_plain_conv(conv):
            raise ValueError("ConvLeakyReLU needs a conv without its own norm or activation.")
        if not _zero_padded(conv):
            raise ValueError("ConvLeakyReLU supports numeric zero padding only.")
        self.conv = conv
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        conv = self.conv
        if (
            _FUSED_CONV_OP is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
            and not torch.jit.is_tracing()
        ):
            return _FUSED_CONV_OP(
                x,
                conv.weight,
                conv.bias,
                list(conv.padding),
                list(conv.stride),
                list(conv.dilation),
                conv.groups,
                "leaky_relu",
                [self.negative_slope],
                "",
            )
        return F.leaky_relu(conv(x), self.negative_slope, inplace=True)


def _zero_padded(conv: nn.Conv2d) -> bool:
    """Whether the fused kernel pads as ``conv`` does (numeric zero padding; not "same",
    reflect, replicate or circular)."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _is_foldable_norm(module) -> bool:
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return (
        isinstance(module, _BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


@torch.no_grad()
def _fold_norm_into_conv(conv: nn.Conv2d, norm) -> None:
    """conv <- norm(conv(.)) with the norm's running statistics (its inference behaviour).

    What torch's ``fuse_conv_bn_weights`` computes, but in float64 and into a weight of the conv's
    own memory format: folded in float32, near-tie pixels of the panoptic map flip.
    """
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_mean)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    scale = weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    conv_bias = conv.bias.double() if conv.bias is not None else 0.0
    new_bias = (conv_bias - norm.running_mean.double()) * scale + bias.double()
    new_weight = torch.empty_like(conv.weight)  # keeps the weight's memory format
    new_weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
    conv.weight = nn.Parameter(new_weight, requires_grad=False)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


def _is_plain_conv(module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and getattr(module, "norm", None) is None
        and getattr(module, "activation", None) is None
    )


def fold_batch_norms(module: nn.Module) -> int:
    """Folds, in place, every BatchNorm that directly follows a conv into that conv.

    Handles Detectron2's ``Conv2d(norm=...)`` (BN, SyncBN, FrozenBN, InPlaceABN, whose LeakyReLU
    stays after the conv; GN cannot be folded) and ``[Conv2d, BatchNorm2d, ...]`` runs in
    ``nn.Sequential`` (torchvision's ``Conv2dNormActivation``, EfficientNet's blocks). The folded
    conv computes the norm's inference-mode output (running statistics), so the module is for
    inference only afterwards.

    Returns:
        the number of norms folded.
    """
    count = 0
    for conv in list(module.modules()):
        if isinstance(conv, nn.Conv2d) and _is_foldable_norm(getattr(conv, "norm", None)):
            norm = conv.norm
            _fold_norm_into_conv(conv, norm)
            conv.norm = None
            if isinstance(norm, InPlaceABN):  # its activation outlives it
                conv.activation = _activation_of(norm)
            count += 1
    for parent, previous, name in sequential_neighbours(module):
        conv, norm = parent._modules[previous], parent._modules[name]
        if _is_plain_conv(conv) and _is_foldable_norm(norm):
            _fold_norm_into_conv(conv, norm)
            parent._modules[name] = _activation_of(norm)
            count += 1
    return count


def _activation_of(norm) -> nn.Module:
    """What remains of a norm folded into its conv: InPlaceABN's LeakyReLU, or nothing."""
    if isinstance(norm, InPlaceABN):
        return nn.LeakyReLU(norm.negative_slope, inplace=True)
    return nn.Identity()


def fuse_conv_leaky_relu(module: nn.Module) -> int:
    """Replaces, in place, each conv directly followed by a LeakyReLU with a :class:`ConvLeakyReLU`.

    Handles Detectron2's ``Conv2d(activation=nn.LeakyReLU)`` without norm (fold the norms first)
    and ``[Conv2d, (Identity ...,) LeakyReLU]`` runs in ``nn.Sequential``. Convs padded otherwise
    than with numbers of zeros ("same", reflect, ...) stay unfused.

    Returns:
        the number of convs fused.
    """
    count = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if not isinstance(child, nn.Conv2d) or not _zero_padded(child):
                continue
            if getattr(child, "norm", None) is None and isinstance(
                getattr(child, "activation", None), nn.LeakyReLU
            ):
                slope = child.activation.negative_slope
                child.activation = None
                parent._modules[name] = ConvLeakyReLU(child, slope)
                count += 1
            elif isinstance(parent, nn.Sequential) and _is_plain_conv(child):
                j = i + 1
                while j < len(names) and isinstance(parent._modules[names[j]], nn.Identity):
                    j += 1
                if j < len(names) and isinstance(parent._modules[names[j]], nn.LeakyReLU):
                    slope = parent._modules[names[j]].negative_slope
                    parent._modules[name] = ConvLeakyReLU(child, slope)
                    parent._modules[names[j]] = nn.Identity()
                    count += 1
    return count


@torch.no_grad()
def fuse_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """Turns ``model`` (in place) into a faster, inference-only equivalent, and returns it.

    BatchNorms are folded into their convs (:func:`fold_batch_norms`), conv + LeakyReLU pairs
    fused (:func:`fuse_conv_leaky_relu`), weights made channels-last (``channels_last``), gradients
    turned off and the model put in eval mode. Outputs equal the original's in eval mode within
    float rounding. Works on any Detectron2 model (Panoptic FPN's FrozenBN convs fold too); the
    BatchNorms are gone afterwards, so do not train the result.
    """
    model.eval()
    fold_batch_norms(model)
    fuse_conv_leaky_relu(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.requires_grad_(False)
    return model


# -------------------------------------------------------------------------------------------------
# The dense network and the ways of running it.
# -------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DenseNetwork(nn.Module):
    """Backbone + 2-way FPN + semantic head layers + RPN head convs and proposal decoding: the part
    of EfficientPS whose work depends only on the padded input size, so it can be captured as a
    CUDA graph or compiled.

    ``forward(images)``:
        images: (N, 3, H, W) normalised images, H and W multiples of the backbone's
            ``size_divisibility`` (an ``ImageList.tensor``); any float dtype (cast to the weights').
    Returns a tuple, every tensor float32 whatever the weights' dtype:
        features: {name: (N, C, H / stride, W / stride)} the backbone's outputs ("p2" ... "p5"),
            contiguous NCHW (what ROIAlign reads);
        sem_seg_logits: (N, num_classes, H, W) semantic logits at the padded input size;
        objectness: [(N, K_l)] one per RPN level (the RPN's in_features, in order): the top
            K_l = min(H_l * W_l * A, pre-NMS top-k) objectness logits of each image, highest
            first, as ``find_top_rpn_proposals`` picks them from those ``RPN.forward`` flattens;
        proposals: [(N, K_l, 4)] their anchors' boxes, decoded as ``RPN.predict_proposals``
            decodes them; what :func:`rpn_proposals` takes.
    The RPN's pre-NMS top-k (MODEL.RPN.PRE_NMS_TOPK_TEST) is read at each call.
    """

    def __init__(self, backbone, sem_seg_head, rpn_head, rpn: RPN):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.rpn_head = rpn_head
        self.rpn_in_features = list(rpn.in_features)
        # The model's own (float32 buffers, never cast); their anchors depend on the sizes only.
        self.anchor_generator = rpn.anchor_generator
        self.decode_proposals = rpn._decode_proposals
        object.__setattr__(self, "_rpn", rpn)  # for its settings; not a submodule of this copy

    @property
    def pre_nms_topk(self) -> int:
        """The RPN's pre-NMS top-k per level, as ``RPN.forward`` reads it now."""
        return self._rpn.pre_nms_topk[self._rpn.training]

    @property
    def dtype(self):
        return next(self.backbone.parameters()).dtype

    def forward(self, images: torch.Tensor):
        features = self.backbone(images.to(self.dtype))
        # The semantic head's forward in eval mode, with the stride-4 logits upsampled in float32.
        sem_seg_logits = self.sem_seg_head.upsample(self.sem_seg_head.layers(features).float())
        rpn_features = [features[f] for f in self.rpn_in_features]
        objectness, deltas = self.rpn_head(rpn_features)
        # RPN.forward's reshapes, then its decoding in float32.
        box_dim = self.anchor_generator.box_dim
        objectness = [x.float().permute(0, 2, 3, 1).flatten(1) for x in objectness]
        deltas = [
            x.float()
            .view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
            .permute(0, 3, 4, 1, 2)
            .flatten(1, -2)
            for x in deltas
        ]
        proposals = self.decode_proposals(self.anchors(rpn_features), deltas)
        # Each level's top-k, whose shapes too are fixed (on a GPU, some 12 launches fewer from
        # Python when graphed or compiled).
        objectness, proposals = top_anchors(objectness, proposals, self.pre_nms_topk)
        features = {k: v.float().contiguous() for k, v in features.items()}
        return features, sem_seg_logits, objectness, proposals

    def anchors(self, feature_maps: List[torch.Tensor]) -> List[Boxes]:
        """The anchor generator's anchors. Those of Detectron2's ``DefaultAnchorGenerator`` (same
        values, same order) are made here on the feature maps' device: the generator makes its
        grids on the CPU and copies them over, on a GPU a copy that waits for the device, which a
        CUDA graph capture refuses (and a torch.compile graph cannot hold a device context)."""
        generator = self.anchor_generator
        if type(generator) is not DefaultAnchorGenerator:
            return generator(feature_maps)  # its own; to be graphed, made on the device
        anchors = []
        for x, stride, cell_anchors in zip(feature_maps, generator.strides, generator.cell_anchors):
            start = generator.offset * stride
            grid = [
                torch.arange(start, n * stride, step=stride, dtype=torch.float32, device=x.device)
                for n in x.shape[-2:]
            ]
            shift_y, shift_x = torch.meshgrid(grid, indexing="ij")
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).view(-1, 1, 4)
            anchors.append(Boxes((shifts + cell_anchors.view(1, -1, 4)).view(-1, 4)))
        return anchors


class SizeLRUCache:
    """At most ``capacity`` values, one per key, each built by ``build(key, *args)`` once the key
    has been asked for ``build_after`` times; the least recently used one is dropped to make room.
    Holds the CUDA graphs, one per padded input size, so that a graph (whose capture costs a few
    runs and keeps its memory) is made only for sizes that come again.

    Once as many values have been dropped as the cache holds, the inputs come in more sizes than
    it can keep, and each capture would soon be dropped again instead of saving time: from then
    on no new value is built (the sizes cached then keep theirs). That is logged once, as a
    warning naming the remedies.
    """

    def __init__(self, capacity: int, build: Callable, *, build_after: int = 2):
        if capacity < 1:
            raise ValueError(
                f"MODEL.EFFICIENTPS.CUDA_GRAPH_CACHE_SIZE must be at least 1, got {capacity}."
            )
        self.capacity = capacity
        self.build = build
        self.build_after = build_after
        self._values = collections.OrderedDict()
        self._asked = collections.Counter()  # keys not built yet: how often each was asked for
        self.evictions = 0

    def get(self, key, *args):
        """The value for ``key``; None where it is not built (asked for too few times yet, or
        after the cache has dropped ``capacity`` values)."""
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        if self.evictions >= self.capacity:
            return None
        self._asked[key] += 1
        if self._asked[key] < self.build_after:
            return None
        del self._asked[key]
        while len(self._values) >= self.capacity:
            self._values.popitem(last=False)  # free the old graph before capturing a new one
            self.evictions += 1
            if self.evictions == self.capacity:
                logger.warning(
                    "CUDA graphs have been captured for more input sizes than "
                    "MODEL.EFFICIENTPS.CUDA_GRAPH_CACHE_SIZE (%d) keeps, now %s: no other "
                    "size will be captured (they run without a graph), as each would soon be "
                    "dropped again. Raise the cache size, resize the inputs to a few fixed "
                    "sizes, or set MODEL.EFFICIENTPS.CUDA_GRAPH False.",
                    self.capacity,
                    key,
                )
        value = self.build(key, *args)
        self._values[key] = value
        return value

    def keys(self):
        """Cached keys, least recently used first."""
        return list(self._values)

    def __len__(self):
        return len(self._values)


class _CapturedGraph:
    """``fn`` captured as one CUDA graph for inputs of the shapes and dtypes of ``examples``:
    copy the inputs in, replay, read the outputs (static tensors, overwritten by the next
    replay). ``fn`` must not read the device from the host (no ``.item()``, ``nonzero``, ...)."""

    WARMUP_RUNS = 2

    def __init__(self, fn: Callable, *examples: torch.Tensor, pool=None):
        self.static_inputs = [x.clone() for x in examples]
        device = examples[0].device
        # Warm up (cuDNN autotuning, lazy initialisation) on the stream that captures, as the
        # CUDA-graph docs require, then capture.
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP_RUNS):
                fn(*self.static_inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.static_output


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How inference runs; see the MODEL.EFFICIENTPS keys of the same names in config.py."""

    fast_inference: bool = True
    dtype: str = "float32"
    cuda_graph: bool = False
    cuda_graph_cache_size: int = 4
    cuda_graph_roi_heads: bool = False
    compile: bool = False
    compile_mode: str = "default"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"MODEL.EFFICIENTPS.INFERENCE_DTYPE must be one of {sorted(_DTYPES)}, "
                f"got {self.dtype!r}."
            )
        if self.cuda_graph_cache_size < 1:
            raise ValueError(
                "MODEL.EFFICIENTPS.CUDA_GRAPH_CACHE_SIZE must be at least 1, got "
                f"{self.cuda_graph_cache_size}."
            )
        if self.compile:
            # Checked here, as torch.compile checks it only at the first call (first inference).
            import torch._inductor  # what torch.compile imports anyway

            modes = torch._inductor.list_mode_options(None)
            if self.compile_mode not in modes:
                raise ValueError(
                    f"MODEL.EFFICIENTPS.COMPILE_MODE must be one of torch.compile's modes "
                    f"{sorted(modes)}, got {self.compile_mode!r}."
                )
        if self.cuda_graph_roi_heads and not self.cuda_graph:
            raise ValueError(
                "MODEL.EFFICIENTPS.CUDA_GRAPH_ROI_HEADS graphs the ROI heads along with the dense "
                "network: it needs MODEL.EFFICIENTPS.CUDA_GRAPH True."
            )
        if self.cuda_graph and self.compile:
            raise ValueError(
                "MODEL.EFFICIENTPS.CUDA_GRAPH and MODEL.EFFICIENTPS.COMPILE are both on: choose "
                "one (MODEL.EFFICIENTPS.COMPILE_MODE 'reduce-overhead' gives a compiled network "
                "replayed as CUDA graphs)."
            )

    @staticmethod
    def config_kwargs(cfg):
        """EfficientPS's keyword arguments for these options, from MODEL.EFFICIENTPS."""
        node = cfg.MODEL.EFFICIENTPS
        return {
            "fast_inference": node.FAST_INFERENCE,
            "inference_dtype": node.INFERENCE_DTYPE,
            "cuda_graph": node.CUDA_GRAPH,
            "cuda_graph_cache_size": node.CUDA_GRAPH_CACHE_SIZE,
            "cuda_graph_roi_heads": node.CUDA_GRAPH_ROI_HEADS,
            "compile": node.COMPILE,
            "compile_mode": node.COMPILE_MODE,
        }

    def needs_copy(self, device: torch.device) -> bool:
        """Whether inference runs a copy of the model's modules rather than the modules."""
        graph = self.cuda_graph and device.type == "cuda"
        return self.fast_inference or self.dtype != "float32" or graph or self.compile


def _capture(dense: nn.Module, roi_heads, key, images: torch.Tensor) -> _CapturedGraph:
    """The dense network captured for ``images``, and (``roi_heads``: (box head, mask head), or
    None) a :class:`FixedShapeRoiHeads` that captures the ROI heads on its outputs."""
    logger.info("Capturing the dense network as a CUDA graph for input %s.", key)
    captured = _CapturedGraph(dense, images)
    # The graphs of the ROI heads read its outputs (static tensors): they live and die with it.
    # They take their memory from its pool: always replayed after it, on its outputs (never
    # freed), their own outputs read before the next replay of any of them.
    captured.roi_heads = None
    if roi_heads is not None:
        capture = functools.partial(_CapturedGraph, pool=captured.graph.pool())
        captured.roi_heads = FixedShapeRoiHeads(*roi_heads, dense._rpn, capture=capture)
    return captured


class InferenceNetwork:
    """What ``EfficientPS.inference`` runs: :meth:`dense` then :meth:`detect`.

    Not an ``nn.Module`` of the model (no state_dict entries): either the model's own modules or a
    copy of them made by :func:`build_inference_network`.
    """

    def __init__(
        self,
        dense: DenseNetwork,
        box_head: nn.Module,
        mask_head: nn.Module,
        *,
        cuda_graph: bool = False,
        cuda_graph_cache_size: int = 4,
        cuda_graph_roi_heads: bool = False,
        compiled: Optional[Callable] = None,
        compiled_replays_graphs: bool = False,
    ):
        self.dense_network = dense
        self.box_head = box_head
        self.mask_head = mask_head
        self.cuda_graph = cuda_graph
        self.compiled = compiled
        # torch.compile modes that replay CUDA graphs (reduce-overhead, max-autotune) return, on
        # CUDA, outputs in a pool that the next call overwrites, as a captured graph does.
        self.compiled_replays_graphs = compiled_replays_graphs
        # Built from the dense network alone: a bound method of self would make a reference cycle,
        # and a dropped copy (new weights, train()) would keep its weights and its graphs' memory
        # pools until Python's cycle collector happened to run.
        roi_heads = (box_head, mask_head) if cuda_graph_roi_heads else None
        self.graphs = SizeLRUCache(
            cuda_graph_cache_size, functools.partial(_capture, dense, roi_heads)
        )
        # The graph that made the last dense outputs (its ROI heads graphed on them), or None.
        self._last_graph = None

    def modules(self):
        """Every module it runs (dense network, box head, mask head)."""
        for part in (self.dense_network, self.box_head, self.mask_head):
            yield from part.modules()

    def parameters(self):
        for module in self.modules():
            yield from module.parameters(recurse=False)

    def dense(self, images: torch.Tensor):
        """The dense network's outputs (see :class:`DenseNetwork`) for ``images``: replayed as a
        CUDA graph (on CUDA, with ``cuda_graph``, from the second time a size comes), compiled,
        or eager. A graph's outputs are static, valid until the next call, except the semantic
        logits, which are a fresh copy: they reach the caller (as "sem_seg", a view of them), who
        may keep them past the next image. The same holds for a compiled network whose mode
        replays CUDA graphs."""
        if self.cuda_graph:  # on CUDA only (build_inference_network)
            # A graph replays the kernels it captured: one captured under autocast is another.
            autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
            key = (
                tuple(images.shape),
                images.dtype,
                images.device,
                autocast,
                self.dense_network.pre_nms_topk,
            )
            self._last_graph = None  # an evicted graph is freed before a new one is captured
            self._last_graph = self.graphs.get(key, images)
            if self._last_graph is not None:  # else a size seen once, or one too many: eager
                features, sem_seg_logits, objectness, deltas = self._last_graph(images)
                return features, sem_seg_logits.clone(), objectness, deltas
        if self.compiled is not None:
            features, sem_seg_logits, objectness, deltas = self.compiled(images)
            if self.compiled_replays_graphs:  # a needless but cheap copy where nothing is graphed
                sem_seg_logits = sem_seg_logits.clone()
            return features, sem_seg_logits, objectness, deltas
        return self.dense_network(images)

    def detect(
        self,
        roi_heads: StandardROIHeads,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
    ) -> List[Instances]:
        """``roi_heads``' inference (Detectron2's ``StandardROIHeads._forward_box`` then
        ``forward_with_given_boxes``) with this network's box and mask heads in place of its own:
        the same detections, bit for bit, from the ROI heads' own poolers (on the CPU on two
        threads: ``threaded_roi_align``), box predictor and NMS, run with fewer operator calls
        and host waits by :func:`pool_rois` and :func:`box_detections`. On the outputs of a
        dense network graphed with CUDA_GRAPH_ROI_HEADS, the heads are replayed as CUDA graphs
        too (:class:`FixedShapeRoiHeads`: the same detections up to float rounding)."""
        graph = self._last_graph
        if graph is not None and graph.roi_heads is not None and features is graph.static_output[0]:
            detections = graph.roi_heads.detect(roi_heads, features, proposals)
            if detections is not None:
                return detections
        instances = detect_boxes(self.box_head, roi_heads, features, proposals)
        return detect_masks(self.mask_head, roi_heads, features, instances)


def detect_boxes(box_head, roi_heads: StandardROIHeads, features, proposals: List[Instances]):
    """``roi_heads``' box detections (``StandardROIHeads._forward_box`` in inference) with
    ``box_head`` in place of its own."""
    in_features = [features[f] for f in roi_heads.box_in_features]
    box_lists = [x.proposal_boxes for x in proposals]
    box_features = pool_rois(roi_heads.box_pooler, in_features, box_lists)
    predictions = roi_heads.box_predictor(box_head(box_features))
    del box_features
    return box_detections(roi_heads.box_predictor, predictions, proposals)


def detect_masks(mask_head, roi_heads: StandardROIHeads, features, instances: List[Instances]):
    """``roi_heads``' masks of ``instances`` (``StandardROIHeads._forward_mask`` in inference)
    with ``mask_head`` in place of its own."""
    if roi_heads.mask_pooler is not None:
        in_features = [features[f] for f in roi_heads.mask_in_features]
        box_lists = [x.pred_boxes for x in instances]
        mask_features = pool_rois(roi_heads.mask_pooler, in_features, box_lists)
    else:
        mask_features = {f: features[f] for f in roi_heads.mask_in_features}
    return mask_head(mask_features, instances)


class FixedShapeRoiHeads:
    """:meth:`InferenceNetwork.detect` at fixed row counts, so that its two stages can each be
    replayed as a CUDA graph (MODEL.EFFICIENTPS.CUDA_GRAPH_ROI_HEADS): every image's proposals
    padded to the RPN's post-NMS top-k (MODEL.RPN.POST_NMS_TOPK_TEST) and its detections to the
    box predictor's top-k (TEST.DETECTIONS_PER_IMAGE) with empty boxes,

    - the box stage: ROI pooling (:func:`pool_rois_fixed`), box head, box predictor and
      :func:`box_scores`;
    - the mask stage: ROI pooling and the mask head's ``layers``;

    and between them, from the host, what has data-dependent sizes, on each image's real rows:
    the score threshold, NMS and top-k (:func:`select_detections`), then the masks' labelling.
    On a GPU this replaces some 100 operator calls from Python, and the kernel choices for each
    new row count, by two graph replays; the padded rows cost GPU time (the empty boxes are
    cheap to pool). The detections are those of :meth:`InferenceNetwork.detect` up to float
    rounding: a product over more rows may take another kernel, which may round otherwise.

    ``capture(fn, *examples)`` gives what runs ``fn`` for inputs shaped as ``examples``: a
    :class:`_CapturedGraph`, or (in tests, on the CPU) ``fn`` itself. Each is captured once per
    row count; what a graph reads of the model (weights, pooler settings, ``scale_clamp``) is
    fixed when it is captured, while thresholds and top-k are read at each call.
    """

    def __init__(self, box_head: nn.Module, mask_head: nn.Module, rpn: RPN, *, capture: Callable):
        self.box_head = box_head
        self.mask_head = mask_head
        self.rpn = rpn
        self.capture = capture
        self._graphs = {}

    def detect(self, roi_heads: StandardROIHeads, features, proposals: List[Instances]):
        """``InferenceNetwork.detect(roi_heads, features, proposals)``; None where the box
        predictor or pooler is not Detectron2's (or there are more proposals than the top-k),
        which the caller then runs as they are."""
        predictor = roi_heads.box_predictor
        rows = self.rpn.post_nms_topk[self.rpn.training]
        counts = [len(p) for p in proposals]
        if (
            type(predictor) is not FastRCNNOutputLayers
            or type(roi_heads.box_pooler) is not ROIPooler
            or max(counts) > rows
        ):
            return None
        rois = _padded_rois([p.proposal_boxes.tensor for p in proposals], rows)
        in_features = [features[f] for f in roi_heads.box_in_features]
        stage = functools.partial(
            _box_stage, self.box_head, roi_heads.box_pooler, predictor, in_features
        )
        boxes, probs, valid = self._graph(("boxes", len(rois)), stage, rois)(rois)
        keep = _kept(predictor, probs, valid)  # the threshold as it is now, not when captured
        instances = select_detections(
            predictor,
            [p.image_size for p in proposals],
            *[_unpadded(x, counts, rows) for x in (boxes, probs, keep)],
        )
        return self._masks(roi_heads, features, instances)

    def _masks(self, roi_heads: StandardROIHeads, features, instances: List[Instances]):
        rows = roi_heads.box_predictor.test_topk_per_image
        counts = [len(i) for i in instances]
        label = _mask_labeller(self.mask_head)
        if (
            label is None
            or type(roi_heads.mask_pooler) is not ROIPooler
            or rows < 1  # no top-k: any number of detections
            or sum(counts) == 0
        ):
            return detect_masks(self.mask_head, roi_heads, features, instances)
        rois = _padded_rois([i.pred_boxes.tensor for i in instances], rows)
        in_features = [features[f] for f in roi_heads.mask_in_features]
        stage = functools.partial(_mask_stage, self.mask_head, roi_heads.mask_pooler, in_features)
        logits = self._graph(("masks", len(rois)), stage, rois)(rois)
        # A copy (torch.cat copies even one tensor): the instances may keep the logits, which the
        # graph's next replay would overwrite.
        label(torch.cat(_unpadded(logits, counts, rows)), instances)
        return instances

    def _graph(self, key, fn: Callable, *examples: torch.Tensor):
        if key not in self._graphs:
            logger.info("Capturing the ROI heads' %s stage as a CUDA graph for %d rows.", *key)
            self._graphs[key] = self.capture(fn, *examples)
        return self._graphs[key]


def _padded_rois(boxes: List[torch.Tensor], rows: int) -> torch.Tensor:
    """(N * rows, 5) ROIs (batch index, x0, y0, x1, y1) of N images' (R_n, 4) boxes, each image's
    padded to ``rows`` with empty boxes at (0, 0)."""
    rois = boxes[0].new_zeros(len(boxes), rows, 5)
    for n, image_boxes in enumerate(boxes):
        if n:
            rois[n, :, 0] = n
        rois[n, : len(image_boxes), 1:] = image_boxes
    return rois.view(-1, 5)


def _unpadded(x: torch.Tensor, counts: List[int], rows: int) -> List[torch.Tensor]:
    """Each image's real rows of ``x``, whose rows are N images' padded to ``rows`` each."""
    return [x[n * rows : n * rows + count] for n, count in enumerate(counts)]


def _box_stage(box_head, pooler, predictor, features, rois):
    pooled = pool_rois_fixed(pooler, features, rois)
    return box_scores(predictor, predictor(box_head(pooled)), rois[:, 1:])


def _mask_stage(mask_head, pooler, features, rois):
    return mask_head.layers(pool_rois_fixed(pooler, features, rois))


def _mask_labeller(mask_head) -> Optional[Callable]:
    """What sets the masks of instances from ``mask_head.layers``' logits, as its ``forward``
    does in inference: the project's head's ``label_instances``, Detectron2's
    ``mask_rcnn_inference`` for heads that keep ``BaseMaskRCNNHead.forward``; None for a head
    with another ``forward``."""
    forward = type(mask_head).forward
    if forward is SeparableConvMaskHead.forward:
        return mask_head.label_instances
    if forward is BaseMaskRCNNHead.forward:
        return mask_rcnn_inference
    return None


def rpn_proposals(
    rpn: RPN,
    images: ImageList,
    objectness: List[torch.Tensor],
    proposals: List[torch.Tensor],
) -> List[Instances]:
    """Detectron2's ``RPN.forward`` in inference, from each level's top-k objectness logits and
    boxes that the dense network picks (:func:`top_anchors`), with the RPN's settings: the
    results of Detectron2's ``find_top_rpn_proposals``, bit for bit, in fewer operator calls and
    host waits.

    Detectron2's function (B5 at 512x1024 on the CPU: 101 operator calls, 3 host waits before the
    NMS) makes its level ids with a ``full`` and gathers its top-k with a gather per level, and per
    image reads the device three times (non-finite boxes? non-finite after filtering? any box
    too small?) before the NMS, clips in nine operators and indexes with boolean masks. Here the
    top-k boxes of all images are clipped in place and filtered with one mask, read once per
    image; the per-image NMS is torchvision's ``batched_nms`` (:func:`batched_nms`: without its
    host wait on a GPU), as in Detectron2 (one NMS per image: shifting each image's boxes apart,
    as ``batched_nms`` shifts the levels', would round them otherwise). Traced
    (``torch.jit.trace``) and in training it is Detectron2's function (whose top-k of the
    top-k'd levels keeps them all).
    """
    pre_nms_topk = rpn.pre_nms_topk[rpn.training]
    post_nms_topk = rpn.post_nms_topk[rpn.training]
    if rpn.training or torch.jit.is_tracing():
        return find_top_rpn_proposals(
            proposals,
            objectness,
            images.image_sizes,
            rpn.nms_thresh,
            pre_nms_topk,
            post_nms_topk,
            rpn.min_box_size,
            rpn.training,
        )
    # 1. Each level's top-k anchors (picked by the dense network), levels concatenated.
    scores = torch.cat(objectness, dim=1)
    boxes = torch.cat(proposals, dim=1)
    levels = _level_ids(tuple(x.shape[1] for x in objectness), boxes.device)
    # 2. What Detectron2 drops: boxes or scores not finite, and boxes (once clipped to their
    # image) no larger than MIN_SIZE. Clipped in place, as Boxes.clip clamps: x to [0, width],
    # y to [0, height] (a non-finite box, dropped, is clamped too, where Boxes.clip would fail).
    keep = torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
    clip_boxes_(boxes, images.image_sizes)
    keep &= (boxes[..., 2:] - boxes[..., :2] > rpn.min_box_size).all(dim=2)
    # 3. Per image: the boxes kept (one host read), torchvision's batched NMS across levels, the
    # post_nms_topk best.
    results = []
    for image_size, keep_n, boxes_n, scores_n in zip(
        images.image_sizes, keep.unbind(0), boxes.unbind(0), scores.unbind(0)
    ):
        (kept,) = keep_n.nonzero(as_tuple=True)
        boxes_n, scores_n = boxes_n[kept], scores_n[kept]
        best = batched_nms(boxes_n, scores_n, levels[kept], rpn.nms_thresh)[:post_nms_topk]
        result = Instances(image_size)
        result.proposal_boxes = Boxes(boxes_n[best])
        result.objectness_logits = scores_n[best]
        results.append(result)
    return results


def top_anchors(objectness: List[torch.Tensor], proposals: List[torch.Tensor], k: int):
    """Step 1 of Detectron2's ``find_top_rpn_proposals``: each level's ``min(anchors, k)``
    highest objectness logits of each image (N, K_l), highest first, and their boxes
    (N, K_l, 4), from (N, anchors) logits and (N, anchors, 4) boxes per level."""
    batch = torch.arange(len(objectness[0]), device=objectness[0].device)[:, None]
    top_scores, top_boxes = [], []
    for logits, boxes in zip(objectness, proposals):
        scores, index = logits.topk(min(logits.shape[1], k), dim=1)
        top_scores.append(scores)
        top_boxes.append(boxes[batch, index])
    return top_scores, top_boxes


@functools.lru_cache(maxsize=16)
def _level_ids(counts, device: torch.device) -> torch.Tensor:
    """[0] * counts[0] + [1] * counts[1] + ... as an int64 tensor on ``device``, made once per
    input size (on a GPU, one launch per level otherwise). An ordinary tensor, even when first
    asked for under inference mode, as it is read outside it too."""
    with torch.inference_mode(False):
        return torch.cat(
            [
                torch.full((count,), level, dtype=torch.int64, device=device)
                for level, count in enumerate(counts)
            ]
        )


def clip_boxes_(boxes: torch.Tensor, image_sizes) -> None:
    """Clips, in place, (N, R, 4) boxes (x0, y0, x1, y1) of N images to their (height, width),
    or the (R, 4) boxes of one image to its one size: Detectron2's ``Boxes.clip`` (x clamped to
    [0, width], y to [0, height]) in four operator calls (per image where the sizes differ)
    instead of ten per image, and without its host read for finiteness."""
    if len({tuple(size) for size in image_sizes}) <= 1:
        parts = [(boxes, image_sizes[0])]
    else:
        parts = list(zip(boxes, image_sizes))
    for part, (height, width) in parts:
        part[..., 0::2].clamp_(min=0, max=width)
        part[..., 1::2].clamp_(min=0, max=height)


# torchvision runs its batched NMS on a GPU as one NMS of boxes shifted apart per class up to this
# many box coordinates (0.22 raised it from 20,000), as one NMS per class above; above it here,
# torchvision's own function runs. The benchmark's detections (1000 boxes x 8 classes) need 0.22's.
_GPU_SHIFTED_NMS_MAX_NUMEL = 100_000 if TorchVersion(torchvision.__version__) >= (0, 22) else 20_000


def batched_nms(boxes, scores, idxs, iou_threshold: float, *, device_type: Optional[str] = None):
    """torchvision's ``batched_nms``, bit for bit, without its host wait on a GPU.

    On a GPU torchvision shifts each class's boxes by ``class * (max coordinate + 1)`` and runs
    one NMS; it makes that 1 as ``torch.tensor(1).to(boxes)``, a host-to-device copy that waits
    for the device (one more host wait per NMS, two per image). Here the 1 is a number: the same
    float32 addition, so the same shifted boxes. On the CPU (``device_type``, by default the
    boxes' device type), above torchvision's size for it, and traced, it is torchvision's own.
    """
    device_type = device_type or boxes.device.type
    if device_type == "cpu" or boxes.numel() > _GPU_SHIFTED_NMS_MAX_NUMEL or torch.jit.is_tracing():
        return torchvision_batched_nms(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def pool_rois(pooler: nn.Module, features: List[torch.Tensor], box_lists: List[Boxes]):
    """``pooler(features, box_lists)`` for Detectron2's ``ROIPooler``: the same rows, bit for
    bit, in fewer operator calls and one host read instead of one per level.

    Detectron2's pooler (B5 at 512x1024, 4 levels: 42 operator calls besides the ROIAligns; here
    23) picks each level's boxes with a mask and ``nonzero`` (a host wait each on a GPU) and
    copies its sizes to the device. Here the boxes are sorted by level (stably: each level's
    boxes in the order Detectron2 pools them, so ``ThreadedROIAlign`` splits them as it would),
    the level bounds read once, each level pooled from its slice and the rows put back in the
    boxes' order. The level of a box is Detectron2's ``assign_boxes_to_levels`` formula, op for
    op. Other poolers, a single level, no boxes and tracing run ``pooler`` itself.
    """
    count = sum(len(boxes) for boxes in box_lists)
    if (
        type(pooler) is not ROIPooler
        or len(pooler.level_poolers) == 1
        or count == 0
        or not all(type(boxes) is Boxes for boxes in box_lists)
        or torch.jit.is_tracing()
    ):
        return pooler(features, box_lists)
    boxes = cat([b.tensor for b in box_lists])
    # (batch index, x0, y0, x1, y1) rows, as Detectron2's convert_boxes_to_pooler_format.
    index = cat(
        [
            torch.full((len(b), 1), n, dtype=boxes.dtype, device=boxes.device)
            for n, b in enumerate(box_lists)
        ]
    )
    rois = torch.cat([index, boxes], dim=1)
    levels, order = _box_levels(pooler, boxes).sort(stable=True)
    first = torch.arange(
        pooler.min_level, pooler.max_level + 2, dtype=levels.dtype, device=levels.device
    )
    bounds = torch.searchsorted(levels, first).tolist()  # the one host read
    parts = rois[order].split([end - start for start, end in zip(bounds[:-1], bounds[1:])])
    pooled = torch.cat(
        [
            level_pooler(x, part)
            for level_pooler, x, part in zip(pooler.level_poolers, features, parts)
            if len(part)
        ]
    )
    return torch.empty_like(pooled).index_copy_(0, order, pooled)


def _box_levels(pooler: ROIPooler, boxes: torch.Tensor) -> torch.Tensor:
    """The pyramid level (min_level ... max_level, as floats) that Detectron2's ``ROIPooler``
    pools each (R, 4) box from: Eqn. (1) of the FPN paper, as ``assign_boxes_to_levels``
    computes it, op for op (the area as Boxes.area: one rounding of width * height), kept in
    float: its values are whole numbers."""
    sizes = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).sqrt()
    return torch.floor(
        pooler.canonical_level + torch.log2(sizes / pooler.canonical_box_size + 1e-8)
    ).clamp(min=pooler.min_level, max=pooler.max_level)


def pool_rois_fixed(pooler: ROIPooler, features: List[torch.Tensor], rois: torch.Tensor):
    """``pooler``'s rows for (R, 5) ``rois`` (batch index, x0, y0, x1, y1), with no host read
    and shapes that depend on R alone, so that it can be captured in a CUDA graph: each level
    pools every row, those of other levels as an empty box (at most one sample per bin), and
    each row is taken from its own level's output. A box's row is pooled by the same
    level pooler from the same box as in :func:`pool_rois` (ROIAlign pools each box on its
    own), so the rows are the same."""
    if len(pooler.level_poolers) == 1:
        return pooler.level_poolers[0](features[0], rois)
    levels = _box_levels(pooler, rois[:, 1:])
    empty = torch.zeros_like(rois[:, 1:])
    pooled = None
    for level, (level_pooler, x) in enumerate(zip(pooler.level_poolers, features)):
        mine = levels == pooler.min_level + level
        part = level_pooler(
            x, torch.cat([rois[:, :1], torch.where(mine[:, None], rois[:, 1:], empty)], dim=1)
        )
        mine = mine.view(-1, *[1] * (part.dim() - 1))
        pooled = part if pooled is None else torch.where(mine, part, pooled, out=pooled)
    return pooled


def _decode_boxes(transform, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``transform.apply_deltas(deltas, boxes)`` as (R, B, 4) boxes, for (R, B * 4) deltas and
    (R, 4) boxes. Detectron2's ``Box2BoxTransform`` takes 45 operator calls (one column at a
    time); here the x and y columns go together (21 calls), each value computed by the same
    operations in the same order, so bit for bit the same. Other transforms, and weights that
    differ between x and y (or width and height), run ``apply_deltas`` itself."""
    # (Detectron2's Box2BoxTransformLinear, for one, has no weights.)
    weights = transform.weights if type(transform) is Box2BoxTransform else None
    if weights is None or weights[0] != weights[1] or weights[2] != weights[3]:
        return transform.apply_deltas(deltas, boxes).view(len(boxes), deltas.shape[1] // 4, 4)
    wx, _, ww, _ = weights
    if deltas.dtype != torch.float32:  # Detectron2 decodes in float32
        deltas = deltas.float()
    if boxes.dtype != deltas.dtype:
        boxes = boxes.to(deltas.dtype)
    deltas = deltas.view(len(deltas), deltas.shape[1] // 4, 4)  # -1 fails for no boxes
    corner = boxes[:, :2]
    size = boxes[:, 2:] - corner  # (width, height)
    center = corner + 0.5 * size
    shift = deltas[..., :2] / wx
    scale = torch.clamp(deltas[..., 2:] / ww, max=transform.scale_clamp)
    size = size[:, None]
    center = shift * size + center[:, None]
    half = 0.5 * (torch.exp(scale) * size)
    return torch.cat([center - half, center + half], dim=2)


def box_detections(predictor: nn.Module, predictions, proposals: List[Instances]):
    """The detections of ``predictor.inference(predictions, proposals)[0]`` (Detectron2's
    ``FastRCNNOutputLayers``: decoding, score threshold, per-class NMS, top-k), bit for bit, in
    fewer operator calls and host waits.

    Detectron2's (B5 at 512x1024: 82 operator calls besides the NMS; here 44) decodes one box
    column at a time, reads the device twice per image before its one ``nonzero`` (any row not
    finite? any box not finite, in ``Boxes.clip``?), clips all R x K boxes in ten operators and
    indexes them with the boolean mask again. Here the rows not finite and the scores under the
    threshold make one mask, read once per image; the kept boxes are clipped in place; the NMS
    is torchvision's ``batched_nms`` per image (:func:`batched_nms`: without its host wait on a
    GPU), as in Detectron2. Another box predictor, and tracing, run ``predictor.inference``
    itself.
    """
    if type(predictor) is not FastRCNNOutputLayers or torch.jit.is_tracing():
        return predictor.inference(predictions, proposals)[0]
    proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals])
    boxes, probs, valid = box_scores(predictor, predictions, proposal_boxes)
    keep = _kept(predictor, probs, valid)
    sizes = [len(p) for p in proposals]
    return select_detections(
        predictor,
        [p.image_size for p in proposals],
        boxes.split(sizes),
        probs.split(sizes),
        keep.split(sizes),
    )


def box_scores(predictor: FastRCNNOutputLayers, predictions, proposal_boxes: torch.Tensor):
    """The first half of :func:`box_detections`, whose shapes depend only on the number R of
    (R, 4) ``proposal_boxes``: their decoded boxes (R, B, 4) (B: 1, or one per class), the
    class probabilities (R, K + 1) (the background's last) and whether both are finite (R,)."""
    scores, deltas = predictions
    boxes = _decode_boxes(predictor.box2box_transform, deltas, proposal_boxes)
    probs = scores.sigmoid() if predictor.use_sigmoid_ce else F.softmax(scores, dim=-1)
    # Detectron2 drops the rows with a box or a probability not finite.
    valid = torch.isfinite(boxes).all(dim=(1, 2)) & torch.isfinite(probs).all(dim=1)
    return boxes, probs, valid


def _kept(predictor: FastRCNNOutputLayers, probs: torch.Tensor, valid: torch.Tensor):
    """(R, K) whether each (row, class) pair is kept: Detectron2 keeps those of the finite rows
    whose score is above the threshold (the background's column, the last, is not a class)."""
    return (probs[:, :-1] > predictor.test_score_thresh) & valid[:, None]


def select_detections(predictor: FastRCNNOutputLayers, image_sizes, boxes, probs, keep):
    """The second half of :func:`box_detections`: from each image's :func:`box_scores` and
    :func:`_kept` pairs, the kept boxes clipped to the image, per-class NMS, top-k; one
    Instances per image."""
    results = []
    for image_size, boxes_n, probs_n, keep_n in zip(image_sizes, boxes, probs, keep):
        rows, classes = keep_n.nonzero().unbind(1)  # the one host read
        # The box of each kept (row, class); class-agnostic boxes: the row's one box.
        selected = boxes_n[rows, classes] if boxes_n.shape[1] > 1 else boxes_n[rows, 0]
        scores = probs_n[rows, classes]
        clip_boxes_(selected, [image_size])
        best = batched_nms(selected, scores, classes, predictor.test_nms_thresh)
        if predictor.test_topk_per_image >= 0:
            best = best[: predictor.test_topk_per_image]
        result = Instances(image_size)
        result.pred_boxes = Boxes(selected[best])
        result.scores = scores[best]
        result.pred_classes = classes[best]
        results.append(result)
    return results


# What InferenceNetwork.detect stands in for: a subclass of StandardROIHeads that overrides one
# of these (Detectron2's CascadeROIHeads: forward, _forward_box) would infer otherwise.
_ROI_HEADS_INFERENCE = ("forward", "_forward_box", "forward_with_given_boxes", "_forward_mask")


def check_supported(model) -> None:
    """Fails, naming the config key, if ``model``'s RPN or ROI heads are not the kinds that
    :class:`InferenceNetwork` runs: Detectron2's RPN, and StandardROIHeads (or a subclass that
    keeps its inference) with a mask head, which the panoptic fusion needs, and no keypoints.
    EfficientPS checks this when it is built, before any training, and again at inference."""
    if type(model.proposal_generator) is not RPN:
        raise NotImplementedError(
            "EfficientPS inference runs Detectron2's RPN (MODEL.PROPOSAL_GENERATOR.NAME 'RPN'), "
            f"got {type(model.proposal_generator).__name__}."
        )
    roi_heads = model.roi_heads
    overridden = [
        name
        for name in _ROI_HEADS_INFERENCE
        if isinstance(roi_heads, StandardROIHeads)
        and getattr(type(roi_heads), name) is not getattr(StandardROIHeads, name)
    ]
    keypoints = getattr(roi_heads, "keypoint_on", False)
    if not isinstance(roi_heads, StandardROIHeads) or overridden or keypoints:
        why = f" (it overrides {', '.join(overridden)})" if overridden else ""
        why += " with a keypoint head" if keypoints else ""
        raise NotImplementedError(
            "EfficientPS inference runs StandardROIHeads without keypoints (MODEL.ROI_HEADS.NAME "
            f"'StandardROIHeads', MODEL.KEYPOINT_ON False), got {type(roi_heads).__name__}{why}."
        )
    if not roi_heads.mask_on:
        raise ValueError(
            "EfficientPS's panoptic fusion needs the mask head: set MODEL.MASK_ON True (in a "
            "LazyConfig, model.roi_heads.mask_in_features, mask_pooler and mask_head)."
        )


def build_inference_network(model, options: InferenceOptions) -> InferenceNetwork:
    """The :class:`InferenceNetwork` of ``model`` (an EfficientPS) under ``options``.

    With every option off (or only CUDA_GRAPH, off CUDA) it runs the model's own modules. Otherwise
    it runs a copy (one more set of weights), made with gradients off, in eval mode, fused
    (``fast_inference``), with the dense network cast to ``dtype``, compiled (``compile``) or
    graphed (``cuda_graph``, on CUDA only: elsewhere it has no effect).
    """
    check_supported(model)
    roi_heads = model.roi_heads
    parts = {
        "backbone": model.backbone,
        "sem_seg_head": model.sem_seg_head,
        "rpn_head": model.proposal_generator.rpn_head,
        "box_head": roi_heads.box_head,
        "mask_head": roi_heads.mask_head,
    }
    if options.needs_copy(model.device):
        # Ordinary (not inference) tensors even when called under inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            parts = copy.deepcopy(nn.ModuleDict(parts)).eval().requires_grad_(False)
            if options.fast_inference:
                fuse_for_inference(parts, channels_last=model.channels_last)
            dtype = _DTYPES[options.dtype]
            if dtype != torch.float32:
                for name in ("backbone", "sem_seg_head", "rpn_head"):
                    parts[name].to(dtype)
        if options.cuda_graph and model.device.type != "cuda":
            logger.info("MODEL.EFFICIENTPS.CUDA_GRAPH has no effect on device %s.", model.device)
    dense = DenseNetwork(
        parts["backbone"],
        parts["sem_seg_head"],
        parts["rpn_head"],
        model.proposal_generator,
    )
    compiled = None
    if options.compile:
        compiled = torch.compile(dense, mode=options.compile_mode, dynamic=False)
    return InferenceNetwork(
        dense,
        parts["box_head"],
        parts["mask_head"],
        cuda_graph=options.cuda_graph and model.device.type == "cuda",
        cuda_graph_cache_size=options.cuda_graph_cache_size,
        cuda_graph_roi_heads=options.cuda_graph_roi_heads,
        compiled=compiled,
        compiled_replays_graphs=options.compile and _compile_mode_replays_graphs(options),
    )


def _compile_mode_replays_graphs(options: InferenceOptions) -> bool:
    """Whether ``torch.compile`` in MODEL.EFFICIENTPS.COMPILE_MODE replays CUDA graphs (CUDA graph
    trees: "reduce-overhead", "max-autotune"), as torch lists each mode's settings."""
    import torch._inductor  # what torch.compile imports anyway

    return bool(torch._inductor.list_mode_options(options.compile_mode).get("triton.cudagraphs"))
