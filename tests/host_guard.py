"""A test helper that catches host transfers in hot calls on a CPU-only machine.

On a GPU, reading a tensor's values on the host (``.cpu()``, ``.numpy()``, ``.item()``, ``.tolist()``, a numpy
or scipy conversion, ``int(t)``, ``float(t)``, ``if t:``, ``seq[:t]``) copies them back and waits for every
queued kernel; on the CPU the same code costs nothing, so only a test like this sees it. Inside
:func:`no_host_transfers` each of these raises :class:`HostTransferError`, naming the call and where it was
made; recbole_diff is also put on its device-agnostic paths (:func:`recbole_diff.device.device_path`), so the
CPU shortcuts that legitimately use numpy are not taken.

Use (tests import it as a module: ``from host_guard import no_host_transfers, guarded``)::

    batch = first_batch(loader)                 # build inputs outside the guard
    with no_host_transfers():
        loss = model.calculate_loss(batch)      # any host read in here raises
    loss.backward()

    scores = guarded(model.full_sort_predict)(batch)   # the same, as a wrapper of one callable

``allow=("bool",)`` (names from ``CONVERSIONS``) lets some conversions through, for a call whose host read
is known and wanted. Data that lives on the host by design (a CSR of training sequences, a numpy index) must
be prepared outside the guard: on the CPU the guard cannot tell a host tensor from a device one.
"""

import functools
import os
import traceback
from contextlib import contextmanager

import torch

from recbole_diff.device import device_path

# name -> the Tensor attribute that reads values on the host
CONVERSIONS = {
    "cpu": "cpu",
    "numpy": "numpy",
    "item": "item",
    "tolist": "tolist",
    "array": "__array__",  # np.asarray(t), np.array(t), scipy.sparse.*_matrix(t)
    "int": "__int__",
    "float": "__float__",
    "bool": "__bool__",
    "index": "__index__",  # a tensor used as a Python index or slice bound
}


class HostTransferError(RuntimeError):
    pass


def _caller():
    """The innermost frame outside this file and torch's own Tensor wrappers, as 'path:line'."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != __file__ and not frame.filename.endswith(os.path.join("torch", "_tensor.py")):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def _raiser(name):
    def refuse(self, *args, **kwargs):
        raise HostTransferError(
            f"host transfer inside no_host_transfers(): Tensor {name} at {_caller()}. On a "
            f"GPU this copies to the host and waits for the device; keep the value on the "
            f"device, or select a CPU-only path with recbole_diff.device.host_fast_path."
        )

    return refuse


@contextmanager
def no_host_transfers(allow=()):
    unknown = set(allow) - set(CONVERSIONS)
    if unknown:
        raise ValueError(f"no_host_transfers: unknown allow entries {sorted(unknown)}; known: {sorted(CONVERSIONS)}")
    saved = {}
    try:
        for name, attr in CONVERSIONS.items():
            if name in allow:
                continue
            saved[attr] = torch.Tensor.__dict__.get(attr)
            setattr(torch.Tensor, attr, _raiser(name))
        with device_path():
            yield
    finally:
        for attr, original in saved.items():
            if original is None:
                delattr(torch.Tensor, attr)  # inherited from torch's C base class: uncover it again
            else:
                setattr(torch.Tensor, attr, original)


def guarded(fn, allow=()):
    """``fn`` wrapped so that every call runs inside :func:`no_host_transfers`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_host_transfers(allow):
            return fn(*args, **kwargs)

    return wrapper
