"""EfficientPS's additions to Detectron2's config, and the one way its scripts build a config.

Existing Detectron2 nodes (MODEL.SEM_SEG_HEAD, MODEL.RPN, MODEL.ROI_MASK_HEAD, TEST.AUG, ...) are
extended, never duplicated; the values the paper uses live in ``configs/Base-EfficientPS.yaml``.
"""

import difflib
import logging
import os

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.utils.logger import log_first_n

__all__ = ["add_efficientps_config", "setup_cfg", "tta_config"]


def add_efficientps_config(cfg):
    """Adds EfficientPS's config keys to a Detectron2 config (in place)."""
    _C = cfg

    # ---------------------------------------------------------------------------------------------
    # Backbone: EfficientNet without squeeze-and-excitation (or another bottom-up backbone), then
    # the 2-way FPN.
    # ---------------------------------------------------------------------------------------------
    _C.MODEL.EFFICIENTNET = CN()
    # Compound-scaling variant: one of "b0" ... "b7" (the paper uses "b5").
    _C.MODEL.EFFICIENTNET.VARIANT = "b5"
    # Norm for every conv of the trunk: "BN", "SyncBN", "FrozenBN", "GN" or "" (no norm).
    _C.MODEL.EFFICIENTNET.NORM = "BN"
    # Negative slope of the LeakyReLU that follows every norm (the paper's iABN uses 0.01).
    _C.MODEL.EFFICIENTNET.LEAKY_RELU_SLOPE = 0.01
    # The paper removes squeeze-and-excitation; True keeps it (e.g. to load every ImageNet weight).
    _C.MODEL.EFFICIENTNET.SQUEEZE_EXCITATION = False
    # Stochastic-depth probability of the last MBConv block (scaled linearly from 0 in the first);
    # 0: off, as in the official EfficientPS training (torchvision's ImageNet recipe used 0.2).
    _C.MODEL.EFFICIENTNET.STOCHASTIC_DEPTH_PROB = 0.0
    # Trunk stages to expose, by stride: any of "stride4", "stride8", "stride16", "stride32".
    _C.MODEL.EFFICIENTNET.OUT_FEATURES = ["stride4", "stride8", "stride16", "stride32"]
    # Number of first trunk stages whose weights are frozen (0 = train everything).
    _C.MODEL.EFFICIENTNET.FREEZE_AT = 0
    # Recompute MBConv activations in the backward pass to save training memory.
    _C.MODEL.EFFICIENTNET.ACTIVATION_CHECKPOINTING = False

    # MODEL.BACKBONE.NAME "build_two_way_fpn_backbone" builds the 2-way FPN on any registered
    # bottom-up backbone; "build_efficientnet_two_way_fpn_backbone" always on EfficientNet.
    _C.MODEL.TWO_WAY_FPN = CN()
    # BACKBONE_REGISTRY name of the bottom-up builder, e.g. "build_efficientnet_backbone",
    # Detectron2's "build_resnet_backbone" (MODEL.RESNETS), or your own (e.g. wrapping RegNet).
    _C.MODEL.TWO_WAY_FPN.BOTTOM_UP = "build_efficientnet_backbone"
    # Its four outputs at strides 4, 8, 16, 32 that the FPN reads, finest first (ResNet: res2-res5).
    _C.MODEL.TWO_WAY_FPN.IN_FEATURES = ["stride4", "stride8", "stride16", "stride32"]
    # Channels of every FPN output.
    _C.MODEL.TWO_WAY_FPN.OUT_CHANNELS = 256
    # Norm after every FPN conv (followed by LeakyReLU).
    _C.MODEL.TWO_WAY_FPN.NORM = "BN"
    # Add a max-pooled stride-64 level "p6" (only needed by RPN anchors at stride 64).
    _C.MODEL.TWO_WAY_FPN.TOP_BLOCK = False

    # ---------------------------------------------------------------------------------------------
    # Semantic head (extends Detectron2's MODEL.SEM_SEG_HEAD node).
    # ---------------------------------------------------------------------------------------------
    # Fraction of the hardest pixels (highest loss) that the cross-entropy is averaged over.
    _C.MODEL.SEM_SEG_HEAD.HARD_PIXEL_FRACTION = 0.25
    # What that fraction is of: "image", every pixel of the (unpadded) image, void ones counting
    # with zero loss (the paper's w = 4/(H*W), and the official code); "labelled", the labelled
    # pixels only (large void regions then do not dilute the loss).
    _C.MODEL.SEM_SEG_HEAD.HARD_PIXEL_NORMALIZATION = "image"
    # Channels inside the DPC branches (their outputs are reduced to CONVS_DIM).
    _C.MODEL.SEM_SEG_HEAD.DPC_CHANNELS = 256
    # Recompute the head's activations in the backward pass to save training memory.
    _C.MODEL.SEM_SEG_HEAD.ACTIVATION_CHECKPOINTING = False

    # ---------------------------------------------------------------------------------------------
    # Instance head: the separable-conv RPN head's norm (the mask head uses ROI_MASK_HEAD.NORM).
    # ---------------------------------------------------------------------------------------------
    _C.MODEL.RPN.HEAD_NORM = "BN"

    # ---------------------------------------------------------------------------------------------
    # Panoptic fusion (parameter-free, inference only). A node of its own rather than Detectron2's
    # MODEL.PANOPTIC_FPN.COMBINE, whose three thresholds mean the same here: that node configures
    # Panoptic FPN's heuristic merge of binary masks (with defaults of its own, e.g. a stuff limit
    # of 4096), while this fusion merges logits, (sigmoid(A) + sigmoid(B)) * (A + B), and needs
    # MASK_LOGIT_SCALE, which has no counterpart there.
    # ---------------------------------------------------------------------------------------------
    _C.MODEL.PANOPTIC_FUSION = CN()
    # Detections below this score are not fused.
    _C.MODEL.PANOPTIC_FUSION.CONFIDENCE_THRESH = 0.5
    # An instance is dropped if more than this fraction of its mask is already claimed.
    _C.MODEL.PANOPTIC_FUSION.OVERLAP_THRESH = 0.5
    # Stuff segments with fewer pixels than this become void.
    _C.MODEL.PANOPTIC_FUSION.STUFF_AREA_LIMIT = 2048
    # Pasted mask logits are multiplied by this (the official implementation uses 4).
    _C.MODEL.PANOPTIC_FUSION.MASK_LOGIT_SCALE = 4.0

    _C.MODEL.EFFICIENTPS = CN()
    # Semantic class of each thing class (contiguous ids). Empty: read from the metadata of the
    # first data set in DATASETS.TRAIN or DATASETS.TEST.
    _C.MODEL.EFFICIENTPS.THING_SEMANTIC_IDS = []
    # Keep conv weights (and so activations) channels-last: several times faster depthwise convs
    # on CPU (mkldnn) and faster convs under AMP on recent GPUs; results are the same.
    _C.MODEL.EFFICIENTPS.CHANNELS_LAST = True
    # Inference runs a cached copy of the network with BatchNorm folded into the convs and conv +
    # LeakyReLU fused (oneDNN on CPU): same outputs within float rounding, one more weight copy,
    # B5 at 1024x2048 on a 2-core CPU: 3.5 s instead of 4.7 s. False runs the model's own modules.
    _C.MODEL.EFFICIENTPS.FAST_INFERENCE = True
    # Dtype of the dense network (backbone, FPN, semantic head, RPN head) in inference: "float32",
    # "bfloat16" or "float16". Its outputs, the ROI heads, mask logits and fusion stay float32.
    _C.MODEL.EFFICIENTPS.INFERENCE_DTYPE = "float32"
    # On CUDA, replay the dense network as a CUDA graph captured once per padded input size, the
    # second time the size comes (no effect on other devices). Pays where sizes repeat.
    _C.MODEL.EFFICIENTPS.CUDA_GRAPH = False
    # Most CUDA graphs (padded input sizes) kept; the least recently used one is dropped, and once
    # as many have been dropped, no new size is captured (it runs without a graph).
    _C.MODEL.EFFICIENTPS.CUDA_GRAPH_CACHE_SIZE = 4
    # With CUDA_GRAPH, also replay the ROI heads' box and mask stages as CUDA graphs, at fixed row
    # counts: each image's proposals padded to RPN.POST_NMS_TOPK_TEST, its detections to
    # TEST.DETECTIONS_PER_IMAGE. Fewer calls from Python, more GPU work; detections equal up to
    # float rounding.
    _C.MODEL.EFFICIENTPS.CUDA_GRAPH_ROI_HEADS = False
    # Run the dense network through torch.compile (compiles once per input size; slow first call).
    _C.MODEL.EFFICIENTPS.COMPILE = False
    # torch.compile mode for COMPILE: "default", "reduce-overhead" (with CUDA graphs),
    # "max-autotune", ...
    _C.MODEL.EFFICIENTPS.COMPILE_MODE = "default"
    # Training runs the backbone and the semantic head through torch.compile (same parameters).
    _C.MODEL.EFFICIENTPS.COMPILE_TRAINING = False
    # In-place activated BatchNorm, the paper's norm layer: every BN or SyncBN followed by a
    # LeakyReLU keeps only its output for the backward pass (training activations about 40%
    # smaller); same parameters, checkpoints and inference. FrozenBN and GN are left as they are.
    _C.MODEL.EFFICIENTPS.INPLACE_ABN = False

    # ---------------------------------------------------------------------------------------------
    # Test-time augmentation: Detectron2's TEST.AUG (ENABLED, MIN_SIZES, MAX_SIZE, FLIP), run by
    # EfficientPSWithTTA, with EfficientPS's scales.
    # ---------------------------------------------------------------------------------------------
    # Shorter-side sizes to run at, in addition to horizontal flips when TEST.AUG.FLIP.
    _C.TEST.AUG.MIN_SIZES = (512, 1024, 1536)
    # The longer side is capped at this.
    _C.TEST.AUG.MAX_SIZE = 4096
    # Deprecated alias of TEST.AUG: a key set here (not None) overrides TEST.AUG's, with a warning.
    _C.TEST.PANOPTIC_TTA = CN()
    _C.TEST.PANOPTIC_TTA.ENABLED = None
    _C.TEST.PANOPTIC_TTA.MIN_SIZES = None
    _C.TEST.PANOPTIC_TTA.MAX_SIZE = None
    _C.TEST.PANOPTIC_TTA.FLIP = None

    # Keep the panoptic PNGs of an evaluation in <OUTPUT_DIR>/inference/<data set>/panoptic/,
    # next to its predictions.json, instead of a temporary folder that is deleted.
    _C.TEST.KEEP_PANOPTIC_PNGS = False

    # Detectron2's VIS_PERIOD > 0 also puts the panoptic prediction next to the ground truth of a
    # training image into tensorboard every VIS_PERIOD iterations (efficientps_d2.visualization).

    # Autocast dtype of training under SOLVER.AMP.ENABLED (CUDA): "float16" (Detectron2's, with
    # gradient scaling) or "bfloat16" (float32's range: no gradient scaling, no per-step sync).
    _C.SOLVER.AMP.PRECISION = "float16"

    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE may also be "full_model": one norm over all gradients
    # (efficientps_d2.solver), as the official training clipped at 35.

    # ---------------------------------------------------------------------------------------------
    # Reliability: checks before work starts, what training tolerates.
    # ---------------------------------------------------------------------------------------------
    # train_net.py opens every panoptic PNG of DATASETS.TRAIN/TEST before it starts and checks its
    # mode, size and ids against segments_info (efficientps_d2.data.check; in a multi-process run
    # on local rank 0 of each machine, its verdict shared); False checks the json only (for very
    # large data sets: the full pass reads every PNG once).
    _C.DATASETS.CHECK_PNGS = True
    # Training accepts MODEL.WEIGHTS that leave model tensors random (missing) or hold tensors of
    # another shape (skipped, e.g. to fine-tune on other classes); False refuses them before
    # training, as evaluation refuses misfits. Converted ImageNet backbones are always accepted.
    _C.MODEL.ALLOW_PARTIAL_WEIGHTS = False
    # Training skips a sample whose image or panoptic PNG cannot be read, with a counted warning,
    # and stops when more than this fraction of DATASETS.TRAIN has proved unreadable.
    _C.DATALOADER.MAX_UNREADABLE_FRACTION = 0.01

    # ---------------------------------------------------------------------------------------------
    # Data: the dataset mapper's augmentations.
    # ---------------------------------------------------------------------------------------------
    _C.INPUT.RANDOM_SCALE = CN()
    # Random rescaling of the image by a factor drawn from this range (the paper: 0.5-2.0).
    _C.INPUT.RANDOM_SCALE.ENABLED = False
    _C.INPUT.RANDOM_SCALE.RANGE = [0.5, 2.0]
    # Output size the scaling is relative to (height, width); the crop comes from INPUT.CROP.
    _C.INPUT.RANDOM_SCALE.TARGET_SIZE = [1024, 2048]


