"""Peak memory of a head step, and the class capacity of a memory budget fitted from it.

Where a bench's peak comes from (its records' ``memory_source``):

- ``allocator`` (CUDA): ``torch.cuda.max_memory_allocated`` since the configuration started;
- ``tensor_accounting`` (CPU): :class:`TensorBytes`, the peak of the bytes of the live tensor
  storages (each storage counted once however many views share it, sparse tensors by their
  indices and values), as the ops create and free them. It counts what the head and its
  optimizer allocate, not what the process's allocator or libraries keep around, so the same
  configuration gives the same number on an idle and a loaded machine (a kernel's own
  scratch buffers, never handed back as tensors, are not seen).

The growth of the process's peak RSS, the CPU figure before, moved with the load by more
than the difference between two small configurations; it is still written as
``peak_rss_mb`` on CPU, for comparison only, and nothing is fitted from it.

:func:`capacity` fits a line through (classes, peak) and extrapolates the classes that fit a
budget; :func:`analytic_bytes_per_class` is the floor it is checked against.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Rows of class state per class: the centre and its SGD momentum (SparseRowSGD and
# torch.optim.SGD with momentum, as the benches step), both at the storage dtype.
STATE_ROWS = 2


class TensorBytes(TorchDispatchMode):
    """Inside ``with TensorBytes() as acct:`` every op's output storages are counted until
    they are freed: ``acct.current`` and ``acct.peak`` bytes. Tensors made before the block
    are not counted unless given to :meth:`track`; frees are seen after the block too, new
    allocations only inside it."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}  # id of the storage's Python object -> bytes
        self._lock = threading.RLock()  # frees may come from other threads (autograd, gloo)

    def track(self, *tensors) -> None:
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            if t.is_sparse:
                self.track(t._indices(), t._values())
            elif t.layout == torch.strided:
                self._add(t.untyped_storage())

    def _add(self, storage) -> None:
        key = id(storage)  # the same object for as long as the storage lives (PyObject preservation)
        with self._lock:
            if key in self._live:
                return
            self._live[key] = storage.nbytes()
            self.current += self._live[key]
            self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            self.current -= self._live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*tree_flatten(out)[0])
        return out


class MemoryMeter:
    """The peak memory of one configuration's steps on ``device``: ``with meter.counting():``
    around building the head, :meth:`steps_start` once it is built (its init's transients,
    e.g. ``PartialFC``'s one CPU block of rows, are below a step's peak from 65536 classes on,
    and would only hide the slope at small sizes), then its first steps; then
    :meth:`peak_bytes`. :attr:`source` names the figure (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "allocator" if device.type == "cuda" else "tensor_accounting"
        self._acct = None if device.type == "cuda" else TensorBytes()

    @contextlib.contextmanager
    def counting(self, *existing: torch.Tensor):
        """Count inside the block (on CUDA the allocator counts anyway); ``existing``
        tensors made before it (the batch) count as live."""
        if self._acct is None:
            yield
            return
        self._acct.track(*existing)
        with self._acct:
            yield

    def steps_start(self) -> None:
        """From here on the peak is the steps' (the head and its state still count)."""
        if self._acct is None:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._acct.reset_peak()

    def peak_bytes(self) -> float:
        if self._acct is None:
            return float(torch.cuda.max_memory_allocated(self.device))
        return float(self._acct.peak)


def storage_dtype(method: str) -> torch.dtype:
    from partialfc.bench.common import DEFAULT_VARIANT, PARTIALFC_VARIANTS

    return PARTIALFC_VARIANTS.get(method, DEFAULT_VARIANT)[1]


def analytic_bytes_per_class(record: dict) -> float | None:
    """Per rank, per class of the whole head: :data:`STATE_ROWS` rows of ``dim`` at the
    method's storage dtype, a rank holding ``1 / world_size`` of the classes (full softmax:
    all of them). The floor of the class state alone; the step's working set comes on top.
    None for a record without ``dim``."""
    if "dim" not in record:
        return None
    itemsize = torch.empty((), dtype=storage_dtype(record["method"])).element_size()
    share = 1 if record["method"] == "full_softmax" else record["world_size"]
    return STATE_ROWS * record["dim"] * itemsize / share


def _fit(rs: list[dict], budget_mb: float) -> dict:
    """The fit of one (method, world size) group, or its ``no_fit`` status."""
    ok = [r for r in rs if r["status"] == "ok"]
    sources = sorted({r.get("memory_source", "rss") for r in ok})
    analytic = analytic_bytes_per_class(rs[0])
    out = dict(source="+".join(sources) or None, points=len(ok), classes_measured=sorted({r["classes"] for r in ok}),
               analytic_bytes_per_class=analytic, bytes_per_class=None, mb_per_million_classes=None,
               fixed_mb=None, max_classes=None, ratio_to_analytic=None)
    if len(sources) > 1:
        return dict(out, status=f"no_fit: the points were measured by different sources ({', '.join(sources)})")
    if len(out["classes_measured"]) < 2:
        failed = sorted({r["status"] for r in rs if r["status"] != "ok"})
        why = f"; the others: {', '.join(failed)}" if failed else ""
        return dict(out, status=f"no_fit: needs two class counts that ran, has {len(out['classes_measured'])}{why}")
    xs, ys = [float(r["classes"]) for r in ok], [r["peak_mem_mb"] for r in ok]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)  # MB per class
    if slope <= 0:
        return dict(out, status=f"no_fit: peak memory does not grow with the classes ({slope * 2**20:.3g} bytes per class)")
    fixed = my - slope * mx
    return dict(out, status="ok", bytes_per_class=slope * 2**20, mb_per_million_classes=slope * 1e6, fixed_mb=fixed,
                max_classes=int((budget_mb - fixed) / slope),
                ratio_to_analytic=slope * 2**20 / analytic if analytic else None)


def capacity(records: list[dict], budget_mb: float) -> list[dict]:
    """One record per (method, world size): the classes (over all ranks) that fit
    ``budget_mb`` per rank, from a least-squares line through (classes, peak) of the
    configurations that ran (``status`` ``ok``), or ``status`` ``no_fit: ...`` saying why
    there is none (fewer than two class counts ran, or the peak does not grow)."""
    from partialfc.bench.common import method_label

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((method_label(r), r["world_size"]), []).append(r)
    return [dict(kind="capacity", method=label, world_size=world, budget_mb=budget_mb, **_fit(rs, budget_mb),
                 basis="extrapolated from a linear fit of measured peak memory")
            for (label, world), rs in groups.items()]
