"""Exporting an EfficientPS model to TorchScript (tracing) or ONNX.

An export is a folder with the model file (``model.ts`` or ``model.onnx``) and
``efficientps_export.json``: the export format and its version, the backend, the classes (names,
colours, which are things, thing -> semantic ids, dataset id maps), the input format, pixel
mean/std, size divisibility, test-time resizing, the fusion thresholds and the versions that wrote
it. :func:`efficientps_d2.export.load` reads it back.

The graph (:class:`~efficientps_d2.export.graph.EfficientPSGraph`, of a copy of the model with
its BatchNorms folded into the convs) is recorded by tracing Detectron2-style: ``torch.jit.trace``
under Detectron2's ``patch_builtin_len`` (so that the number of proposals and detections stays a
traced value), on the CPU. Image sizes are traced values throughout (Detectron2's ImageList,
anchors and poolers compute with them as tensors), so the graph takes any height and width;
``export_model`` checks that on a second, differently sized image before writing anything. ONNX
goes through the same trace (``torch.onnx.export`` with ``dynamo=False``) with dynamic height,
width and number of detections.
"""

import copy
import json
import logging
import os
import warnings
from typing import Dict, Optional

import torch
from detectron2.data import transforms as T
from detectron2.export.torchscript_patch import patch_builtin_len
from PIL import Image

from ..atomic_io import atomic_directory, check_writable_folder, remove_stale_temporaries_of
from ..config_adapter import ConfigAdapter
from ..modeling.fast_inference import fold_batch_norms
from .graph import OUTPUT_NAMES, EfficientPSGraph
from .runtime import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, MODEL_FILES

__all__ = [
    "check_export_folder",
    "export_model",
    "FORMATS",
    "MIN_SAMPLE_SIZE",
    "ONNX_OPSET",
    "resize_for_export",
]

logger = logging.getLogger(__name__)

FORMATS = tuple(MODEL_FILES)
# torchvision's ROIAlign with aligned=True (Detectron2's ROIAlignV2) needs opset 16.
ONNX_OPSET = 17
# The smallest height and width to trace on.
MIN_SAMPLE_SIZE = 32


def _check_model(model):
    from ..modeling.meta_arch import EfficientPS

    if not isinstance(model, EfficientPS):
        raise TypeError(f"Only EfficientPS models can be exported, got {type(model).__name__}.")
    if model.training:
        raise ValueError("Put the model in eval mode (model.eval()) before exporting it.")
    if model.device.type != "cpu":
        raise ValueError(
            f"Export from the CPU (the trace records devices): the model is on {model.device}; "
            "use MODEL.DEVICE cpu or model.cpu()."
        )
    dtype = model.inference_options.dtype
    if dtype != "float32":
        logger.warning(
            f"The model runs inference in {dtype} (MODEL.EFFICIENTPS.INFERENCE_DTYPE / "
            "model.inference_dtype); the exported graph runs in float32, so its outputs differ "
            f"from this model's by {dtype}'s rounding (detections near a threshold included)."
        )


def resize_for_export(cfg):
    """(min_size, max_size) of the config's test-time resize, as the runtime redoes it.

    An export records one shortest-edge resize (:class:`ExportedPredictor` rebuilds it): the one
    of INPUT.MIN/MAX_SIZE_TEST, or a ``dataloader.test.mapper.augmentations`` of one
    ``ResizeShortestEdge`` with a single short edge length, or none at all ((0, 0): no resizing).
    Raises ValueError naming the key for anything else.
    """
    config = ConfigAdapter(cfg)
    augmentations = config.build_test_augmentations()
    if not augmentations:
        return 0, 0
    resize = augmentations[0]
    if (
        len(augmentations) == 1
        and type(resize) is T.ResizeShortestEdge
        and len(set(resize.short_edge_length)) == 1
        and resize.interp == Image.BILINEAR
    ):
        return int(resize.short_edge_length[0]), int(resize.max_size)
    where = (
        "INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST"
        if config.is_yaml
        else "dataloader.test.mapper.augmentations"
    )
    raise ValueError(
        f"The test-time resizing ({where}) is {augmentations}: an export can only record one "
        "bilinear ResizeShortestEdge with a single short edge length (or no resizing), which "
        "the exported predictor applies before the graph."
    )