def tta_config(cfg):
    """TEST.AUG, with the deprecated TEST.PANOPTIC_TTA keys that are set applied over it.

    Returns:
        a CfgNode with ENABLED, MIN_SIZES, MAX_SIZE and FLIP.
    """
    aug = cfg.TEST.AUG.clone()
    aug.defrost()
    old = cfg.TEST.get("PANOPTIC_TTA", None) or {}
    used = {key: value for key, value in old.items() if value is not None}
    if used:
        log_first_n(
            logging.WARNING,
            f"TEST.PANOPTIC_TTA is deprecated: set {', '.join(f'TEST.AUG.{k}' for k in used)} "
            "instead (the TEST.PANOPTIC_TTA values are used for now).",
            name=__name__,
            key="message",
        )
        aug.update(used)
    return aug


def is_yaml_config(cfg) -> bool:
    """True for a YAML-style config (``CfgNode``, keys like MODEL.WEIGHTS), False for a
    Detectron2 LazyConfig (``DictConfig`` with ``model``, ``train``, ``dataloader``)."""
    return hasattr(cfg, "MODEL")


def find_config_file(config_file):
    """``config_file`` if it is a file, else the model zoo's file of that name; FileNotFoundError
    (listing the model zoo's names) for neither."""
    if os.path.isfile(config_file):
        return config_file
    from .model_zoo import get_config_file

    try:
        return get_config_file(config_file)
    except RuntimeError as error:  # its message lists the model zoo's names
        raise FileNotFoundError(
            f"Config file '{config_file}' does not exist, and it is not a model zoo name: {error}"
        ) from None


