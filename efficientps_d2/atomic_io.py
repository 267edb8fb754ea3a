"""Writing files and folders so that a crash or a kill never leaves a half-written one behind.

Everything is written under a hidden temporary name next to the target (same folder, so the same
file system) and renamed over the target, which is atomic on POSIX file systems: readers see the
old file or folder, or the new one. Every writer of the package goes through these functions.
"""

import contextlib
import logging
import os
import re
import shutil
import uuid

__all__ = [
    "atomic_directory",
    "atomic_open",
    "atomic_write",
    "blocking_file",
    "check_writable_file",
    "check_writable_folder",
    "remove_stale_temporaries",
    "remove_stale_temporaries_of",
    "staged_folder",
    "temporary_path",
    "unwritable_folder",
]

logger = logging.getLogger(__name__)


def atomic_write(path, write, mode="wb", *, remove_stale=False):
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it to ``path``.

    With ``mode=None``, ``write`` receives the temporary *path* instead (for writers such as
    ``cv2.imwrite``); the temporary name keeps ``path``'s extension for them. With
    ``remove_stale``, what killed writers of ``path`` left next to it is removed first (see
    :func:`remove_stale_temporaries`: one listing of the folder, for a tool that writes one file;
    a writer of many files in a folder sweeps it once).
    """
    if remove_stale:
        remove_stale_temporaries_of(path)
    if mode is not None:
        with atomic_open(path, mode) as f:
            write(f)
        return
    with _renamed_when_done(path) as tmp:
        write(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="wb", **kwargs):
    """``open(path, mode, **kwargs)`` for writing, as a context manager, for a writer that opens
    its file itself in a ``with`` block (Detectron2's save of the config): the block writes to a
    temporary file next to ``path``, which is flushed to disk and renamed to ``path`` when the
    block ends without error; on an error it is removed and ``path`` stays as it was."""
    with _renamed_when_done(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())  # the rename must not land before the data does


@contextlib.contextmanager
def _renamed_when_done(path):
    """A temporary path next to ``path``, renamed to ``path`` when the block ends without error;
    on an error removed, ``path`` left as it was."""
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def blocking_file(folder):
    """The path that stops ``os.makedirs(folder)``, or None: ``folder`` itself, or the nearest
    existing path above it, where that is not a folder: a file or a broken symbolic link (makedirs
    fails there with a bare "File exists", "Not a directory" or "No such file or directory")."""
    path = _nearest_existing(folder)
    return None if os.path.isdir(path) else path


def _nearest_existing(path):
    """``path`` (absolute) if something exists there, else the nearest existing folder above."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_writable_file(path, what, error=ValueError):
    """Raises ``error`` naming ``what`` (e.g. "output json") and ``path`` where a file cannot be
    written at ``path``: it is a folder, a file or broken symbolic link stands where a folder
    above it must be (see :func:`blocking_file`), or its folder (the nearest existing one above
    it) cannot be written (see :func:`unwritable_folder`). For checking an output before the work
    that produces it."""
    if os.path.isdir(path):
        raise error(f"The {what} '{path}' is a folder, not a file name.")
    folder = os.path.dirname(os.path.abspath(path))
    blocker = blocking_file(folder)
    if blocker:
        raise error(f"Cannot write the {what} '{path}': '{blocker}' is not a folder.")
    denied = unwritable_folder(folder)
    if denied:
        raise error(f"Cannot write the {what} '{path}': {_NOT_WRITABLE.format(denied)}")


def check_writable_folder(path, what, error=ValueError, *, replaced=False, hint=""):
    """Raises ``error`` naming ``what`` (e.g. "--output") and ``path`` where a folder cannot be
    made at ``path``: it is a file or a broken symbolic link, or one stands where a folder above
    it must be (see :func:`blocking_file`), or it (the nearest existing folder at or above it)
    cannot be written (see :func:`unwritable_folder`). With ``replaced`` (the writer replaces
    whatever is at ``path``, as :func:`atomic_directory` with ``overwrite`` does), a file at
    ``path`` passes, and the folder above it must be writable too. ``hint`` (what to do
    instead) ends the message. For checking an output before the work that produces it."""
    full = os.path.abspath(path)
    blocker = blocking_file(os.path.dirname(full) if replaced else full)
    if blocker is None:
        # Files are written into the folder; with ``replaced`` it is also moved, and the
        # temporary folder made next to it.
        checked = [os.path.dirname(full), full] if replaced else [full]
        denied = next(filter(None, map(unwritable_folder, checked)), None)
        if denied is None:
            return
        message = f"Cannot write the {what} '{path}': {_NOT_WRITABLE.format(denied)}"
    elif blocker == full:
        kind = "a file" if os.path.exists(full) else "a broken symbolic link"
        message = f"The {what} '{path}' is {kind}, not a folder."
    else:
        message = f"Cannot make the {what} '{path}': '{blocker}' is not a folder."
    raise error(f"{message} {hint}" if hint else message)


_NOT_WRITABLE = "'{}' is not writable (its permissions, or a read-only file system)."


def unwritable_folder(path):
    """The nearest existing folder at or above ``path`` (``path`` itself where it exists) if this
    process cannot create files in it (its permissions, a read-only file system), else None.
    Writers make the missing folders below it: they fail there with a bare "Permission denied"
    naming the first file or folder they try, after the work."""
    existing = _nearest_existing(path)
    if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        return existing
    return None


def temporary_path(path):
    """A unique hidden name next to ``path`` with the same extension, naming this process (its
    PID, so that :func:`remove_stale_temporaries` in another process leaves it alone while this
    one lives); its folder is created."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    return os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}-p{os.getpid()}.tmp{ext}")


@contextlib.contextmanager
def staged_folder(folder, name):
    """Yields ``(staging, commit)``: ``staging`` a new hidden folder inside ``folder`` (named as
    the temporaries of ``name``) for a writer that takes a folder and writes several files into
    it (Detectron2's evaluators); ``commit()`` flushes each file written there to disk and renames
    it into ``folder``, so readers see each old file or its new one. What killed writers of
    ``name`` left goes first; the hidden folder goes whatever happens. A kill during the renames
    (a moment) can leave some files new and the others old, each whole."""
    remove_stale_temporaries(folder, name)
    staging = temporary_path(os.path.join(folder, name))
    os.mkdir(staging)

    def commit():
        for file_name in sorted(os.listdir(staging)):
            with open(os.path.join(staging, file_name), "rb") as f:
                os.fsync(f.fileno())  # the rename must not land before the data does
            os.replace(os.path.join(staging, file_name), os.path.join(folder, file_name))

    try:
        yield staging, commit
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path, *, overwrite=False, then=None):
    """Yields a path (not created yet) to write a folder at; on success it is renamed to ``path``.

    The yielded path lies inside a hidden temporary folder next to ``path`` (see
    :func:`temporary_path`), which is removed in every case, so a killed writer leaves at most that
    one folder behind. On leaving the block without error:

    - an existing ``path`` is moved aside (``overwrite``) or raises ``FileExistsError``;
    - the new folder is renamed to ``path``, then ``then()`` is called (e.g. to rename a file that
      belongs with the folder); if it raises, the old folder is put back.

    On an error nothing at ``path`` changes.
    """
    path = os.path.abspath(path)
    workspace = temporary_path(path)
    os.mkdir(workspace)
    new = os.path.join(workspace, "new")
    try:
        yield new
        old = os.path.join(workspace, "old")
        if os.path.lexists(path):
            if not overwrite:
                raise FileExistsError(f"'{path}' exists (appeared while it was being written?).")
            os.rename(path, old)
        try:
            os.rename(new, path)
            try:
                if then is not None:
                    then()
            except BaseException:
                os.rename(path, new)
                raise
        except BaseException:
            if os.path.lexists(old):
                os.rename(old, path)
            raise
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


# The names temporary_path makes: ".<base>.<12 hex digits>-p<PID>.tmp<ext>" (earlier versions
# wrote no PID).
_TEMPORARY_NAME = re.compile(
    r"^\.(?P<base>.+)\.[0-9a-f]{12}(?:-p(?P<pid>[0-9]+))?\.tmp(?P<ext>\.[^./]*)?$"
)


def _another_live_process(pid):
    """Whether ``pid`` is another process that runs now, on this machine."""
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would stop it
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except PermissionError:  # another user's
        return True
    except (OSError, OverflowError):
        return False
    return True


def remove_stale_temporaries(folder, target=None):
    """Deletes the temporary files and folders that :func:`temporary_path` named in ``folder``
    (only those of ``target``, a name in it, or of any of a collection of names, when given);
    returns their paths. Killed writers leave them behind; nothing reads them. Those that name
    another live process of this machine are kept: they are its work in progress (an
    ``--eval-only`` run evaluating into the folder of a training that was evaluating deleted the
    training's, which then failed with a bare FileNotFoundError). A process's own count as stale
    (its writers remove theirs when they fail). Writers on other machines (a shared file system)
    are not seen: where one may write, call this only under a lock."""
    if not os.path.isdir(folder):
        return []
    targets = None if target is None else {target} if isinstance(target, str) else set(target)
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _TEMPORARY_NAME.match(name)
        if not match:
            continue
        if targets is not None and match.group("base") + (match.group("ext") or "") not in targets:
            continue
        if match.group("pid") and _another_live_process(int(match.group("pid"))):
            continue  # a live writer's
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):  # atomic_directory's workspace
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        removed.append(path)
    if removed:
        logger.warning(f"Removed {len(removed)} temporary files of killed writers: {removed[:5]}")
    return removed


def remove_stale_temporaries_of(path):
    """:func:`remove_stale_temporaries` of the one file or folder ``path``: what killed writers of
    it left next to it."""
    path = os.path.abspath(path)
    return remove_stale_temporaries(os.path.dirname(path), os.path.basename(path))
