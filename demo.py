#!/usr/bin/env python
"""EfficientPS demo: panoptic segmentation of images, a video or a webcam, drawn by Detectron2.

    python demo.py --config-file configs/Cityscapes-PanopticSegmentation/efficientps_b5.yaml \\
        --input images/ 'more/*.jpg' one.png --output out/ --save-panoptic \\
        --opts MODEL.WEIGHTS model_final.pth
    python demo.py --config-file CONFIG --video-input drive.mp4 --output out/drive.mp4 \\
        --opts MODEL.WEIGHTS model_final.pth
    python demo.py --config-file CONFIG --webcam --output webcam.mp4 --opts MODEL.WEIGHTS W.pth
    python demo.py --exported exported/ --input images/ --output out/

--exported runs a TorchScript or ONNX export (``python -m efficientps_d2.tools.export``) on the CPU
in place of a config and weights; class names, resizing and thresholds come from the export.

--config-file is a YAML or LazyConfig (.py) file, or a model zoo name
("Cityscapes-PanopticSegmentation/efficientps_b5.yaml"); --opts takes KEY VALUE pairs for a YAML
config, key=value for a .py one (e.g. train.init_checkpoint=model_final.pth). Class names come
from the metadata of the first test data set (DATASETS.TEST, dataloader.test.dataset.names),
else the first training one. The model runs on MODEL.DEVICE / train.device, on the CPU when CUDA
is not available. TEST.AUG.ENABLED True (train.tta.enabled=True) turns on test-time
augmentation.

Outputs: one drawing per image in the --output folder (same name; or the --output file for a single
image); for video, the --output file (or <folder>/<video name>.mp4), mp4v-coded, or MJPG .avi when
mp4v is unavailable. --save-panoptic adds COCO panoptic PNGs (<folder>/panoptic/) and
<folder>/predictions.json with the data set's category and image ids, ready for panopticapi:

    python -m panopticapi.evaluation --gt_json_file panoptic_val2017.json \\
        --gt_folder panoptic_val2017 --pred_json_file out/predictions.json \\
        --pred_folder out/panoptic

An image's id is the ground truth's: looked up by file name in --image-info (a COCO json or its
"images" list), else in the images of DATASETS.TEST[0] (its panoptic_json, or its registered
dicts), else the integer of a numeric COCO file name ("000000142238.jpg" -> 142238); files that
match none keep their stem as id (a string) and the run says so.

Exit status:
    0  at least one image processed (unreadable files are skipped and listed on stderr), or the
       video/webcam output written (also when the input ends early: the partial output is kept and
       the shortfall reported);
    1  nothing processed: no readable image, a video or webcam that cannot be opened or yields no
       frame, no usable video codec, no window to show results in without --output, an --output
       that cannot be written or would overwrite an input (checked before the model is built), a
       checkpoint that does not fit the model, an invalid configuration, or a
       --confidence-threshold outside [0, 1]; or an error while processing an image (the model's,
       writing an output): the image is named, the outputs of the images before it are kept and
       predictions.json, written with them, is named as partial (its "info" says so too);
    2  invalid command line;
    130  interrupted (Ctrl-C): a video output keeps the frames written so far and is named, and
       so is a partial predictions.json.
"""

import argparse
import functools
import sys
import traceback

from efficientps_d2.config_adapter import ConfigAdapter
from efficientps_d2.demo import (
    ImageIds,
    ImageRunError,
    VisualizationDemo,
    check_image_outputs,
    collect_images,
    display_available,
    open_video,
    open_webcam,
    run_on_images,
    run_on_video,
    video_output_path,
)
from efficientps_d2.engine import load_config
from efficientps_d2.engine.lazy_config import INFERENCE_PARTS
from efficientps_d2.export import ExportedPredictor
from efficientps_d2.export import load as load_export


def get_parser():
    parser = argparse.ArgumentParser(description="EfficientPS panoptic segmentation demo")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--config-file", metavar="FILE", help="config file or model zoo name")
    model.add_argument(
        "--exported",
        metavar="PATH",
        help="an exported model (folder of python -m efficientps_d2.tools.export) to run instead",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", nargs="+", help="image files, folders or glob patterns ('imgs/*.jpg')"
    )
    source.add_argument("--video-input", help="a video file")
    source.add_argument(
        "--webcam", nargs="?", type=int, const=0, metavar="INDEX", help="a camera (default 0)"
    )
    parser.add_argument(
        "--output",
        help="folder for the image drawings (or a file for a single image); video: file or folder."
        " Without it the results are shown in a window.",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        help="minimum detection score: sets MODEL.ROI_HEADS.SCORE_THRESH_TEST and "
        "MODEL.PANOPTIC_FUSION.CONFIDENCE_THRESH",
    )
    parser.add_argument(
        "--save-panoptic",
        action="store_true",
        help="also write COCO panoptic PNGs and predictions.json (needs --output)",
    )
    parser.add_argument(
        "--image-info",
        metavar="JSON",
        help="with --save-panoptic: a COCO json (or its 'images' list) giving each image file's "
        "id in predictions.json",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides: KEY VALUE pairs (YAML) or key=value (.py)",
    )
    return parser


