"""Count what would make a CUDA host wait for its device, on any device (the CPU included).

:class:`HostSyncCounter` is a ``TorchDispatchMode`` that counts, while it is active:

- the ops whose result a host must read before it can go on: ``aten._local_scalar_dense``
  (``.item()``, ``float()``, ``bool()``, ``int()`` of a tensor), ``aten.is_nonzero``,
  ``aten.equal``, ``nonzero``, ``masked_select``, the ``unique`` family, ``_coalesce``,
  ``repeat_interleave`` with tensor repeats, and indexing with a boolean mask;
- the host reads that dispatch nothing on a CPU tensor and so escape a dispatch mode:
  ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.cpu`` (each a device-to-host copy on a GPU);
- the collectives issued through ``torch.distributed`` (by name).

Each count keeps where it came from (the innermost frame in ``partialfc``), so a test can
name what is left. On a CPU run every ``.cpu()`` counts, whether or not its tensor would be
on the GPU: the package calls it only on device tensors inside a step.
"""

from __future__ import annotations

import collections
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
                      "_unique", "_unique2", "unique_dim", "unique_consecutive", "_coalesce", "repeat_interleave"})
HOST_READS = ("tolist", "numpy", "cpu")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "broadcast_object_list", "all_to_all_single", "barrier", "reduce_scatter", "gather", "scatter")


def _where() -> str:
    """``file:line function`` of the innermost frame of the package (not this module),
    prefixed ``deepspeed < `` when DeepSpeed's code made the call on the package's behalf."""
    frame, via = sys._getframe(2), ""
    while frame is not None:
        name = frame.f_code.co_filename
        if "/partialfc/" in name and not name.endswith("host_syncs.py"):
            return f"{via}{name.rsplit('/partialfc/', 1)[1]}:{frame.f_lineno} {frame.f_code.co_name}"
        if "/deepspeed/" in name:
            via = "deepspeed < "
        frame = frame.f_back
    return "outside partialfc"


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: ...``; then ``c.syncs`` / ``c.collectives`` (totals) and
    ``c.sync_sites`` / ``c.collective_sites`` (``Counter`` of ``(what, where)``)."""

    def __init__(self):
        super().__init__()
        self.sync_sites: collections.Counter = collections.Counter()
        self.collective_sites: collections.Counter = collections.Counter()
        self._patched: list[tuple[object, str, object]] = []

    @property
    def syncs(self) -> int:
        return sum(self.sync_sites.values())

    @property
    def collectives(self) -> int:
        return sum(self.collective_sites.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS and not (name == "repeat_interleave" and not torch.is_tensor(args[1] if len(args) > 1
                                                                                         else None)):
            self.sync_sites[name, _where()] += 1
        elif name in ("index", "index_put", "index_put_") and any(
                torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] or ())):
            self.sync_sites[f"{name} with a bool mask", _where()] += 1
        return func(*args, **kwargs)

    def _patch(self, owner, attr: str, kind: str, counter: collections.Counter) -> None:
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            counter[f"{kind}{attr}", _where()] += 1
            return original(*args, **kwargs)

        self._patched.append((owner, attr, original))
        setattr(owner, attr, counted)

    def __enter__(self):
        for attr in HOST_READS:
            self._patch(torch.Tensor, attr, "Tensor.", self.sync_sites)
        for attr in COLLECTIVES:
            if hasattr(dist, attr):
                self._patch(dist, attr, "", self.collective_sites)
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched = []
        return super().__exit__(*exc)
