"""Converts torchvision EfficientNet ImageNet weights into an EfficientPS backbone checkpoint.

EfficientPS's trunk is built from torchvision's own MBConv blocks, with squeeze-and-excitation (SE)
replaced in place by an identity, so torchvision's ``features.*`` names carry over unchanged; the
converter prefixes them with ``backbone.bottom_up.``, drops the SE weights (unless the model keeps
SE, MODEL.EFFICIENTNET.SQUEEZE_EXCITATION True) and the ImageNet classifier, and refuses a state
dict of another variant, naming the tensors whose shapes differ::

    python -m efficientps_d2.tools.convert_torchvision_weights --variant b5 \\
        efficientnet_b5_lukemelas-1a07897c.pth efficientnet_b5_backbone.pth
    # or take the variant (and SE setting) from a config, and check the result against its model:
    python -m efficientps_d2.tools.convert_torchvision_weights \\
        --config-file configs/Cityscapes-PanopticSegmentation/efficientps_b5.yaml IN.pth OUT.pth

The output is a Detectron2 checkpoint (``{"model": ..., "__author__": ...,
"matching_heuristics": False}``) for MODEL.WEIGHTS; the 2-way FPN, the semantic head, the RPN and
the ROI heads are not in it and stay randomly initialised.
"""

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from ..atomic_io import atomic_write, check_writable_file
from ..checkpoint import describe_file, describe_load_error
from ..modeling.backbone.efficientnet import VARIANTS, EfficientNet

__all__ = [
    "BACKBONE_PREFIX",
    "WeightConversionReport",
    "WeightConversionError",
    "convert_file",
    "convert_torchvision_file",
    "convert_torchvision_efficientnet",
    "expected_backbone_shapes",
    "main",
]

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone.bottom_up."
_SE_KEY = re.compile(r"^features\.\d+\.\d+\.block\.\d+\.fc[12]\.(weight|bias)$")
_MAX_LISTED = 8
_NOT_CONVERTED = "the 2-way FPN, the semantic head, the RPN and the ROI (box and mask) heads"


class WeightConversionError(ValueError):
    """The state dict is not a torchvision EfficientNet of the requested variant."""


@dataclass
class WeightConversionReport:
    """What a conversion kept and dropped.

    Attributes:
        variant: "b0" ... "b7".
        squeeze_excitation: whether SE weights were kept.
        converted: names (torchvision's) of the tensors written to the checkpoint.
        converted_parameters: number of scalars in them (parameters and BN statistics).
        skipped: group ("squeeze-excitation", "classifier") -> names of the dropped tensors.
    """

    variant: str
    squeeze_excitation: bool
    converted: List[str] = field(default_factory=list)
    converted_parameters: int = 0
    skipped: Dict[str, List[str]] = field(default_factory=dict)

    def summary(self):
        lines = [
            f"Converted {len(self.converted)} tensors ({self.converted_parameters / 1e6:.2f}M "
            f"values) of torchvision efficientnet_{self.variant} into '{BACKBONE_PREFIX}*'."
        ]
        for group, names in self.skipped.items():
            lines.append(f"Skipped {len(names)} {group} tensors.")
        lines.append(f"Not in the checkpoint, so randomly initialised: {_NOT_CONVERTED}.")
        return "\n".join(lines)


