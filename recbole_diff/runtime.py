"""What the entry points (``run_recbole_diff``, the ``recbole-diff`` command, tune and bench trials) set up in a
process before a run: its log file, torch's threads, autograd's anomaly switch, RecBole's warnings, and the
``--key=value`` words of a command line."""

import contextlib
import logging
import os
import uuid
import warnings

# torch and RecBole (2-3 s to import) are imported by the functions that use them: the `recbole-diff` command
# imports this module first thing, and `recbole-diff --help` stays instant.


def autograd_anomaly_off():
    """Switch autograd's anomaly detection off for the process. RecBole turns it on as a side effect of importing
    its sequential models (see above), which slows every backward pass of every model (SASRec: 1.75x per batch).
    Called where a run starts; a script that trains models itself calls it once too."""
    # imported first, so that RecBole's switch has happened and cannot come later in the run
    import recbole.model.sequential_recommender  # noqa: F401
    import torch

    torch.autograd.set_detect_anomaly(False)


def init_logger(config):
    """RecBole's ``init_logger``, with a log file no other run shares. RecBole names the file by model, dataset,
    the second and a hash of the config, so two identical runs started together would write into one file; here
    the pid and a random part follow the time. Returns the file's path."""
    from recbole.utils import logger as recbole_logger

    local_time = recbole_logger.get_local_time
    stamp = f"{local_time()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    recbole_logger.get_local_time = lambda: stamp
    try:
        recbole_logger.init_logger(config)
    finally:
        recbole_logger.get_local_time = local_time
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return next((f for f in files if stamp in f), None)


def set_threads(n):
    """One torch thread per process by default: on small shared machines two threads made an epoch ~7x
    slower, and two single-threaded processes side by side beat one with two threads."""
    import torch

    if n is None:
        return
    n = int(n)
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def recbole_warnings_hidden():
    """RecBole 1.2.1 calls pandas and torch APIs that print blocks of FutureWarnings on every run; our entry
    points hide those (only those: a user's own code importing recbole_diff keeps its warnings)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
        yield


def parse_key_values(words):
    """``--key=value`` words to a dict with RecBole's value conversion (numbers, lists, bools)."""
    from recbole.config import Config as RecBoleConfig

    out, bad = {}, []
    for word in words:
        if not word.startswith("--") or "=" not in word:
            bad.append(word)
            continue
        key, value = word[2:].split("=", 1)
        out[key] = value
    if bad:
        raise SystemExit(f"recbole-diff: cannot read {' '.join(bad)}; write options as --key=value.")
    return RecBoleConfig._convert_config_dict(None, out)
