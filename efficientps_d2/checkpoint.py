"""A DetectionCheckpointer whose files are never left half-written.

fvcore's ``Checkpointer.save`` writes each ``model_<iteration>.pth`` and ``last_checkpoint`` in
place, so a process killed mid-save leaves a truncated file behind (and possibly a
``last_checkpoint`` naming it). Here both go through :func:`efficientps_d2.file_io.atomic_write`.
"""

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .file_io import atomic_write

__all__ = ["AtomicDetectionCheckpointer"]


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """Same as ``DetectionCheckpointer``, but saves atomically when ``save_dir`` is local."""

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # remote storage: keep fvcore's own behaviour
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(save_file, lambda f: f.write(last_filename_basename.encode()))