def expected_backbone_shapes(variant, squeeze_excitation=False):
    """Tensor name (torchvision's ``features.*``) -> shape of EfficientPS's trunk for ``variant``.

    Built on the "meta" device: no memory, no initialisation cost.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got '{variant}'.")
    with torch.device("meta"):
        trunk = EfficientNet(variant, norm="BN", squeeze_excitation=squeeze_excitation)
    return {k: tuple(v.shape) for k, v in trunk.state_dict().items()}


def _unwrap(state_dict):
    """Accepts a plain state dict or one nested under "state_dict"/"model"."""
    for key in ("state_dict", "model"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not state_dict:
        raise WeightConversionError("The file holds no state dict (a dict of tensors).")
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _guess_variant(state_dict):
    """The torchvision variant whose feature tensors match ``state_dict`` exactly, or None."""
    features = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith("features.")}
    for variant in VARIANTS:
        if expected_backbone_shapes(variant, squeeze_excitation=True) == features:
            return variant
    return None


def _names(items):
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def convert_torchvision_efficientnet(state_dict, variant, *, squeeze_excitation=False):
    """Converts a torchvision EfficientNet state dict for EfficientPS's backbone.

    Args:
        state_dict: torchvision ``efficientnet_bN`` state dict (``features.*``, ``classifier.*``),
            possibly nested under "state_dict" or "model", possibly with a "module." prefix.
        variant: "b0" ... "b7", the MODEL.EFFICIENTNET.VARIANT of the model to load it into.
        squeeze_excitation: keep SE weights (for MODEL.EFFICIENTNET.SQUEEZE_EXCITATION True).
    Returns:
        (checkpoint, report): a Detectron2 checkpoint dict and a :class:`WeightConversionReport`.
    Raises:
        WeightConversionError: not a torchvision EfficientNet state dict, or one of another
            variant (the tensors with other shapes, missing or extra are named).
    """
    variant = variant.lower()
    state_dict = _unwrap(state_dict)
    expected = expected_backbone_shapes(variant, squeeze_excitation)
    if not any(k in expected for k in state_dict):
        raise WeightConversionError(
            f"This is not a torchvision EfficientNet state dict: none of its {len(state_dict)} "
            f"tensors is named like efficientnet_{variant}'s 'features.*' (its first names: "
            f"{list(state_dict)[:3]})."
        )

    report = WeightConversionReport(variant=variant, squeeze_excitation=squeeze_excitation)
    model, wrong_shape, unknown = {}, [], []
    for name, tensor in state_dict.items():
        if name in expected:
            if tuple(tensor.shape) != expected[name]:
                wrong_shape.append(f"'{name}' {tuple(tensor.shape)} (expected {expected[name]})")
                continue
            model[BACKBONE_PREFIX + name] = tensor
            report.converted.append(name)
            report.converted_parameters += tensor.numel()
        elif name.startswith("classifier."):
            report.skipped.setdefault("classifier", []).append(name)
        elif _SE_KEY.match(name) and not squeeze_excitation:
            report.skipped.setdefault("squeeze-excitation", []).append(name)
        else:
            unknown.append(name)
    missing = [k for k in expected if k not in state_dict]
    if wrong_shape or unknown or missing:
        guess = _guess_variant(state_dict)
        problems = []
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} tensors have other shapes: {_names(wrong_shape)}")
        if unknown:
            problems.append(f"{len(unknown)} tensors have no counterpart: {_names(unknown)}")
        if missing:
            problems.append(f"{len(missing)} tensors are missing: {_names(missing)}")
        hint = (
            f" It looks like torchvision efficientnet_{guess}: convert with --variant {guess} "
            f"and set MODEL.EFFICIENTNET.VARIANT '{guess}'."
            if guess and guess != variant
            else ""
        )
        raise WeightConversionError(
            f"The state dict does not fit EfficientPS's efficientnet_{variant} trunk"
            f"{' with squeeze-excitation' if squeeze_excitation else ''}: "
            + "; ".join(problems)
            + "."
            + hint
        )
    checkpoint = {
        "model": model,
        "__author__": f"efficientps_d2.tools.convert_torchvision_weights (efficientnet_{variant})",
        "matching_heuristics": False,
    }
    return checkpoint, report


def convert_file(input_path, output_path, variant, *, squeeze_excitation=False):
    """Reads a torchvision ``.pth``, converts it and writes the checkpoint atomically; the output
    is checked before the input is read.

    Returns:
        the :class:`WeightConversionReport`.
    """
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"Input weights '{input_path}' do not exist.")
    # Checked before reading: the output is written last.
    check_writable_file(output_path, "output checkpoint", WeightConversionError)
    if os.path.realpath(output_path) == os.path.realpath(input_path):
        raise WeightConversionError(
            f"The output '{output_path}' is the input: writing it would replace torchvision's "
            "file. Give another output file."
        )
    checkpoint, report = convert_torchvision_file(
        input_path, variant, squeeze_excitation=squeeze_excitation
    )
    atomic_write(output_path, lambda f: torch.save(checkpoint, f), remove_stale=True)
    return report


def convert_torchvision_file(path, variant, *, squeeze_excitation=False):
    """Reads torchvision's ``.pth`` at ``path`` and converts it with
    :func:`convert_torchvision_efficientnet`; every error names the file. Writes nothing.

    Returns:
        (checkpoint, report), as :func:`convert_torchvision_efficientnet`.
    Raises:
        WeightConversionError: the file cannot be read as a torch file, holds no state dict, or
            holds one that does not fit the variant.
    """
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError of an empty file has no message: say what the file is
        raise WeightConversionError(
            f"Cannot read '{path}' as a torch file: it is {describe_file(path)} "
            f"({describe_load_error(e)})."
        ) from e
    if not isinstance(state_dict, dict):
        raise WeightConversionError(
            f"'{path}' holds a {type(state_dict).__name__}, not a state dict."
        )
    try:
        return convert_torchvision_efficientnet(
            state_dict, variant, squeeze_excitation=squeeze_excitation
        )
    except WeightConversionError as e:
        raise WeightConversionError(f"'{path}': {e}") from e


def _config(config_file, opts):
    from ..config import setup_cfg

    return setup_cfg(config_file, list(opts) + ["MODEL.DEVICE", "cpu"], freeze=False)


def _check_efficientnet(cfg, config_file):
    """Refuses a config whose backbone is not EfficientNet (e.g. the ResNet-50 ones): its
    MODEL.EFFICIENTNET keys are unused defaults, so the variant would be meaningless."""
    name, bottom_up = cfg.MODEL.BACKBONE.NAME, cfg.MODEL.TWO_WAY_FPN.BOTTOM_UP
    if name == "build_efficientnet_two_way_fpn_backbone" or (
        name == "build_two_way_fpn_backbone" and bottom_up == "build_efficientnet_backbone"
    ):
        return
    raise WeightConversionError(
        f"'{config_file}' does not build on EfficientNet (MODEL.BACKBONE.NAME '{name}', "
        f"MODEL.TWO_WAY_FPN.BOTTOM_UP '{bottom_up}'): torchvision's EfficientNet weights do not "
        "fit its backbone. Its own MODEL.WEIGHTS are the ImageNet weights it starts from."
    )


def _check_against_model(cfg, output_path):
    """Loads the converted file into the config's model (the load report is logged)."""
    from detectron2.modeling import build_model

    from ..checkpoint import EfficientPSCheckpointer

    checkpointer = EfficientPSCheckpointer(build_model(cfg))
    checkpointer.load(output_path)
    return checkpointer.last_report


