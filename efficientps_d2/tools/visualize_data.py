"""Draws a config's training data, with the flags and output of Detectron2's
``tools/visualize_data.py``::

    python -m efficientps_d2.tools.visualize_data --config-file CONFIG \\
        --source {annotation,dataloader} --output-dir DIR [--show] [--max-images N] [OPTS ...]

- ``annotation``: each image of the training data sets with its panoptic annotation as stored
  (Detectron2's ``Visualizer.draw_dataset_dict``: segments with class names), saved under the
  image's file name (``_1``, ``_2``, ... added where images of two folders share one). Images
  or annotations that cannot be read are skipped with a warning that names them.
- ``dataloader``: what the model is trained on, after EfficientPS's mapper and augmentations: the
  all-class semantic target, then the thing instances (boxes, masks, class names), saved as
  ``<image_id>.jpg``. Detectron2's tool loops until interrupted; here one pass over the data set
  (or ``--max-images``) ends it.

``--show`` opens a window per image instead of saving (any key for the next). YAML and LazyConfig
(``.py``) configs are both accepted.
"""

import argparse
import logging
import os
import sys
from itertools import chain

import numpy as np

from ..atomic_io import atomic_write, check_writable_folder, remove_stale_temporaries

__all__ = ["get_parser", "main"]

logger = logging.getLogger("detectron2")


def get_parser():
    parser = argparse.ArgumentParser(
        prog="python -m efficientps_d2.tools.visualize_data",
        description="Visualize ground-truth data",
    )
    parser.add_argument(
        "--source",
        choices=["annotation", "dataloader"],
        required=True,
        help="visualize the annotations or the data loader (with pre-processing)",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--output-dir", default="./", help="path to output directory")
    parser.add_argument("--show", action="store_true", help="show output in a window")
    parser.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="stop after this many images (default: one pass over the training data sets)",
    )
    parser.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="config overrides: 'KEY VALUE' pairs (YAML) or 'key=value' (.py)",
    )
    return parser


def _setup(args):
    from ..config_adapter import ConfigAdapter
    from ..engine.lazy_config import is_lazy_config, load_config

    opts = list(args.opts or [])
    lazy = is_lazy_config(args.config_file)
    # One process: the tool reads images in order, as Detectron2's does.
    opts += ["dataloader.train.num_workers=0"] if lazy else ["DATALOADER.NUM_WORKERS", "0"]
    return ConfigAdapter(load_config(args.config_file, opts, needs=["dataloader.train"]))


def _output(vis, fname, args):
    if args.show:
        import cv2

        cv2.imshow("window", vis.get_image()[:, :, ::-1])
        cv2.waitKey()
    else:
        filepath = os.path.join(args.output_dir, fname)
        print("Saving to {} ...".format(filepath))
        atomic_write(filepath, vis.save, mode=None)


def _annotations(config, metadata, args):
    import tqdm
    from detectron2.data import DatasetCatalog
    from detectron2.utils.visualizer import Visualizer

    from ..data.image_files import ImageInputError, read_image
    from ..data.metadata import with_isthing
    from ..demo.runner import unique_stems

    dicts = list(chain.from_iterable(DatasetCatalog.get(k) for k in config.train_dataset_names))
    if args.max_images is not None:
        dicts = dicts[: args.max_images]
    # Named after the image, "_1", "_2", ... added where images of two folders share a name.
    stems = unique_stems([d["file_name"] for d in dicts])
    skipped = 0
    for dic in tqdm.tqdm(dicts):
        if "segments_info" in dic:  # Detectron2's Cityscapes dicts have no "isthing"
            dic = dict(dic, segments_info=with_isthing(dic["segments_info"], metadata))
        try:
            img = read_image(dic["file_name"], "RGB")
            vis = Visualizer(img, metadata=metadata).draw_dataset_dict(dic)
        except (OSError, ImageInputError) as e:  # PIL's errors do not always name the file
            skipped += 1
            annotation = dic.get("pan_seg_file_name") or dic.get("sem_seg_file_name")
            logger.warning(
                f"Skipped '{dic['file_name']}'"
                + (f" (annotation '{annotation}')" if annotation else "")
                + f": cannot be read ({type(e).__name__}: {e})."
            )
            continue
        _output(vis, stems[dic["file_name"]] + os.path.splitext(dic["file_name"])[1], args)
    if skipped:
        logger.warning(f"Skipped {skipped} of {len(dicts)} images that cannot be read.")
    return len(dicts) - skipped


def _dataloader(config, metadata, args):
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.utils.visualizer import Visualizer

    from ..data.metadata import thing_semantic_ids

    thing_ids = thing_semantic_ids(metadata)
    limit = args.max_images
    if limit is None:
        limit = sum(len(DatasetCatalog.get(k)) for k in config.train_dataset_names)
    done = 0
    for batch in config.build_train_loader():
        for per_image in batch:
            if done >= limit:
                return done
            img = per_image["image"].permute(1, 2, 0).cpu().numpy()
            img = utils.convert_image_to_rgb(img, config.input_format)
            visualizer = Visualizer(img, metadata=metadata)
            # Thing pixels are drawn as instances below; the semantic map shows the stuff.
            sem_seg = per_image["sem_seg"].numpy()
            visualizer.draw_sem_seg(np.where(np.isin(sem_seg, thing_ids), 255, sem_seg), alpha=0.5)
            target = per_image["instances"].get_fields()
            # Mask R-CNN class k is the k-th thing in all-class order; names are all-class.
            labels = [metadata.thing_classes[thing_ids[int(k)]] for k in target["gt_classes"]]
            vis = visualizer.overlay_instances(
                labels=labels,
                boxes=target.get("gt_boxes", None),
                masks=target.get("gt_masks", None),
            )
            _output(vis, str(per_image.get("image_id", done)) + ".jpg", args)
            done += 1
    return done


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok)."""
    from detectron2.data import MetadataCatalog
    from detectron2.utils.logger import setup_logger

    args = get_parser().parse_args(argv)
    if not args.show:  # os.makedirs would say only "File exists" or "Not a directory"
        check_writable_folder(args.output_dir, "--output-dir", SystemExit)
    setup_logger()
    logger.info("Arguments: " + str(args))
    config = _setup(args)
    names = config.train_dataset_names
    if not names:
        raise SystemExit(f"'{args.config_file}' names no training data set to visualize.")
    if not args.show:  # --show writes nothing
        os.makedirs(args.output_dir, exist_ok=True)
        remove_stale_temporaries(args.output_dir)  # what killed runs left (never read)
    metadata = MetadataCatalog.get(names[0])
    if args.source == "annotation":
        count = _annotations(config, metadata, args)
    else:
        count = _dataloader(config, metadata, args)
    logger.info(f"Visualized {count} images" + ("." if args.show else f" into {args.output_dir}."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
