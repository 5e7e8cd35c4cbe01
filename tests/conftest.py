import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from recbole_diff.runtime import autograd_anomaly_off  # noqa: E402

autograd_anomaly_off()  # as a run does: tests that build models themselves train at full speed

from helpers import TINY  # noqa: E402


@pytest.fixture
def tiny(tmp_path):
    """TINY plus a checkpoint folder of the test's own."""
    return dict(TINY, checkpoint_dir=str(tmp_path / "saved"))
