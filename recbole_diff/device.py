"""Which code path a hot call takes on which device.

Some steps are cheapest on the CPU with host-side values (numpy, Python ints that size a slice), and on a GPU
each of those values is a device-to-host copy that stalls the queue of kernels. Such a step asks
:func:`host_fast_path` and otherwise runs a device-agnostic path, which never reads a tensor's values on the
host. :func:`device_path` forces that path on the CPU too, so that a CPU-only test exercises what a GPU runs
(``tests/host_guard.py`` enters it).
"""

from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

_FORCED = ContextVar("recbole_diff_device_path", default=False)


def host_fast_path(like):
    """True where a CPU shortcut may read values on the host: ``like`` (a tensor or a device) is on the CPU and
    :func:`device_path` is not in force."""
    device = getattr(like, "device", like)
    return getattr(device, "type", str(device)) == "cpu" and not _FORCED.get()


@contextmanager
def device_path():
    """Take the device-agnostic paths even on the CPU (tests of the GPU path, comparisons of the two paths)."""
    token = _FORCED.set(True)
    try:
        yield
    finally:
        _FORCED.reset(token)


PRECISIONS = ("none", "bf16")


def _key(config, key):
    try:
        return config[key]
    except KeyError:
        return None


def mixed_precision(config, device):
    """``torch.autocast`` for the config's ``mixed_precision`` (``bf16``) on ``device``, or a disabled one.

    On the CPU autocast stays off unless ``mixed_precision_on_cpu`` is set (CPU bf16 kernels are slower than fp32
    on most CPUs; the option exists to test the bf16 path without a GPU). A model whose yamls do not declare the
    key runs in fp32. An unknown value raises here, before any compute."""
    mode = _key(config, "mixed_precision") or "none"
    if mode not in PRECISIONS:
        raise ValueError(
            f"mixed_precision must be one of {PRECISIONS}, got '{mode}'. Set mixed_precision: bf16 for "
            "bfloat16 autocast on a GPU, or none."
        )
    device = torch.device(device)
    enabled = mode == "bf16" and (device.type != "cpu" or bool(_key(config, "mixed_precision_on_cpu")))
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def argsort_descending(v):
    """Per row of a 2-d tensor, the indices from the largest value to the smallest; ties in no set order.
    On CPU numpy's (AVX-512) quicksort is about 4x faster than torch's sort over a row of all items."""
    if v.device.type != "cpu":
        return torch.argsort(v, dim=1, descending=True)
    return torch.from_numpy(np.argsort(-v.numpy(), axis=1, kind="quicksort"))