def check_no_options(opts, config_file):
    """Refuses a command-line option among the overrides of ``config_file`` (``... KEY VALUE
    --resume``): the parser took it as an override, which the config would report obscurely."""
    options = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if options:
        raise ValueError(
            f"Found {', '.join(options)} among the config overrides of {config_file}: the "
            "overrides take the rest of the command line, so options go before them (--resume "
            "KEY VALUE, not KEY VALUE --resume)."
        )


def merge_config_file(cfg, config_file):
    """``cfg.merge_from_file(config_file)``, with a file that is not YAML, holds no mapping of
    keys (an empty file), or sets a key the config does not have refused by name (ValueError),
    where PyYAML, fvcore and yacs raise a bare YAMLError, TypeError or KeyError."""
    import yaml

    try:
        with open(config_file, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except yaml.constructor.ConstructorError:
        content = {}  # Python tags: Detectron2's unsafe loader reads those
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"Config file '{config_file}' is not valid YAML: {e}") from e
    if not isinstance(content, dict):
        what = "empty" if content is None else f"a YAML {type(content).__name__}"
        raise ValueError(
            f"Config file '{config_file}' is {what}, not a mapping of config keys "
            "(MODEL: ..., SOLVER: ...)."
        )
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:  # yacs: "Non-existent config key: X", or a renamed key
        message = str(e.args[0]) if e.args else str(e)
        unknown = "Non-existent config key: "
        if message.startswith(unknown):
            key = message[len(unknown) :]
            message = f"sets {key}, which is not a config key{_closest_keys(cfg, key)}"
        raise ValueError(f"Config file '{config_file}' (or a _BASE_ it names) {message}.") from e


