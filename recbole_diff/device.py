"""Which code path a hot call takes on which device.

Some steps are cheapest on the CPU with host-side values (numpy, Python ints that size a slice), and on a GPU
each of those values is a device-to-host copy that stalls the queue of kernels. Such a step asks
:func:`host_fast_path` and otherwise runs a device-agnostic path, which never reads a tensor's values on the
host. :func:`device_path` forces that path on the CPU too, so that a CPU-only test exercises what a GPU runs
(``tests/host_guard.py`` enters it).
"""
from contextlib import contextmanager
from contextvars import ContextVar

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
