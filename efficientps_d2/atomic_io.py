"""Writing files so that a crash or a kill never leaves a half-written one behind.

Everything is written to a hidden temporary file in the target's folder and renamed over the
target, which is atomic on POSIX file systems: readers see the old file or the new one.
"""

import os
import uuid


def atomic_write(path, write, mode="wb"):
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it to ``path``.

    With ``mode=None``, ``write`` receives the temporary *path* instead (for writers such as
    ``cv2.imwrite``); the temporary name keeps ``path``'s extension for them.
    """
    tmp = temporary_path(path)
    try:
        if mode is None:
            write(tmp)
        else:
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # the rename must not land before the data does
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def temporary_path(path):
    """A unique hidden name next to ``path`` with the same extension; its folder is created."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    return os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}.tmp{ext}")
