import pytest
import torch

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
