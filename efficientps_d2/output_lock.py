"""One training run per OUTPUT_DIR at a time.

Two runs writing checkpoints, metrics and ``last_checkpoint`` into the same folder corrupt each
other's resume state without any error. :func:`lock_output_dir` takes an exclusive ``flock`` on
``OUTPUT_DIR/.train_net.lock`` and writes its PID into it; a second run is refused with the PID
that holds the lock. The operating system drops the lock when its process dies (even by
``kill -9``), so the lock of a dead run is taken over without any clean-up. Processes forked from
the run (data loader workers) close their copy of the lock file at once: an flock lasts while any
copy is open, and workers outlive a killed run by seconds (a restart was refused, naming the dead
run's PID) or, hung, for ever. Where ``flock`` does not exist (Windows) no lock is taken.
"""

import logging
import os
import weakref

__all__ = ["OutputDirInUseError", "lock_output_dir"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".train_net.lock"


class OutputDirInUseError(RuntimeError):
    """Another live process holds the OUTPUT_DIR lock."""


def lock_output_dir(folder):
    """Locks ``folder`` for this process. Under the lock no other live run writes there, so the
    caller may then remove temporaries of killed runs (``atomic_io.remove_stale_temporaries``).

    Returns:
        the open lock file: keep it referenced while the run lasts (closing it unlocks), or
        None where ``flock`` is unavailable.
    Raises:
        OutputDirInUseError: another process holds the lock (its PID is named).
    """
    try:
        import fcntl
    except ImportError:
        logger.warning(f"No flock on this system: OUTPUT_DIR '{folder}' is not locked.")
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    lock_file = open(path, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise OutputDirInUseError(
            f"OUTPUT_DIR '{folder}' is in use by another training run (PID {holder}, lock "
            f"'{path}'). Wait for it to finish, stop it, or set another OUTPUT_DIR."
        ) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    held = weakref.ref(lock_file)  # the hook must not keep the lock when the caller drops it
    os.register_at_fork(after_in_child=lambda: _close_in_child(held()))
    return lock_file


def _close_in_child(lock_file):
    # Only the child's copy of the descriptor is closed: the parent keeps its lock.
    if lock_file is not None and not lock_file.closed:
        lock_file.close()