def _manifest(model, resize, backend: str, metadata, dataset_name) -> Dict:
    """What the runtime needs beside the graph, read from the model itself (so that a YAML and a
    LazyConfig config describe their model the same way) and the config's test resizing."""
    import detectron2

    from .. import __version__

    meta = {}
    for key in ("thing_classes", "stuff_classes", "thing_colors", "stuff_colors"):
        value = getattr(metadata, key, None)
        if value is not None:
            meta[key] = [list(map(int, v)) if key.endswith("colors") else str(v) for v in value]
    for key in ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id"):
        value = getattr(metadata, key, None)
        if value is not None:
            meta[key] = [[int(k), int(v)] for k, v in value.items()]
    num_classes = int(model.sem_seg_head.num_classes)
    thing_ids = [int(i) for i in model.thing_semantic_ids]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "model_file": MODEL_FILES[backend],
        "inputs": {
            "image": "float32 (3, H, W) in INPUT.FORMAT, as Detectron2's read_image gives it "
            "(0-255; YUV-BT.601: Y 0-1)"
        },
        "outputs": list(OUTPUT_NAMES),
        "num_classes": num_classes,
        "thing_semantic_ids": thing_ids,
        "is_thing": [c in set(thing_ids) for c in range(num_classes)],
        "dataset_name": dataset_name,
        "metadata": meta,
        "input_format": model.input_format,
        "pixel_mean": [float(v) for v in model.pixel_mean.flatten()],
        "pixel_std": [float(v) for v in model.pixel_std.flatten()],
        "size_divisibility": int(model.backbone.size_divisibility),
        "min_size_test": resize[0],
        "max_size_test": resize[1],
        "score_thresh_test": float(model.roi_heads.box_predictor.test_score_thresh),
        "fusion": {
            "confidence_thresh": float(model.confidence_thresh),
            "overlap_thresh": float(model.overlap_thresh),
            "stuff_area_limit": int(model.stuff_area_limit),
            "mask_logit_scale": float(model.mask_logit_scale),
        },
        "versions": {
            "efficientps_d2": __version__,
            "torch": torch.__version__,
            "detectron2": detectron2.__version__,
        },
    }


def _trace(graph, image):
    with torch.no_grad(), patch_builtin_len(), warnings.catch_warnings():
        # The tracer warns about every Python bool/int it sees (asserts, shape checks); the graph
        # is checked on a second image size instead.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)
        return torch.jit.trace(graph, (image,), check_trace=False)


def _check_image(image):
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"The sample image must be a (3, H, W) tensor, got {shape}.")
    if min(image.shape[1:]) < MIN_SAMPLE_SIZE:
        raise ValueError(
            f"The sample image must be at least {MIN_SAMPLE_SIZE} x {MIN_SAMPLE_SIZE}, got "
            f"{tuple(image.shape)}."
        )
    return image.detach().to(dtype=torch.float32, device="cpu").contiguous()


def check_export_folder(output_dir):
    """Refuses an ``output_dir`` that an export cannot make (a file, or a path under one), cannot
    write (it, or the folder above it, where the export is written first, is read-only) or would
    overwrite with loss: a folder that holds no export, or an export folder that holds other
    files too (the export replaces the whole folder, so they would be deleted with it: the
    weights being exported, notes, ...). The export tool calls it before the model is built."""
    check_writable_folder(output_dir, "--output")
    check_writable_folder(output_dir, "--output", replaced=True)  # the folder above it too
    names = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else set()
    if not names:
        return
    if MANIFEST_NAME not in names:
        raise ValueError(
            f"--output '{output_dir}' is a non-empty folder that holds no EfficientPS export: "
            "refusing to overwrite it."
        )
    others = sorted(names - {MANIFEST_NAME, *MODEL_FILES.values()})
    if others:
        raise ValueError(
            f"--output '{output_dir}' holds an EfficientPS export and other files too {others}: "
            "a new export replaces the whole folder and would delete them. Move them out, or "
            "export to another folder."
        )


def _compare(graph, traced, image, what):
    """Raises if the traced graph's outputs differ from the eager graph's on ``image``."""
    with torch.no_grad():
        expected = graph(image)
        got = traced(image)
    for name, a, b in zip(OUTPUT_NAMES, expected, got):
        if a.shape != b.shape or (
            a.numel() and not torch.allclose(a.float(), b.float(), 1e-3, 1e-3)
        ):
            raise RuntimeError(
                f"The traced graph does not reproduce the model on {what} (output '{name}': "
                f"{tuple(a.shape)} eager vs {tuple(b.shape)} traced): this model cannot be "
                "exported by tracing."
            )