def get_parser():
    parser = argparse.ArgumentParser(
        prog="python -m efficientps_d2.tools.convert_torchvision_weights",
        description="Convert torchvision EfficientNet ImageNet weights into a Detectron2 "
        "checkpoint of EfficientPS's backbone (for MODEL.WEIGHTS).",
    )
    parser.add_argument("input", help="torchvision efficientnet_bN state dict (.pth)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument("--variant", choices=VARIANTS, help="EfficientNet variant, b0 ... b7")
    parser.add_argument(
        "--squeeze-excitation",
        action="store_true",
        help="keep the SE weights (only for MODEL.EFFICIENTNET.SQUEEZE_EXCITATION True)",
    )
    parser.add_argument(
        "--config-file",
        help="take the variant and SE setting from this config, and check the output by loading "
        "it into the config's model",
    )
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides")
    return parser


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 error)."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = _config(args.config_file, args.opts) if args.config_file else None
        variant, se = args.variant, args.squeeze_excitation
        if cfg is not None:
            _check_efficientnet(cfg, args.config_file)
            cfg_variant = cfg.MODEL.EFFICIENTNET.VARIANT.lower()
            if variant and variant != cfg_variant:
                raise WeightConversionError(
                    f"--variant {variant} contradicts MODEL.EFFICIENTNET.VARIANT '{cfg_variant}' "
                    f"of '{args.config_file}'."
                )
            variant, se = cfg_variant, se or cfg.MODEL.EFFICIENTNET.SQUEEZE_EXCITATION
        if not variant:
            raise WeightConversionError("Give --variant (b0 ... b7) or --config-file.")
        report = convert_file(args.input, args.output, variant, squeeze_excitation=se)
        print(report.summary())
        print(f"Wrote '{args.output}'.")
        if cfg is not None:
            report = _check_against_model(cfg, args.output)
            print(f"Checked: the model of '{args.config_file}' takes {report.loaded} tensors.")
    except (WeightConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
