"""What the tests share that is not a fixture: the shipped data slice and a tiny config, which test modules build
their own module-level configs from (a fixture cannot be used there). Fixtures live in conftest.py."""

import os

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