def export_model(
    model,
    cfg,
    output_dir: str,
    export_format: str = "torchscript",
    *,
    sample_image: Optional[torch.Tensor] = None,
    metadata=None,
    dataset_name: Optional[str] = None,
) -> str:
    """Exports ``model`` (an eval-mode EfficientPS on the CPU, built from ``cfg``, a YAML or a
    LazyConfig config) to a folder.

    Args:
        export_format: "torchscript" or "onnx".
        sample_image: float (3, H, W) image to trace with, in INPUT.FORMAT (0-255); default: a
            random 3 x 256 x 384 image (the network is traced, not its values).
        metadata, dataset_name: class names/colours/id maps stored for the runtime; default: from
            DATASETS.TEST/TRAIN or the LazyConfig's data loaders (as the demo resolves them).
    The test resizing that the runtime applies comes from ``cfg`` (see :func:`resize_for_export`).

    Returns:
        the path of the written model file. The folder is written atomically: on failure nothing
        is left behind (but the parent folders it made), and an existing export in
        ``output_dir`` is replaced only on success. A folder that holds anything but an export is
        refused before any work, and so is one that cannot be written; what killed exports to
        ``output_dir`` left beside it is removed, so one process at a time exports to a folder.
    """
    if export_format not in FORMATS:
        raise ValueError(f"Unknown export format '{export_format}'; expected one of {FORMATS}.")
    _check_model(model)
    if export_format == "onnx":
        _require_onnx()  # before the trace, which takes minutes for B5 at full size
    resize = resize_for_export(cfg)
    if metadata is None:
        from ..demo.predictor import resolve_metadata

        metadata, dataset_name = resolve_metadata(cfg)
    if sample_image is None:
        generator = torch.Generator().manual_seed(0)
        sample_image = torch.randint(0, 256, (3, 256, 384), generator=generator).float()
    image = _check_image(sample_image)
    check_export_folder(output_dir)

    # Workspaces of killed exports to the same folder: never read, only taking space.
    remove_stale_temporaries_of(output_dir)
    # The folder's workspace is made first: a folder that cannot be written fails now, not after
    # the trace (minutes for B5 at full size).
    with atomic_directory(output_dir, overwrite=True) as folder:
        # Traced from a copy with every BatchNorm folded into its conv (in float64), as the eager
        # model's default inference path (FAST_INFERENCE) runs it: no BatchNorm op left in the
        # graph, B5 at 1024x2048 under TorchScript 3.5 s instead of 4.6 s on 2 CPU cores.
        graph = copy.deepcopy(EfficientPSGraph(model)).eval()
        fold_batch_norms(graph)
        traced = _trace(graph, image)
        # A second size, neither the traced one nor a multiple of the size divisibility.
        other = torch.nn.functional.interpolate(
            image[None], size=(image.shape[1] * 3 // 4 + 5, image.shape[2] * 5 // 4 + 3)
        )[0].round()
        _compare(graph, traced, other, f"an image of another size {tuple(other.shape[1:])}")

        os.mkdir(folder)
        model_path = os.path.join(folder, MODEL_FILES[export_format])
        if export_format == "torchscript":
            traced.save(model_path)
        else:
            _export_onnx(graph, image, model_path)
        manifest = _manifest(model, resize, export_format, metadata, dataset_name)
        with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    path = os.path.join(output_dir, MODEL_FILES[export_format])
    logger.info(f"Exported EfficientPS ({export_format}) to {path}")
    return path


def _require_onnx():
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as e:
        raise ImportError(
            "Exporting to ONNX needs the onnx package: `pip install onnx onnxruntime` "
            "(scripts/setup_env.sh installs both)."
        ) from e


def _export_onnx(graph, image, path):
    dynamic_axes = {
        "image": {1: "height", 2: "width"},
        "sem_seg_logits": {1: "height", 2: "width"},
        "boxes": {0: "detections"},
        "scores": {0: "detections"},
        "classes": {0: "detections"},
        "mask_logits": {0: "detections"},
    }
    with torch.no_grad(), patch_builtin_len(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            graph,
            (image,),
            path,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
