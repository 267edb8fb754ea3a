"""Export an EfficientPS model to TorchScript or ONNX (flags in the style of Detectron2's
``tools/deploy/export_model.py``).

    python -m efficientps_d2.tools.export \\
        --config-file configs/Cityscapes-PanopticSegmentation/efficientps_b5.yaml \\
        --format onnx --output exported/ MODEL.WEIGHTS output/model_final.pth
    python -m efficientps_d2.tools.export --config-file CONFIG --format torchscript \\
        --output exported_ts/ --sample-image frame.png MODEL.WEIGHTS W.pth
    python -m efficientps_d2.tools.export \\
        --config-file configs/Synthetic-PanopticSegmentation/efficientps_b0_quick.py \\
        --format onnx --output exported/ train.init_checkpoint=output/model_final.pth

--config-file takes a YAML or a LazyConfig (``.py``) config, or a model zoo name of either kind;
the overrides are ``KEY VALUE`` pairs or ``key=value`` accordingly, as train_net.py takes them.
The output folder gets the model file (model.ts or model.onnx) and efficientps_export.json; run it
with ``efficientps_d2.export.load(folder)`` or ``demo.py --exported folder``. The graph is traced
on --sample-image (resized as the config's test loader resizes; default a random image) and takes
any image size afterwards.

Exit status: 0 exported; 1 the model, config or an input cannot be exported (the message says
what and why); 2 invalid command line.
"""

import argparse
import logging
import sys

import torch
from detectron2.data import transforms as T
from detectron2.utils.registry import locate

from efficientps_d2.config_adapter import ConfigAdapter
from efficientps_d2.data.image_files import (
    ImageInputError,
    check_model_input_format,
    prepare_image,
    read_image,
)
from efficientps_d2.engine import load_config
from efficientps_d2.engine.lazy_config import INFERENCE_PARTS
from efficientps_d2.engine.startup import load_for_evaluation
from efficientps_d2.export import FORMATS, export_model
from efficientps_d2.export.exporter import (
    MIN_SAMPLE_SIZE,
    check_export_folder,
    resize_for_export,
)
from efficientps_d2.modeling.meta_arch import EfficientPS

logger = logging.getLogger("efficientps_d2.tools.export")


def get_parser():
    parser = argparse.ArgumentParser(
        prog="python -m efficientps_d2.tools.export",
        description="Export EfficientPS to TorchScript or ONNX",
    )
    parser.add_argument(
        "--config-file", required=True, metavar="FILE", help="config file or model zoo name"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="export format")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    parser.add_argument(
        "--sample-image", metavar="IMG", help="image to trace with (default: a random image)"
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: KEY VALUE pairs (YAML) or key=value (.py)",
    )
    return parser


def export_config(args):
    """The config to export, YAML or LazyConfig (with the overrides), set to the CPU and checked
    for what export supports before any model is built."""
    cfg = load_config(args.config_file, args.opts, INFERENCE_PARTS)
    config = ConfigAdapter(cfg)
    config.set("device", "cpu")  # the trace records devices; the CPU graph is the portable one
    if config.tta_enabled:
        key = "TEST.AUG.ENABLED" if config.is_yaml else "train.tta.enabled"
        raise ValueError(
            f"{key} is True: test-time augmentation runs several passes and merges them in "
            "Python, so it cannot be exported; export the plain model."
        )
    if config.is_yaml and cfg.MODEL.META_ARCHITECTURE != "EfficientPS":
        raise ValueError(
            f"MODEL.META_ARCHITECTURE is '{cfg.MODEL.META_ARCHITECTURE}': only 'EfficientPS' "
            "models can be exported by this tool."
        )
    if not config.is_yaml:  # the same check, before the model is built and its weights loaded
        target = cfg.model.get("_target_")
        target = locate(target) if isinstance(target, str) else target
        if not (isinstance(target, type) and issubclass(target, EfficientPS)):
            name = getattr(target, "__qualname__", target)
            raise ValueError(
                f"model._target_ is {name}: only EfficientPS models can be exported by this tool."
            )
    if config.is_yaml and not cfg.MODEL.MASK_ON:
        raise ValueError("MODEL.MASK_ON is False: EfficientPS's panoptic fusion needs the masks.")
    # The model's rule, before it is built: the exported predictor converts to any format it takes.
    check_model_input_format(config.input_format, config.keys["input_format"])
    resize_for_export(cfg)  # refuses a test resizing that the exported predictor cannot redo
    return cfg


def sample_image(cfg, path):
    """The --sample-image as the network sees it: (3, H, W) float32, in the config's input
    format, resized as the test loader resizes (the demo's reading and checks)."""
    if path is None:
        return None
    config = ConfigAdapter(cfg)
    try:
        image = read_image(path, format="BGR")  # as the demo reads its inputs
    except Exception as e:  # PIL raises several types for unreadable files
        raise ValueError(f"--sample-image '{path}' is not a readable image: {e}") from e
    resize = T.AugmentationList(config.build_test_augmentations())
    try:
        chw = prepare_image(image, resize, config.input_format)
    except ImageInputError as e:
        raise ValueError(f"--sample-image '{path}': {e}") from e
    if min(chw.shape[1:]) < MIN_SAMPLE_SIZE:
        size = f"{image.shape[0]} x {image.shape[1]}"
        if chw.shape[1:] != image.shape[:2]:
            size += f", {chw.shape[1]} x {chw.shape[2]} after the test resize"
        raise ValueError(
            f"--sample-image '{path}' is {size}: tracing needs at least "
            f"{MIN_SAMPLE_SIZE} x {MIN_SAMPLE_SIZE} pixels (the traced graph then takes any "
            "size). Trace on a larger image, or leave --sample-image out for a random one."
        )
    return torch.as_tensor(chw.astype("float32"))


def main(argv=None):
    """Exports; returns the exit status (see the module docstring)."""
    args = get_parser().parse_args(argv)
    try:
        cfg = export_config(args)
        image = sample_image(cfg, args.sample_image)
        check_export_folder(args.output)  # before the model is built and its weights loaded
        config = ConfigAdapter(cfg)
        model = config.build_model()
        if config.weights:
            # As --eval-only loads them: weights that leave tensors random (an ImageNet backbone,
            # the config's own MODEL.WEIGHTS when the trained ones were forgotten) are refused
            # unless MODEL.ALLOW_PARTIAL_WEIGHTS; a deployed model would carry random heads.
            load_for_evaluation(model, config, resume=False)
        else:
            logger.warning(f"{config.keys['weights']} is empty: exporting random weights.")
        path = export_model(model.eval(), cfg, args.output, args.format, sample_image=image)
    except (
        KeyError,
        RuntimeError,
        ValueError,
        TypeError,
        OSError,
        NotImplementedError,
        ImportError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Exported {args.format} model to {path}")
    return 0


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger(name="detectron2")
    setup_logger(name="efficientps_d2")
    sys.exit(main())
