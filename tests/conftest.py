import atexit
import os
import shutil
import tempfile

import pytest
import torch

# The built-in data sets live under $DETECTRON2_DATASETS (default ./datasets), read when
# efficientps_d2 and detectron2 are imported, that is before any test: a folder of the session's
# own, so that a test that reaches a built-in set (e.g. the demo looking up image ids in the
# synthetic validation set, which generates it) writes nothing into the checkout.
os.environ["DETECTRON2_DATASETS"] = tempfile.mkdtemp(prefix="efficientps_d2-tests-datasets-")
atexit.register(shutil.rmtree, os.environ["DETECTRON2_DATASETS"], ignore_errors=True)

# One intra-op thread: on a small shared machine, several threads per test process oversubscribe
# the cores and slow tiny models down by orders of magnitude.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny built-in synthetic data set (6 training, 3 validation images) for train_net runs."""
    from efficientps_d2.data.synthetic import ensure_synthetic_panoptic

    root = tmp_path_factory.mktemp("datasets")
    ensure_synthetic_panoptic(str(root), num_train=6, num_val=3)
    return str(root)


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder this process cannot write in: mode 0555, and where that does not bind (root),
    ``os.access`` says so, as it does on a read-only file system."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        access = os.access

        def read_only_access(path, mode, *args, **kwargs):
            if mode & os.W_OK and os.path.realpath(path) == os.path.realpath(folder):
                return False
            return access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", read_only_access)
    yield folder
    folder.chmod(0o755)  # for pytest's clean-up