def _closest_keys(cfg, key):
    close = difflib.get_close_matches(key, _full_keys(cfg), n=3, cutoff=0.6)
    return f"; closest keys: {', '.join(close)}" if close else ""


def merge_overrides(cfg, opts, config_file):
    """``cfg.merge_from_list(opts)``, with an odd list or a key the config does not have refused
    by name (ValueError listing the closest keys), where yacs raises a bare AssertionError."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(
            f"The config overrides of {config_file} are KEY VALUE pairs, got an odd number of "
            f"words ({opts}): {opts[-1]!r} has no value."
        )
    for key in opts[0::2]:
        if not isinstance(key, str):
            raise ValueError(f"Config override keys are strings like MODEL.WEIGHTS, got {key!r}.")
        if cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
            continue  # yacs ignores the former and explains the latter
        node, found = cfg, True
        for part in key.split("."):
            found = isinstance(node, CN) and part in node
            if not found:
                break
            node = node[part]
        if not found:
            raise ValueError(
                f"{key} is not a config key (in the overrides of {config_file})"
                f"{_closest_keys(cfg, key)}."
            )
    cfg.merge_from_list(opts)


def _full_keys(node, prefix=""):
    for name, value in node.items():
        if isinstance(value, CN):
            yield from _full_keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name


def setup_cfg(config_file, opts=(), *, freeze=True):
    """The config of a run: Detectron2's defaults, EfficientPS's keys, a config file, then ``opts``.

    Args:
        config_file: a YAML file, or a model zoo name
            ("Cityscapes-PanopticSegmentation/efficientps_b5.yaml").
        opts: KEY VALUE overrides, as on a command line.
        freeze: freeze the config.
    Returns:
        the config; MODEL.DEVICE "cuda..." becomes "cpu" when CUDA is not available (the shipped
        configs default to CUDA; a CPU-only machine still runs them, slowly).
    """
    config_file = find_config_file(config_file)
    from .engine.lazy_config import is_lazy_config  # imports this module: not at the top

    if is_lazy_config(config_file):
        raise ValueError(
            f"'{config_file}' is a LazyConfig file; setup_cfg reads YAML configs. Load it "
            "with efficientps_d2.engine.load_config (or model_zoo.get_config for a model zoo "
            "name), or use its YAML twin."
        )
    cfg = get_cfg()
    add_efficientps_config(cfg)
    merge_config_file(cfg, config_file)
    check_no_options(opts, config_file)
    merge_overrides(cfg, opts, config_file)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if freeze:
        cfg.freeze()
    return cfg
