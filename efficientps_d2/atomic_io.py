"""Writing files so that a crash or a kill never leaves a half-written one behind.

Everything is written to a hidden temporary file in the target's folder and renamed over the
target, which is atomic on POSIX file systems: readers see the old file or the new one.
"""

import logging
import os
import re
import uuid

logger = logging.getLogger(__name__)


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


# The names temporary_path makes: ".<base>.<12 hex digits>.tmp<ext>".
_TEMPORARY_NAME = re.compile(r"^\.(?P<base>.+)\.[0-9a-f]{12}\.tmp(?P<ext>\.[^./]*)?$")


def remove_stale_temporaries(folder, target=None):
    """Deletes the temporary files that :func:`temporary_path` made in ``folder`` (only those of
    ``target``, a file name in it, when given); returns their paths. They are left behind by
    killed writers and never read. Call it only where no live writer can own one: under a lock,
    or for an output that one process writes at a time."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _TEMPORARY_NAME.match(name)
        if not match:
            continue
        if target is not None and match.group("base") + (match.group("ext") or "") != target:
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    if removed:
        logger.warning(f"Removed {len(removed)} temporary files of killed writers: {removed[:5]}")
    return removed
