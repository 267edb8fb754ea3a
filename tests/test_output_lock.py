"""One training run per OUTPUT_DIR; temporary files of killed runs are removed, never read."""

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from efficientps_d2.atomic_io import remove_stale_temporaries, temporary_path
from efficientps_d2.output_lock import LOCK_NAME, OutputDirInUseError, lock_output_dir


def test_second_run_refused_naming_the_pid_and_dead_locks_taken_over(tmp_path):
    folder = str(tmp_path / "run")
    held = lock_output_dir(folder)
    with pytest.raises(
        OutputDirInUseError, match=f"in use by another training run \\(PID {os.getpid()}"
    ):
        lock_output_dir(folder)
    held.close()  # as when the holder exits or is killed: the OS drops its flock
    # A lock file naming a process that has ended does not block anyone.
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    with open(os.path.join(folder, LOCK_NAME), "w") as f:
        f.write(f"{dead.pid}\n")
    taken = lock_output_dir(folder)
    with open(os.path.join(folder, LOCK_NAME)) as f:
        assert f.read().strip() == str(os.getpid())
    taken.close()


def test_only_temporaries_of_the_atomic_writer_are_removed(tmp_path):
    keep = ["model_0000001.pth", ".hidden_config", "last_checkpoint", ".x.tmp.pth"]
    for name in keep:
        (tmp_path / name).write_bytes(b"keep")
    stale = [temporary_path(str(tmp_path / n)) for n in ("model_final.pth", "clip.mp4", "lc")]
    for path in stale:
        open(path, "wb").close()
    removed = remove_stale_temporaries(str(tmp_path), target="clip.mp4")
    assert removed == [stale[1]]
    assert sorted(remove_stale_temporaries(str(tmp_path))) == sorted([stale[0], stale[2]])
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_temporaries_of_another_live_process_are_kept(tmp_path):
    # An --eval-only run evaluating into the folder of a training that was evaluating removed
    # the training's staged predictions.json, and the training failed with FileNotFoundError.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        own = temporary_path(str(tmp_path / "predictions.json"))  # of this process: stale
        of = {p: own.replace(f"-p{os.getpid()}.", f"-p{p}.") for p in (live.pid, dead.pid)}
        for path in (own, *of.values()):
            os.mkdir(path)
        removed = remove_stale_temporaries(str(tmp_path), "predictions.json")
        assert sorted(removed) == sorted([own, of[dead.pid]])
        assert os.listdir(tmp_path) == [os.path.basename(of[live.pid])]
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temporaries(str(tmp_path)) == [of[live.pid]]


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    # Data loader workers (forked) held the flock of a killed run for seconds after its death,
    # and a restart with --resume was refused, naming the dead run's PID.
    folder = str(tmp_path / "run")
    held = lock_output_dir(folder)
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    child = fork.Process(target=lambda: started.set() or time.sleep(60))
    child.start()
    try:
        assert started.wait(60)  # past the fork's hooks
        held.close()  # the run ends, as when it is killed
        lock_output_dir(folder).close()
    finally:
        child.kill()
        child.join()
