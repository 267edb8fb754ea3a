"""Tiny EfficientPS configs and inputs that keep CPU tests fast."""

import os

import torch
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances

from efficientps_d2 import add_efficientps_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
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
