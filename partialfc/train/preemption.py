"""Requests from outside the job: stop (preemption warnings and time limits end in a
checkpoint and exit code 3) and checkpoint now (SIGUSR1). Every signal the trainer handles
is installed here.

Sources of a request, any rank:

- the file named by ``$PARTIALFC_STOP_FILE`` exists (the SLURM templates create it when the
  batch shell receives ``--signal=B:USR1@T``; see ``slurm/preemptible.sh``), unless an earlier
  run already acknowledged it (``<stop file>.done`` as new as the file: a leftover, ignored);
- SIGTERM (the scheduler's kill at the time limit, ``scancel``, a preemption with grace time).

A checkpoint request (any rank): SIGUSR1, or :meth:`StopRequest.request_checkpoint`.

:func:`agree` folds this rank's requests into the one collective every step performs
anyway, so all ranks see them at the same step boundary: they checkpoint together and, on a
stop, exit with :data:`EXIT_PREEMPTED`; the batch script then requeues the job.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import NamedTuple

import torch

from partialfc.ops.collectives import all_reduce

EXIT_PREEMPTED = 3
STOP_FILE_ENV = "PARTIALFC_STOP_FILE"


class Preempted(Exception):
    """Training stopped on request after writing a checkpoint at ``step``."""

    def __init__(self, step: int, path: str):
        super().__init__(f"stopped on request at step {step}; checkpoint {path}")
        self.step, self.path = step, path


class StopRequest:
    """Watches the stop file, SIGTERM (stop) and SIGUSR1 (checkpoint); ``install()`` /
    ``uninstall()`` around training (the handlers only set flags)."""

    def __init__(self, stop_file: str | None = None):
        self.stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV)
        self.signalled = False
        self.checkpoint_asked = False
        self._previous: dict[int, object] = {}

    def _on_signal(self, *_) -> None:
        self.signalled = True

    def request_checkpoint(self, *_) -> None:
        """Ask for a checkpoint after the current step (what SIGUSR1 does; safe in a handler)."""
        self.checkpoint_asked = True

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number, handler in ((signal.SIGTERM, self._on_signal), (signal.SIGUSR1, self.request_checkpoint)):
                self._previous[number] = signal.signal(number, handler)
        return self

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python, nothing to restore
                signal.signal(number, previous)
        self._previous = {}

    def local_flag(self) -> bool:
        """This rank's view: a signal arrived or the stop file asks for a stop."""
        return self.signalled or self._file_pending()

    def _file_pending(self) -> bool:
        """The stop file exists and no run has acknowledged it since it was last touched."""
        if not self.stop_file:
            return False
        try:
            asked = os.stat(self.stop_file).st_mtime_ns
        except FileNotFoundError:
            return False
        try:
            return os.stat(self.stop_file + ".done").st_mtime_ns < asked
        except FileNotFoundError:
            return True

    def acknowledge(self, step: int) -> None:
        """Rank 0, after the checkpoint: write ``<stop file>.done`` with the step. The batch
        script requeues on this marker rather than on srun's exit code, which a rank
        killed while tearing down can turn into 143."""
        if self.stop_file:
            with open(self.stop_file + ".done", "w") as f:
                f.write(f"{step}\n")


class Agreed(NamedTuple):
    """What every rank of the job acts on after a step, on the head norm's device (read by the
    trainer in its one host read of the step)."""

    head_norm: torch.Tensor  # () float32: this candidate's head gradient norm over its shards
    flags: torch.Tensor  # (3,) float64: > 0 where some rank asked for a checkpoint, asked to stop;
    # the count of ranks whose candidate diverged


def agree(request: StopRequest, head_norm: torch.Tensor, slot: int = 0, slots: int = 1,
          diverged: bool = False) -> Agreed:
    """Collective over the world, the step's one all-reduce: the head gradient norm of each
    search candidate (``slots`` of them; this rank's in ``slot``; the squares of its shards'
    norms add up), this rank's requests (the checkpoint request is taken: cleared here) and
    whether this rank's candidate has diverged (counted: all of them is the search's end).
    Reads nothing back to the host."""
    asked, request.checkpoint_asked = request.checkpoint_asked, False
    local = torch.tensor([float(asked), float(request.local_flag()), float(diverged)], dtype=torch.float64)
    packed = torch.zeros(slots + 3, dtype=torch.float64, device=head_norm.device)
    packed[slots:] = local.to(head_norm.device, non_blocking=True)
    packed[slot] = head_norm.double() ** 2
    all_reduce(packed)  # the wrapper moves it to the group's device and back
    return Agreed(packed[slot].sqrt().float(), packed[slots:])
