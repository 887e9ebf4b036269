"""The training state as named stateful components, in the three scopes a checkpoint keeps.

- ``shared``: the same on every rank of a candidate (backbone engine, head optimizer's param
  groups, schedules, scaler, progress, search); rank 0 writes it, every rank loads it.
- ``local``: this rank's own (the head's sampler, the RNG streams, the data position); on
  another world size it cannot be reused and each component restarts at the saved step.
- ``rows``: tensors whose row ``i`` belongs to class ``class_start + i`` of this rank's shard
  (the head's centres, its optimizer's per-row state); on another world size they are
  gathered from the saved shards that overlap the new one.

Each component has ``state_dict()``/``load_state_dict()``; a ``rows`` component has
``row_state()``/``load_row_state()``; a ``local`` one ``restart(step)``. :class:`TrainState`
knows only these methods; :mod:`partialfc.train.state` knows only :class:`TrainState`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from partialfc.seeding import Stream, derive_seed
from partialfc.train.optim import sync_schedule


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class RowSharded(Protocol):
    def row_state(self) -> dict[str, torch.Tensor]: ...

    def load_row_state(self, rows: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Progress:
    """Where the run is: optimizer steps done, how many were skipped (non-finite), the run's
    id (wandb's, kept across resumes); ``consecutive_nonfinite`` is not saved (a resume
    starts counting again)."""

    step: int = 0
    skipped_steps: int = 0
    run_id: str = ""
    consecutive_nonfinite: int = 0

    def count(self, finite: bool) -> None:
        """One more optimizer step, applied or (``finite`` False) skipped."""
        self.step += 1
        self.skipped_steps += not finite
        self.consecutive_nonfinite = 0 if finite else self.consecutive_nonfinite + 1

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_steps, self.run_id = int(state["step"]), int(state["skipped_steps"]), state["run_id"]


def seed_rank_stream(seed: int, rank: int, step: int) -> None:
    """Seed the global generators of torch (dropout, ...), numpy and Python with this rank's
    stream at ``step``."""
    value = derive_seed(seed, Stream.RANK, rank, step)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


class RngState:
    """The process's global generators (torch, CUDA, numpy, Python) as a component, their
    states as tensors and plain values; :meth:`restart` seeds rank ``rank``'s stream at a step."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = int(seed), int(rank)

    def restart(self, step: int) -> None:
        seed_rank_stream(self.seed, self.rank, step)

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        state = {"torch": torch.get_rng_state(),
                 "numpy": {"kind": str(kind), "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                           "cached_gaussian": float(cached)},
                 "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class HeadShard:
    """The sharded head (:class:`partialfc.head.PartialFC`) as a component: its centres are
    rows, its sampler and class range local state (checked on load)."""

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def row_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.head.weight.detach()}

    def load_row_state(self, rows: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.head.weight.copy_(rows["weight"])

    def state_dict(self) -> dict:
        return self.head.get_extra_state()

    def load_state_dict(self, state: dict) -> None:
        self.head.set_extra_state(state)

    def restart(self, step: int) -> None:
        self.head.sampler.reseed(step)


class SyncedSchedule:
    """An lr schedule as a component: loading its step also sets its optimizer's lr to the
    schedule's value there (a resume follows its own config's horizon)."""

    def __init__(self, schedule: torch.optim.lr_scheduler.LambdaLR):
        self.schedule = schedule

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)
        sync_schedule(self.schedule)


def _cpu(obj):
    """``obj`` with every tensor detached and on the CPU (what a checkpoint file holds)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class TrainState:
    """Named components by scope (see the module docstring). ``live_excluded``: shared
    components left out of :meth:`live` (the same on every candidate of a search)."""

    live_excluded = ("progress", "search")

    def __init__(self, shared: dict[str, Stateful], local: dict[str, Stateful], rows: dict[str, RowSharded]):
        self.shared, self.local, self.rows = shared, local, rows

    @staticmethod
    def _collect(parts: dict, method: str, skip: tuple[str, ...] = ()) -> dict:
        return {name: getattr(part, method)() for name, part in parts.items() if name not in skip}

    def shared_state(self) -> dict:
        return _cpu(self._collect(self.shared, "state_dict"))

    def local_state(self) -> dict:
        return _cpu(self._collect(self.local, "state_dict"))

    def row_state(self) -> dict:
        """``{component: {name: (num_local, ...)}}`` on the CPU."""
        return _cpu(self._collect(self.rows, "row_state"))

    def load_shared(self, state: dict) -> None:
        for name, part in self.shared.items():  # in order: the head optimizer before its schedule
            if name in self.local:  # rank 0's copy of a local state: read by restart_local only
                continue
            if state.get(name):  # empty or None: nothing was saved (a disabled scaler, no search)
                part.load_state_dict(state[name])

    def load_local(self, state: dict) -> None:
        for name, part in self.local.items():
            part.load_state_dict(state[name])

    def load_rows(self, rows: dict) -> None:
        for name, part in self.rows.items():
            part.load_row_state(rows.get(name, {}))

    def restart_local(self, step: int, shared: dict) -> None:
        """After loading from another world size: each local component starts its stream at
        ``step``; the data position is rank 0's saved one (``shared["data"]``), converted."""
        for name, part in self.local.items():
            if name in shared:
                part.load_state_dict(shared[name])
            else:
                part.restart(step)

    def live(self) -> dict:
        """This rank's complete state in memory, less :attr:`live_excluded` (a search's copy of
        the best candidate onto the others). Not a snapshot: its tensors are the live ones."""
        return {"shared": self._collect(self.shared, "state_dict", self.live_excluded),
                "local": self._collect(self.local, "state_dict"), "rows": self._collect(self.rows, "row_state")}

    def apply_live(self, state: dict) -> None:
        """Load a :meth:`live` state of the same world size."""
        self.load_shared(state["shared"])
        self.load_local(state["local"])
        self.load_rows(state["rows"])
