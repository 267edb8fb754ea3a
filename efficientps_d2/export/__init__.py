"""Deployment: EfficientPS exported to TorchScript or ONNX, and run with the eager model's outputs.

    from efficientps_d2.export import export_model, load
    export_model(model.eval(), cfg, "exported/", "onnx")  # or python -m efficientps_d2.tools.export
    outputs = load("exported/")([{"image": chw_image}])

See :mod:`.exporter` for what is exported and :mod:`.runtime` for how it runs.
"""

from .exporter import FORMATS, export_model
from .graph import OUTPUT_NAMES, EfficientPSGraph
from .runtime import (
    FORMAT_VERSION,
    ExportedEfficientPS,
    ExportedPredictor,
    load,
    postprocess,
    read_manifest,
)

__all__ = [
    "EfficientPSGraph",
    "ExportedEfficientPS",
    "ExportedPredictor",
    "FORMAT_VERSION",
    "FORMATS",
    "OUTPUT_NAMES",
    "export_model",
    "load",
    "postprocess",
    "read_manifest",
]
