"""Files: checkpoints, yamls, lock files and writes that a reader never sees half done.

The bottom layer of recbole-diff: it imports nothing of the package, and every layer above may use it.
"""

import contextlib
import os
import uuid

import yaml


def load_checkpoint(path, device="cpu"):
    """Load one of our or RecBole's checkpoints. RecBole pickles its Config object, which the
    ``weights_only`` unpickler (torch >= 2.6 default) refuses, so we opt out for files we wrote ourselves."""
    import torch  # here, not above: the bench process uses this module and never reads a checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file '{path}' does not exist.")
    return torch.load(path, map_location=device, weights_only=False)


def read_yaml(path, what, error=ValueError, missing=FileNotFoundError):
    """The content of a user's yaml file, with errors that name the file and what it was for."""
    if not os.path.isfile(path):
        raise missing(f"{what} '{path}' does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise error(f"{what} '{path}' is not valid yaml: {e}") from e


@contextlib.contextmanager
def atomic_write(path):
    """A temporary path beside ``path`` to write the new file to. When the block ends without an error the file
    replaces ``path`` in one step, so a reader (or a run killed meanwhile) sees the old file or the new one, never
    a part; on an error it is removed. The name is unique to the process and the call: two processes writing the
    same file never share a temporary file."""
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_lock(lock):
    """Take ``lock`` (a file holding our pid, created atomically) for this process. A lock left by a dead process
    (an interrupted run) is taken over; False when a live process holds it."""
    # The pid is written to a file of our own first and linked into place: a lock is never seen empty, so a
    # process looking in between its creation and its pid cannot mistake it for a dead one's and take it over.
    mine = f"{lock}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    with open(mine, "w") as f:
        f.write(str(os.getpid()))
    try:
        return _link_lock(mine, lock)
    finally:
        os.remove(mine)


def _link_lock(mine, lock):
    for _ in range(2):
        try:
            os.link(mine, lock)
        except FileExistsError:
            try:
                with open(lock) as f:
                    owner = int(f.read().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _pid_alive(owner):
                return False
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            continue
        return True
    return False
