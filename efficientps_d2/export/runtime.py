"""Running an exported EfficientPS: the graph's tensors -> the eager model's output contract.

:func:`load` reads an export folder (see :mod:`efficientps_d2.export.exporter`) and returns an
:class:`ExportedEfficientPS`, called like the eager model in eval mode::

    model = efficientps_d2.export.load("exported/")
    outputs = model([{"image": chw_uint8_tensor, "height": h, "width": w}])
    panoptic_seg, segments_info = outputs[0]["panoptic_seg"]

and :class:`ExportedPredictor`, Detectron2's ``DefaultPredictor`` call for an exported model (an
(H, W, 3) uint8 BGR image in, resized as INPUT.MIN/MAX_SIZE_TEST at export time).

The network runs from the artifact alone: TorchScript through ``torch.jit.load`` (torchvision
imported for its NMS and ROIAlign ops), ONNX through onnxruntime on the CPU. No config is read and
no model is built; what runs in Python is :func:`postprocess`, which resizes the outputs and fuses
them with :func:`efficientps_d2.modeling.fusion.panoptic_postprocess`, as the eager model does.
"""

import json
import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances

from ..data.image_files import prepare_image
from ..modeling.fusion import panoptic_postprocess
from ..modeling.meta_arch import check_input_images
from .graph import OUTPUT_NAMES

__all__ = [
    "ExportedEfficientPS",
    "ExportedPredictor",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "load",
    "postprocess",
]

# The JSON that describes an export, and the format it follows. Bump FORMAT_VERSION whenever the
# graph's inputs/outputs or the JSON's meaning change: load() refuses other versions.
MANIFEST_NAME = "efficientps_export.json"
FORMAT_NAME = "efficientps_d2-export"
FORMAT_VERSION = 1
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
# What ExportedEfficientPS and ExportedPredictor read from the description.
_RUNTIME_KEYS = (
    "input_format",
    "num_classes",
    "thing_semantic_ids",
    "metadata",
    "fusion",
    "min_size_test",
    "max_size_test",
)


def postprocess(
    sem_seg_logits: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    mask_logits: torch.Tensor,
    height: int,
    width: int,
    *,
    thing_semantic_ids: Sequence[int],
    confidence_thresh: float,
    overlap_thresh: float,
    stuff_area_limit: int,
    mask_logit_scale: float,
) -> Dict:
    """One image's graph outputs (see :class:`~efficientps_d2.export.graph.EfficientPSGraph`) at
    the input size -> the eager model's output dict at (height, width).

    Returns:
        {"sem_seg": (C, height, width) logits, "instances": Instances with pred_boxes, scores,
        pred_classes (all-class ids), pred_masks (bool, height x width), pred_mask_logits,
        "panoptic_seg": (int32 (height, width), segments_info with all-class category ids)}.
    """
    image_size = tuple(int(s) for s in sem_seg_logits.shape[-2:])
    detections = Instances(image_size)
    detections.pred_boxes = Boxes(boxes)
    detections.scores = scores
    detections.pred_classes = classes
    # What Detectron2's mask_rcnn_inference stores: the predicted class's mask probabilities.
    detections.pred_masks = mask_logits.sigmoid()
    detections.pred_mask_logits = mask_logits
    return panoptic_postprocess(
        sem_seg_logits,
        detections,
        image_size,
        height,
        width,
        thing_semantic_ids=thing_semantic_ids,
        confidence_thresh=confidence_thresh,
        overlap_thresh=overlap_thresh,
        stuff_area_limit=stuff_area_limit,
        mask_logit_scale=mask_logit_scale,
    )


class _TorchScriptBackend:
    def __init__(self, path):
        import torchvision  # noqa: F401  (registers torchvision::nms and roi_align for the graph)

        try:
            self.module = torch.jit.load(path, map_location="cpu").eval()
        except Exception as e:
            raise ValueError(f"'{path}' is not a loadable TorchScript file: {e}") from e

    def __call__(self, image: torch.Tensor):
        with torch.inference_mode():
            return tuple(self.module(image))


class _OnnxBackend:
    def __init__(self, path):
        try:
            import onnxruntime
        except ImportError as e:
            raise ImportError(
                "Running an ONNX export needs onnxruntime: `pip install onnxruntime` "
                "(scripts/setup_env.sh installs it)."
            ) from e
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: not a warning per unused initializer
        try:
            self.session = onnxruntime.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise ValueError(f"'{path}' is not a loadable ONNX model: {e}") from e
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, image: torch.Tensor):
        outputs = self.session.run(list(OUTPUT_NAMES), {self.input_name: image.cpu().numpy()})
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outputs)


_BACKENDS = {"torchscript": _TorchScriptBackend, "onnx": _OnnxBackend}


