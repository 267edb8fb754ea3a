"""Parameters, FLOPs, activations and structure of an EfficientPS config's model, with the flags and
output of Detectron2's ``tools/analyze_model.py``::

    python -m efficientps_d2.tools.analyze_model --config-file CONFIG --tasks parameter flop \\
        [--num-inputs N] [KEY VALUE ... | key=value ...]

``flop`` and ``activation`` run the model (eval mode, weights from MODEL.WEIGHTS or
``train.init_checkpoint``) on the first ``--num-inputs`` images of the first test data set, through
Detectron2's ``FlopCountAnalysis`` / ``activation_count_operators`` (fvcore: one fused multiply-add
counts as one flop). Counts depend on the input size and on how many detections reach the ROI heads.
YAML and LazyConfig (``.py``) configs are both accepted.
"""

import logging
import sys
from collections import Counter

import numpy as np
import torch
from detectron2.utils.logger import setup_logger

__all__ = ["TASKS", "get_parser", "main"]

logger = logging.getLogger("detectron2")

TASKS = ("flop", "activation", "parameter", "structure")


def get_parser():
    """Detectron2's ``default_argument_parser`` (--config-file, opts, ...) plus its analyze_model
    flags --tasks and -n/--num-inputs."""
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser(
        epilog="Examples:\n  python -m efficientps_d2.tools.analyze_model --config-file "
        "configs/Cityscapes-PanopticSegmentation/efficientps_b5.yaml --tasks parameter flop "
        "-n 2 MODEL.WEIGHTS ''"
    )
    parser.prog = "python -m efficientps_d2.tools.analyze_model"
    # No argparse choices: "--tasks" takes one or more words and would swallow the config overrides
    # after it ("--tasks parameter MODEL.WEIGHTS ''"); split_tasks hands those back to opts.
    parser.add_argument(
        "--tasks",
        required=True,
        nargs="+",
        metavar="{" + ",".join(TASKS) + "}",
        help="what to report",
    )
    parser.add_argument(
        "-n", "--num-inputs", default=100, type=int, help="inputs to average flops/activations over"
    )
    return parser


def split_tasks(parser, args):
    """Moves the config overrides that ``--tasks`` took in (its words after the last task) to the
    front of ``args.opts``; any other word that is not a task is an error naming the choices."""
    tasks = list(args.tasks)
    for i, word in enumerate(tasks):
        if word in TASKS:
            continue
        # A YAML KEY (MODEL.WEIGHTS, SEED: upper case) or a key=value: the overrides start.
        if i > 0 and ("." in word or "=" in word or word.isupper()):
            args.tasks, args.opts = tasks[:i], tasks[i:] + list(args.opts or [])
            return args
        parser.error(f"argument --tasks: invalid choice: '{word}' (choose from {', '.join(TASKS)})")
    return args


def _load(args):
    from ..config_adapter import ConfigAdapter
    from ..engine.lazy_config import INFERENCE_PARTS, load_config

    config = ConfigAdapter(load_config(args.config_file, args.opts or [], INFERENCE_PARTS))
    model = config.build_model()
    if config.weights:
        config.checkpointer(model).load(config.weights)
    if hasattr(model, "fast_inference"):
        # Count the architecture's own modules, BatchNorm included: the fast inference copy
        # (MODEL.EFFICIENTPS.FAST_INFERENCE) has it folded into the convs.
        model.fast_inference = False
    return config, model.eval()


def _inputs(config, num_inputs):
    for idx, data in zip(range(num_inputs), config.build_test_loader()):
        yield idx, data


def do_flop(config, model, num_inputs):
    from detectron2.utils.analysis import FlopCountAnalysis
    from fvcore.nn import flop_count_table

    counts, totals = Counter(), []
    for idx, data in _inputs(config, num_inputs):
        flops = FlopCountAnalysis(model, data)
        if idx > 0:
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counts += flops.by_operator()
        totals.append(flops.total())
        if idx == 0:
            table = flop_count_table(flops)
    logger.info("Flops table computed from only one input sample:\n" + table)
    logger.info(
        "Average GFlops for each type of operators:\n"
        + str([(k, v / len(totals) / 1e9) for k, v in counts.items()])
    )
    logger.info("Total GFlops: {:.1f}±{:.1f}".format(np.mean(totals) / 1e9, np.std(totals) / 1e9))
    return totals


def do_activation(config, model, num_inputs):
    # Detectron2's activation_count_operators traces outputs that must all be tensors, and
    # panoptic_seg's segments_info are dicts: count with fvcore directly, non-tensor outputs
    # allowed and the same element-wise ops ignored, as Detectron2's FlopCountAnalysis does.
    from detectron2.export import TracingAdapter
    from detectron2.utils.analysis import _IGNORED_OPS
    from fvcore.nn import ActivationCountAnalysis

    counts, totals = Counter(), []
    for idx, data in _inputs(config, num_inputs):
        inputs = [{"image": data[0]["image"]}]
        wrapper = TracingAdapter(model, inputs, allow_non_tensor=True)
        analysis = ActivationCountAnalysis(wrapper, (inputs[0]["image"],))
        analysis.set_op_handle(**{k: None for k in _IGNORED_OPS})
        if idx > 0:
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        count = {k: v / 1e6 for k, v in analysis.by_operator().items()}
        counts += count
        totals.append(sum(count.values()))
    logger.info(
        "(Million) Activations for Each Type of Operators:\n"
        + str([(k, v / len(totals)) for k, v in counts.items()])
    )
    logger.info("Total (Million) Activations: {}±{}".format(np.mean(totals), np.std(totals)))
    return totals


def do_parameter(model):
    from detectron2.utils.analysis import parameter_count_table

    logger.info("Parameter Count:\n" + parameter_count_table(model, max_depth=5))
    return sum(p.numel() for p in model.parameters())


def do_structure(model):
    logger.info("Model Structure:\n" + str(model))


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok)."""
    parser = get_parser()
    args = split_tasks(parser, parser.parse_args(argv))
    if not args.config_file:
        parser.error("--config-file is required.")
    if args.num_inputs < 1 and {"flop", "activation"} & set(args.tasks):
        # No input: flop stopped with UnboundLocalError, activation printed "nan±nan".
        parser.error(f"argument -n/--num-inputs: must be at least 1, got {args.num_inputs}.")
    setup_logger(name="fvcore")
    setup_logger()
    logger.info("Command line arguments: " + str(args))
    config, model = _load(args)
    for task in args.tasks:
        with torch.no_grad():
            if task == "flop":
                do_flop(config, model, args.num_inputs)
            elif task == "activation":
                do_activation(config, model, args.num_inputs)
            elif task == "parameter":
                do_parameter(model)
            else:
                do_structure(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
