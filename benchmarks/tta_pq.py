#!/usr/bin/env python
"""Panoptic quality of EfficientPS without and with test-time augmentation on one data set.

    python benchmarks/tta_pq.py \\
        --config-file configs/Cityscapes-PanopticSegmentation/efficientps_b5.yaml \\
        --weights output/model_final.pth                # data set: DATASETS.TEST[0]
    python benchmarks/tta_pq.py --config-file CONFIG --weights W --dataset NAME --max-images 100
    # a COCO-panoptic-format data set that is not registered yet:
    python benchmarks/tta_pq.py --config-file CONFIG --weights W \\
        --panoptic-json val.json --panoptic-root val_png/ --image-root images/
    # other TTA settings (defaults: TEST.AUG.* of the config):
    python benchmarks/tta_pq.py ... --opts TEST.AUG.MIN_SIZES "[768,1024,1280]"

Both runs use the same weights, data loader (the project's test-time mapper) and Detectron2's
``COCOPanopticEvaluator``; the script prints PQ/SQ/RQ (all, things, stuff) for both and their
difference, and with --output-json writes them as json. ``evaluate_plain_and_tta`` does the same
from Python.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOPanopticEvaluator, inference_on_dataset
from detectron2.modeling import build_model

from efficientps_d2 import setup_cfg
from efficientps_d2.atomic_io import atomic_write, check_writable_file, check_writable_folder
from efficientps_d2.checkpoint import EfficientPSCheckpointer
from efficientps_d2.config import tta_config
from efficientps_d2.data import register_panoptic_dataset
from efficientps_d2.modeling.test_time_augmentation import EfficientPSWithTTA

logger = logging.getLogger("efficientps_d2.benchmarks.tta_pq")

METRICS = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")


def _test_mapper(cfg):
    try:
        from efficientps_d2.data.dataset_mapper import EfficientPSDatasetMapper
    except ImportError:  # Detectron2's gives image/height/width, all that inference needs
        from detectron2.data import DatasetMapper

        return DatasetMapper(cfg, is_train=False)
    return EfficientPSDatasetMapper(cfg, is_train=False)


def evaluate_plain_and_tta(cfg, dataset_name, *, max_images=None, output_dir=None):
    """PQ of ``cfg``'s model (weights: cfg.MODEL.WEIGHTS) without and with TTA.

    Args:
        cfg: an EfficientPS config; TTA uses its TEST.AUG settings.
        dataset_name: a registered panoptic data set (metadata with panoptic_json/panoptic_root).
        max_images: evaluate only the first N images.
        output_dir: where the evaluator writes its predictions ("plain/", "tta/").
    Returns:
        {"plain": {...}, "tta": {...}}: COCOPanopticEvaluator's "panoptic_seg" results.
    """
    model = build_model(cfg)
    EfficientPSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    mapper = _test_mapper(cfg)
    with tempfile.TemporaryDirectory() as temp:
        with _first_images(dataset_name, max_images, temp) as (name, dataset):
            loader = build_detection_test_loader(
                dataset=dataset, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
            )
            results = {}
            for key, runner in (("plain", model), ("tta", EfficientPSWithTTA(cfg, model))):
                folder = os.path.join(output_dir, key) if output_dir else None
                evaluator = COCOPanopticEvaluator(name, folder)
                logger.info(f"Evaluating {key} inference on '{dataset_name}' ...")
                results[key] = inference_on_dataset(runner, loader, evaluator)["panoptic_seg"]
    return results


@contextlib.contextmanager
def _first_images(dataset_name, max_images, folder):
    """Yields (name, dataset dicts) of the first ``max_images`` images of ``dataset_name``: the
    data set itself where that is all of it, else those images registered as a data set of their
    own while the block runs, with a ground-truth json (written into ``folder``) of those images
    only, as panopticapi wants a prediction for every ground-truth image."""
    dataset = DatasetCatalog.get(dataset_name)
    if not max_images or max_images >= len(dataset):
        yield dataset_name, dataset
        return
    dataset = dataset[:max_images]
    metadata = MetadataCatalog.get(dataset_name)
    with open(metadata.panoptic_json) as f:
        ground_truth = json.load(f)
    kept = {d["image_id"] for d in dataset}
    for key in ("images", "annotations"):
        id_key = "id" if key == "images" else "image_id"
        ground_truth[key] = [x for x in ground_truth[key] if x[id_key] in kept]
    name = f"{dataset_name}_first_{max_images}"
    panoptic_json = os.path.join(folder, f"{name}.json")
    with open(panoptic_json, "w") as f:
        json.dump(ground_truth, f)
    DatasetCatalog.register(name, lambda: dataset)
    fields = {k: v for k, v in metadata.as_dict().items() if k != "name"}
    MetadataCatalog.get(name).set(**dict(fields, panoptic_json=panoptic_json))
    try:
        yield name, dataset
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def format_table(results, cfg):
    tta = tta_config(cfg)
    lines = [
        f"TTA: min sizes {list(tta.MIN_SIZES)}, max size {tta.MAX_SIZE}, flip {tta.FLIP}",
        f"{'':<8}" + "".join(f"{m:>8}" for m in METRICS),
    ]
    for key in ("plain", "tta"):
        lines.append(f"{key:<8}" + "".join(f"{results[key][m]:8.2f}" for m in METRICS))
    lines.append(
        f"{'delta':<8}"
        + "".join(f"{results['tta'][m] - results['plain'][m]:+8.2f}" for m in METRICS)
    )
    return "\n".join(lines)


def get_parser():
    parser = argparse.ArgumentParser(description="PQ without and with test-time augmentation")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", required=True, help="checkpoint (sets MODEL.WEIGHTS)")
    parser.add_argument("--dataset", help="registered data set (default: DATASETS.TEST[0])")
    parser.add_argument("--panoptic-json", help="register a COCO panoptic json to evaluate on")
    parser.add_argument("--panoptic-root", help="its folder of panoptic PNGs")
    parser.add_argument("--image-root", help="its folder of images")
    parser.add_argument("--max-images", type=int, help="evaluate the first N images only")
    parser.add_argument("--output-dir", help="folder for the evaluators' predictions")
    parser.add_argument("--output-json", help="write both results to this json")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.output_json:  # before both evaluations, not after them
        check_writable_file(args.output_json, "--output-json", error=SystemExit)
    if args.output_dir:  # its "tta" folder was made after the plain evaluation
        check_writable_folder(args.output_dir, "--output-dir", error=SystemExit)
    cfg = setup_cfg(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", args.weights])
    dataset = args.dataset
    custom = (args.panoptic_json, args.panoptic_root, args.image_root)
    if any(custom):
        if not all(custom):
            raise SystemExit("--panoptic-json, --panoptic-root and --image-root go together.")
        dataset = dataset or "tta_pq_" + os.path.splitext(os.path.basename(args.panoptic_json))[0]
        register_panoptic_dataset(
            dataset,
            image_root=args.image_root,
            panoptic_root=args.panoptic_root,
            panoptic_json=args.panoptic_json,
        )
    if dataset is None:
        if not cfg.DATASETS.TEST:
            raise SystemExit("Name a data set: --dataset, or DATASETS.TEST in the config.")
        dataset = cfg.DATASETS.TEST[0]
    results = evaluate_plain_and_tta(
        cfg, dataset, max_images=args.max_images, output_dir=args.output_dir
    )
    print(f"Data set '{dataset}', weights '{args.weights}'")
    print(format_table(results, cfg))
    if args.output_json:
        output = {"dataset": dataset, "weights": args.weights, **results}
        atomic_write(
            args.output_json, lambda f: json.dump(output, f, indent=2), mode="w", remove_stale=True
        )
    return results


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="efficientps_d2")
    main()
    sys.exit(0)