class ExportedEfficientPS:
    """An exported EfficientPS, called like the eager model in eval mode.

    ``model(batched_inputs)``: a list of dicts with "image" ((3, H, W) tensor in
    ``input_format``, as Detectron2's ``read_image`` gives it: 0-255, "YUV-BT.601" Y 0-1) and
    optional "height"/"width" (output size, default H, W); returns one output dict per image, as
    :meth:`EfficientPS.inference` (see :func:`postprocess`). Runs on the CPU. Attributes:
    ``manifest`` (the export's JSON as a dict), ``metadata`` (class names and colours for drawing),
    ``input_format``, ``backend`` ("torchscript" or "onnx").
    """

    def __init__(self, manifest: Dict, model_path: str):
        self.manifest = manifest
        self.backend = manifest["backend"]
        self._run = _BACKENDS[self.backend](model_path)
        self.model_path = model_path
        self.input_format = manifest["input_format"]
        self.thing_semantic_ids = list(manifest["thing_semantic_ids"])
        self.fusion = dict(manifest["fusion"])
        self.metadata = _metadata(manifest)
        self.training = False  # Detectron2's inference_on_dataset toggles eval mode through this

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("An exported EfficientPS runs inference only.")
        return self

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        images = check_input_images(batched_inputs, self.input_format, "export", arrays=True)
        return [self._one(image, x) for image, x in zip(images, batched_inputs)]

    def _one(self, image: torch.Tensor, inputs: Dict) -> Dict:
        height, width = int(image.shape[1]), int(image.shape[2])
        outputs = self._run(image.to(device="cpu", dtype=torch.float32).contiguous())
        self._check_outputs(outputs)
        with torch.inference_mode():  # as the eager model: outputs are inference tensors
            return postprocess(
                *outputs,
                int(inputs.get("height") or height),
                int(inputs.get("width") or width),
                thing_semantic_ids=self.thing_semantic_ids,
                **self.fusion,
            )

    def _check_outputs(self, outputs):
        """Raises where the graph's outputs do not fit the description: a model file of another
        export (other class counts) would otherwise be fused with the wrong classes."""
        sem_seg_logits, classes = outputs[0], outputs[3]
        num_classes, num_things = self.manifest["num_classes"], len(self.thing_semantic_ids)
        if sem_seg_logits.shape[0] != num_classes or (
            classes.numel() and not 0 <= int(classes.min()) <= int(classes.max()) < num_things
        ):
            raise ValueError(
                f"The model file '{self.model_path}' does not fit its {MANIFEST_NAME}: it gives "
                f"{sem_seg_logits.shape[0]} semantic classes and thing classes "
                f"{sorted(set(classes.tolist()))}, the description {num_classes} classes of "
                f"which {num_things} things. Is it another export's model file? Export the "
                "model again."
            )


class ExportedPredictor:
    """Detectron2's ``DefaultPredictor`` call for an exported model: a (H, W, 3) uint8 BGR image
    (as ``cv2.imread``) in, one output dict at that size out, the image converted to the export's
    INPUT.FORMAT and resized for the network as INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST were at export
    time (0: no resizing), as :func:`~efficientps_d2.data.image_files.prepare_image` does."""

    def __init__(self, model: ExportedEfficientPS):
        self.model = model
        self.metadata = model.metadata
        self.dataset_name = model.manifest.get("dataset_name")
        self.input_format = model.input_format
        min_size, max_size = model.manifest["min_size_test"], model.manifest["max_size_test"]
        # As DefaultPredictor; a min_size of 0 gives a NoOpTransform.
        self.aug = T.ResizeShortestEdge([min_size, min_size], max_size)

    def __call__(self, original_image: np.ndarray) -> Dict:
        """An image it cannot take raises
        :class:`~efficientps_d2.data.image_files.ImageInputError` (see :func:`prepare_image`)."""
        image = prepare_image(original_image, self.aug, self.input_format)
        height, width = original_image.shape[:2]
        image = torch.as_tensor(image.astype("float32"))
        return self.model([{"image": image, "height": height, "width": width}])[0]


def _metadata(manifest: Dict) -> Metadata:
    meta = dict(manifest["metadata"])
    for key in ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id"):
        if key in meta:  # JSON objects have string keys: stored as [dataset id, contiguous id]
            meta[key] = {int(k): int(v) for k, v in meta[key]}
    return Metadata(name=f"__exported_{manifest.get('dataset_name') or 'classes'}", **meta)


def read_manifest(path: str):
    """(manifest dict, model file path) of an export folder, its JSON or its model file.

    Raises ValueError naming the path when it is not an EfficientPS export of this format version.
    """
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"'{path}' does not exist.")
    if not os.path.isfile(manifest_path):
        raise ValueError(
            f"'{path}' is not an EfficientPS export: no {MANIFEST_NAME} in '{folder}'. Export a "
            "model with `python -m efficientps_d2.tools.export`."
        )
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"'{manifest_path}' is not a readable export description: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(
            f"'{manifest_path}' is not an EfficientPS export description "
            f"(its 'format' is not '{FORMAT_NAME}')."
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"'{manifest_path}' is an EfficientPS export of format version {version}; this "
            f"efficientps_d2 reads version {FORMAT_VERSION} only. Export the model again with "
            "this version's `python -m efficientps_d2.tools.export`."
        )
    backend = manifest.get("backend")
    if backend not in MODEL_FILES:
        raise ValueError(
            f"'{manifest_path}' names backend {backend!r}; expected one of {sorted(MODEL_FILES)}."
        )
    missing = [key for key in _RUNTIME_KEYS if key not in manifest]
    if missing:
        raise ValueError(
            f"'{manifest_path}' lacks {missing}, which running the export needs (was it edited?). "
            "Export the model again."
        )
    model_path = os.path.join(folder, manifest.get("model_file", MODEL_FILES[backend]))
    if os.path.isfile(path) and os.path.abspath(path) not in (
        os.path.abspath(manifest_path),
        os.path.abspath(model_path),
    ):
        raise ValueError(
            f"'{path}' is not part of the EfficientPS export in '{folder}': pass the folder, "
            f"{MANIFEST_NAME} or {os.path.basename(model_path)}."
        )
    if not os.path.isfile(model_path):
        raise ValueError(f"The export in '{folder}' lacks its model file '{model_path}'.")
    return manifest, model_path


def load(path: str) -> ExportedEfficientPS:
    """Loads an export made by :func:`efficientps_d2.export.export_model` (or the export tool).

    Args:
        path: the export folder, its ``efficientps_export.json`` or its model file.
    """
    manifest, model_path = read_manifest(path)
    return ExportedEfficientPS(manifest, model_path)
