"""Export an EfficientPS model to TorchScript or ONNX (flags in the style of Detectron2's
``tools/deploy/export_model.py``).

    python -m efficientps_d2.tools.export \\
        --config-file configs/Cityscapes-PanopticSegmentation/efficientps_b5.yaml \\
        --format onnx --output exported/ MODEL.WEIGHTS output/model_final.pth
    python -m efficientps_d2.tools.export --config-file CONFIG --format torchscript \\
        --output exported_ts/ --sample-image frame.png MODEL.WEIGHTS W.pth

--config-file also takes a model zoo name. The output folder gets the model file (model.ts or
model.onnx) and efficientps_export.json; run it with ``efficientps_d2.export.load(folder)`` or
``demo.py --exported folder``. The graph is traced on --sample-image (resized as
INPUT.MIN/MAX_SIZE_TEST; default a random image) and takes any image size afterwards.

Exit status: 0 exported; 1 the model, config or an input cannot be exported (the message says
what and why); 2 invalid command line.
"""

import argparse
import logging
import sys

import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from efficientps_d2.checkpoint import EfficientPSCheckpointer
from efficientps_d2.config import setup_cfg
from efficientps_d2.config_adapter import ConfigAdapter
from efficientps_d2.engine.lazy_config import is_lazy_config
from efficientps_d2.export import FORMATS, export_model

logger = logging.getLogger("efficientps_d2.tools.export")


def get_parser():
    parser = argparse.ArgumentParser(description="Export EfficientPS to TorchScript or ONNX")
    parser.add_argument(
        "--config-file", required=True, metavar="FILE", help="config file or model zoo name"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="export format")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    parser.add_argument(
        "--sample-image", metavar="IMG", help="image to trace with (default: a random image)"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE pairs"
    )
    return parser


def export_cfg(args):
    """The config to export: setup_cfg's, on the CPU, checked for what export supports."""
    if is_lazy_config(args.config_file):
        twin = args.config_file[: -len(".py")] + ".yaml"
        raise ValueError(
            f"--config-file '{args.config_file}' is a LazyConfig (.py): the export reads the "
            f"runtime settings (input format, test resizing, classes) from a YAML config; use its "
            f"YAML twin ('{twin}'), which builds the same model."
        )
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    cfg.MODEL.DEVICE = "cpu"  # the trace records devices; the CPU graph is the portable one
    if ConfigAdapter(cfg).tta_enabled:
        raise ValueError(
            "TEST.AUG.ENABLED is True: test-time augmentation runs several passes and merges "
            "them in Python, so it cannot be exported; export the plain model."
        )
    if cfg.MODEL.META_ARCHITECTURE != "EfficientPS":
        raise ValueError(
            f"MODEL.META_ARCHITECTURE is '{cfg.MODEL.META_ARCHITECTURE}': only 'EfficientPS' "
            "models can be exported by this tool."
        )
    if not cfg.MODEL.MASK_ON:
        raise ValueError("MODEL.MASK_ON is False: EfficientPS's panoptic fusion needs the masks.")
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got '{cfg.INPUT.FORMAT}'.")
    cfg.freeze()
    return cfg


def sample_image(cfg, path):
    """The --sample-image as the network sees it: (3, H, W) float32, INPUT.FORMAT, resized."""
    if path is None:
        return None
    try:
        image = read_image(path, format=cfg.INPUT.FORMAT)
    except Exception as e:  # PIL raises several types for unreadable files
        raise ValueError(f"--sample-image '{path}' is not a readable image: {e}") from e
    resized = T.AugInput(image)  # the test DatasetMapper's resize (none for MIN_SIZE_TEST 0)
    T.AugmentationList(ConfigAdapter(cfg).build_test_augmentations())(resized)
    return torch.as_tensor(resized.image.transpose(2, 0, 1).astype("float32"))


def main(argv=None):
    """Exports; returns the exit status (see the module docstring)."""
    args = get_parser().parse_args(argv)
    try:
        cfg = export_cfg(args)
        image = sample_image(cfg, args.sample_image)
        model = build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            EfficientPSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialised weights.")
        path = export_model(model.eval(), cfg, args.output, args.format, sample_image=image)
    except (KeyError, RuntimeError, ValueError, OSError, NotImplementedError, ImportError) as e:
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
