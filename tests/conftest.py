import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from recbole_diff.runtime import autograd_anomaly_off  # noqa: E402

autograd_anomaly_off()  # as a run does: tests that build models themselves train at full speed

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_PATH = os.path.join(TESTS_DIR, "data")
SLICE = "ml-100k-slice"

# A tiny sequential setup on the shipped slice of ml-100k (120 users, 915 items).
TINY = {
    "data_path": DATA_PATH,
    "MAX_ITEM_LIST_LENGTH": 10,
    "hidden_size": 16,
    "inner_size": 32,
    "embedding_size": 16,
    "n_layers": 1,
    "n_heads": 1,
    "train_batch_size": 256,
    "eval_batch_size": 256,
    "epochs": 2,
    "show_progress": False,
    "state": "WARNING",
}


@pytest.fixture
def tiny(tmp_path):
    """TINY plus a checkpoint folder of the test's own."""
    return dict(TINY, checkpoint_dir=str(tmp_path / "saved"))
