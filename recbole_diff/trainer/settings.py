"""What identifies a training, for the stage cache and for resume points: the config keys that count (all but
bookkeeping), in a form json keeps, and the data files by size and content."""

import glob
import hashlib
import numbers
import os

# keys that cannot change what a stage learns
BOOKKEEPING = frozenset(
    {
        "model",
        "checkpoint_dir",
        "device",
        "gpu_id",
        "use_gpu",
        "worker",
        "threads",
        "show_progress",
        "state",
        "log_wandb",
        "wandb_project",
        "eval_batch_size",
        "extra_test_modes",
        "loss_decimal_place",
        "metric_decimal_place",
        "save_dataset",
        "save_dataloaders",
        "dataset_save_path",
        "dataloaders_save_path",
        "local_rank",
        "nproc",
        "world_size",
        "offset",
        "ip",
        "port",
        "stage_cache",
        "fast_sampled_eval",
        "resume_dir",
        "strict_keys",
    }
)


def plain(value):
    """json's ``default`` for config values: numpy scalars as floats, anything else (enums) as its string."""
    return float(value) if isinstance(value, numbers.Real) else str(value)


_DIGESTS = {}


def file_digest(path):
    """A short content hash of ``path``, computed once per process for each version of the file (inode, size,
    modification and change times: a file replaced or rewritten gets another)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def data_files(config):
    """Each data file's size and content hash. Not its time: a dataset copied or provisioned again (a shared
    folder is, at every session here) is the same data, and a stage or a resume point must still match it."""
    folder = str(config["data_path"])  # RecBole's Config has joined the dataset's name on already
    return {
        os.path.basename(p): [os.path.getsize(p), file_digest(p)]
        for p in sorted(glob.glob(os.path.join(folder, "*")))
        if os.path.isfile(p)
    }