def build_config(args):
    """The config of --config-file (YAML or LazyConfig) with --opts, then what
    --confidence-threshold sets."""
    threshold = args.confidence_threshold
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--confidence-threshold must be a score in [0, 1], got {threshold}.")
    cfg = load_config(args.config_file, args.opts, INFERENCE_PARTS)
    if threshold is not None:
        config = ConfigAdapter(cfg)
        config.set("score_thresh_test", threshold)
        config.set("fusion_confidence_thresh", threshold)
    return cfg


def main(argv=None):
    """Runs the demo; returns the exit status (see the module docstring)."""
    args = get_parser().parse_args(argv)
    if args.save_panoptic and not args.output:
        return _fail("--save-panoptic needs --output.")
    if args.image_info and not (args.save_panoptic and args.input):
        return _fail("--image-info names the image ids of --save-panoptic with --input.")
    show = not args.output
    if show and not display_available():
        return _fail("No window can be opened here (headless OpenCV or no display): use --output.")
    if args.exported and (args.opts or args.confidence_threshold is not None):
        return _fail(
            "--opts and --confidence-threshold do not apply to --exported: the export fixed the "
            "config and thresholds; export again with the settings you want."
        )
    try:
        if args.exported:
            exported = ExportedPredictor(load_export(args.exported))
            make_demo = functools.partial(VisualizationDemo, predictor=exported)
        else:
            cfg = build_config(args)
            make_demo = functools.partial(VisualizationDemo, cfg)
        if args.input:
            paths, problems = collect_images(args.input)
            if not paths:
                return _fail(_problem_lines("No image to process.", problems))
            if args.output:  # before the model is built
                check_image_outputs(args.output, paths, args.save_panoptic)
            image_ids = ImageIds.from_json(args.image_info) if args.image_info else None
            demo = make_demo()
            if args.save_panoptic and image_ids is None and demo.dataset_name:
                image_ids = ImageIds.from_dataset(demo.dataset_name, demo.metadata)
            summary = run_on_images(
                demo,
                paths,
                args.output,
                save_panoptic=args.save_panoptic,
                show=show,
                problems=problems,
                image_ids=image_ids,
            )
            print(summary.report(), file=sys.stderr if summary.skipped else sys.stdout)
            return 0 if summary.processed else 1
        name = args.video_input or f"webcam{args.webcam}"
        if args.output:  # before the model is built
            video_output_path(args.output, name)
        if args.video_input:
            capture = open_video(args.video_input)
        else:
            capture = open_webcam(args.webcam)
        try:
            demo = make_demo()
        except BaseException:
            capture.release()
            raise
        summary = run_on_video(
            demo, capture, name, args.output, save_panoptic=args.save_panoptic, show=show
        )
        print(summary.report(), file=sys.stdout if summary.complete else sys.stderr)
        if summary.stopped == "interrupted":  # Ctrl-C: the partial output is kept, and named
            if summary.output:
                print(f"Interrupted: '{summary.output}' is partial.", file=sys.stderr)
            return _INTERRUPTED
        return 0
    except KeyboardInterrupt:  # each file written is complete; a partial json is named
        print("Interrupted.", file=sys.stderr)
        return _INTERRUPTED
    except ImageRunError as e:  # what was written before the image at fault is kept, and said
        print(e.summary.report(), file=sys.stderr)
        if not isinstance(e.__cause__, _READABLE):  # a fault of the code: where it lies
            cause = e.__cause__  # the three-argument form: Python 3.8 and 3.9 need it
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        return _fail(str(e))
    except _READABLE as e:  # readable messages
        return _fail(str(e))


_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)
_READABLE = (RuntimeError, ValueError, OSError, ImportError)  # errors shown by their message


def _problem_lines(title, problems):
    return "\n".join([title] + [f"  {path}: {reason}" for path, reason in problems])


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger(name="detectron2")
    setup_logger(name="efficientps_d2")
    sys.exit(main())
