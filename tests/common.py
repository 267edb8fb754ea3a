"""Tiny EfficientPS configs and inputs that keep CPU tests fast."""

import collections
import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances
from torch.utils._python_dispatch import TorchDispatchMode

from efficientps_d2 import add_efficientps_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
# CUDA-only tests skip without a GPU. Comparisons run on DEVICES: the CPU and, where there is one,
# a GPU (where torchvision picks other kernels and the fast paths their GPU branches).
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
NUM_CLASSES = 5  # semantic classes 0-2 are stuff, 3-4 things
# Detections and segments even from random weights, so output contracts can be checked.
PERMISSIVE = [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    0.0,
    "MODEL.PANOPTIC_FUSION.CONFIDENCE_THRESH",
    0.0,
    "MODEL.PANOPTIC_FUSION.STUFF_AREA_LIMIT",
    0,
]
THING_SEMANTIC_IDS = [3, 4]
# EfficientPS's training losses: the semantic head's, the RPN's and the ROI heads'.
LOSS_NAMES = {
    "loss_sem_seg",
    "loss_rpn_cls",
    "loss_rpn_loc",
    "loss_cls",
    "loss_box_reg",
    "loss_mask",
}


def config_file(name):
    return os.path.join(CONFIGS, name)


def load_config(name="Base-EfficientPS.yaml", opts=()):
    cfg = get_cfg()
    add_efficientps_config(cfg)
    cfg.merge_from_file(config_file(name))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def tiny_config(opts=()):
    """EfficientPS-B0 with narrow heads, 5 classes (2 things), for CPU tests in seconds."""
    cfg = load_config()
    cfg.MODEL.EFFICIENTNET.VARIANT = "b0"
    cfg.MODEL.EFFICIENTNET.STOCHASTIC_DEPTH_PROB = 0.0
    cfg.MODEL.TWO_WAY_FPN.OUT_CHANNELS = 32
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.DPC_CHANNELS = 16
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(THING_SEMANTIC_IDS)
    cfg.MODEL.EFFICIENTPS.THING_SEMANTIC_IDS = THING_SEMANTIC_IDS
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 50
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.INPUT.MIN_SIZE_TEST = 0  # no resizing in DefaultPredictor
    cfg.merge_from_list(list(opts))
    return cfg


def save_random_model(cfg, folder, name):
    """Builds ``cfg``'s model with seed 0, saves its random weights as ``folder/<name>.pth``,
    points ``cfg.MODEL.WEIGHTS`` at them and writes ``cfg`` to ``folder/<name>.yaml``; returns
    that config file's path (a str)."""
    from detectron2.modeling import build_model

    from efficientps_d2.checkpoint import AtomicDetectionCheckpointer

    torch.manual_seed(0)
    AtomicDetectionCheckpointer(build_model(cfg), str(folder)).save(name)
    cfg.MODEL.WEIGHTS = os.path.join(str(folder), f"{name}.pth")
    path = os.path.join(str(folder), f"{name}.yaml")
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path


def killed_writers_temporary(path):
    """The temporary file name that a writer of ``path`` killed before its rename leaves (see
    ``atomic_io.temporary_path``): named after a process that has ended, so that another process
    takes it for stale (this process's own temporaries are live for other processes)."""
    from efficientps_d2.atomic_io import temporary_path

    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    return temporary_path(path).replace(f"-p{os.getpid()}.", f"-p{ended.pid}.")


def training_input(height, width, boxes, classes, seed=0):
    """One training dict: random image, semantic map with each box painted in its thing's class.

    ``classes`` are Mask R-CNN class indices (0..T-1); an empty ``boxes`` gives no instances.
    """
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    sem_seg = torch.randint(0, NUM_CLASSES - len(THING_SEMANTIC_IDS), (height, width), generator=g)
    masks = torch.zeros((len(boxes), height, width), dtype=torch.bool)
    for i, ((x0, y0, x1, y1), c) in enumerate(zip(boxes, classes)):
        masks[i, y0:y1, x0:x1] = True
        sem_seg[y0:y1, x0:x1] = THING_SEMANTIC_IDS[c]
    sem_seg[:2, :] = 255  # a strip of unlabelled pixels
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    instances.gt_masks = BitMasks(masks)
    return {
        "image": image,
        "sem_seg": sem_seg,
        "instances": instances,
        "height": height,
        "width": width,
    }


class DeviceReads(TorchDispatchMode):
    """Counts the operations that, on a GPU, wait for the device: scalar and list reads, nonzero /
    boolean indexing, outputs sized by their values (unique, repeat_interleave), equality checks,
    and tensors made from host data ("upload": torch.tensor, a list used as an index), which
    reach the GPU by a copy that waits unless made non-blocking. On the CPU they cost nothing,
    but the fusion's GPU speed rests on how many there are.

    Under torch.inference_mode (where EfficientPS.inference runs) some of them reach the mode as
    the composite operators that Python called (item, is_nonzero, nonzero_numpy, one-argument
    where): the read inside is not dispatched again, so those are counted by their own names."""

    _SYNCING = {
        torch.ops.aten._local_scalar_dense.default: "scalar",
        torch.ops.aten.item.default: "scalar",
        torch.ops.aten.is_nonzero.default: "scalar",
        torch.ops.aten.nonzero.default: "nonzero",
        torch.ops.aten.nonzero_numpy.default: "nonzero",
        torch.ops.aten.where.default: "nonzero",
        torch.ops.aten.argwhere.default: "nonzero",
        torch.ops.aten.masked_select.default: "masked_select",
        torch.ops.aten._unique2.default: "unique",
        torch.ops.aten.unique_dim.default: "unique",
        torch.ops.aten.unique_consecutive.default: "unique",
        torch.ops.aten.equal.default: "equal",
        torch.ops.aten.allclose.default: "equal",
        torch.ops.aten.lift_fresh.default: "upload",
    }
    # repeat_interleave sizes its output from the repeats unless given output_size.
    _REPEATS = (
        torch.ops.aten.repeat_interleave.Tensor,
        torch.ops.aten.repeat_interleave.self_Tensor,
    )

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __enter__(self):
        # Tensor.tolist reads the data without dispatching an operator.
        tolist = torch.Tensor.tolist

        def counted_tolist(tensor):
            self.counts["tolist"] += 1
            return tolist(tensor)

        self._restore = tolist
        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._restore
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self._SYNCING:
            self.counts[self._SYNCING[func]] += 1
        elif func in self._REPEATS and (kwargs or {}).get("output_size") is None:
            self.counts["repeat_interleave"] += 1
        elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default):
            if any(i is not None and i.dtype == torch.bool for i in args[1]):
                self.counts["boolean index"] += 1
        return func(*args, **(kwargs or {}))


def assert_p2_to_p5(backbone, channels=32, height=97, width=131):
    """Runs ``backbone`` (eval mode) on a zero (1, 3, height, width) input and checks its outputs:
    p2 ... p5 with ``channels`` each, of ceil(size / stride), as the trunk's padded stride-2 convs
    give. Returns the features."""
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, height, width))
    assert list(features) == ["p2", "p3", "p4", "p5"]
    for name, spec in backbone.output_shape().items():
        assert spec.channels == channels
        assert features[name].shape[-2:] == (-(-height // spec.stride), -(-width // spec.stride))
    return features
