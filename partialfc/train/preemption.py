"""Stop requests: preemption warnings and time limits end in a checkpoint and exit code 3.

Sources of a request, any rank:

- the file named by ``$PARTIALFC_STOP_FILE`` exists (the SLURM templates create it when the
  batch shell receives ``--signal=B:USR1@T``; see ``slurm/preemptible.sh``), unless an earlier
  run already acknowledged it (``<stop file>.done`` as new as the file: a leftover, ignored);
- SIGTERM (the scheduler's kill at the time limit, ``scancel``, a preemption with grace time).

The trainer folds :meth:`StopRequest.local_flag` into a collective every step performs
anyway, so all ranks see the request at the same step boundary, checkpoint together and
exit with :data:`EXIT_PREEMPTED`; the batch script then requeues the job.
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_PREEMPTED = 3
STOP_FILE_ENV = "PARTIALFC_STOP_FILE"


class Preempted(Exception):
    """Training stopped on request after writing a checkpoint at ``step``."""

    def __init__(self, step: int, path: str):
        super().__init__(f"stopped on request at step {step}; checkpoint {path}")
        self.step, self.path = step, path


class StopRequest:
    """Watches the stop file and SIGTERM; ``install()``/``uninstall()`` around training."""

    def __init__(self, stop_file: str | None = None):
        self.stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV)
        self.signalled = False
        self._previous = None

    def _on_signal(self, *_) -> None:
        self.signalled = True

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

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
