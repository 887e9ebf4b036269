"""Run a function on ``world_size`` real processes joined by a gloo (or NCCL) group.

``run_distributed(fn, world_size, *args)`` spawns the processes, initialises the default
process group on each, calls ``fn(rank, world_size, *args)`` and returns the list of the
ranks' return values (picklable; tensors are moved to CPU by the caller). An exception on any
rank is re-raised in the parent with that rank's traceback; a rank that hangs is killed
after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from partialfc.dist import NCCL_FAULT_ENV
from partialfc.ops.collectives import barrier
from partialfc.testing.ports import reserved_port


def _worker(rank, world_size, port, backend, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":  # as init_distributed: each rank on its own GPU, errors raised, not aborted
            torch.cuda.set_device(rank % torch.cuda.device_count())
            for name, value in NCCL_FAULT_ENV.items():
                os.environ.setdefault(name, value)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}")
        # Every rank's group is connected before any rank runs fn: a rank whose fn tears its
        # group down at once (to make another) cannot close a pair a peer is still connecting.
        barrier()
        # Plain pickle copies tensor data into the message; the queue's own pickler would
        # pass shared-memory handles that die with this process before the parent reads them.
        queue.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - forwarded to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 300.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results by rank."""
    with reserved_port() as port:  # held until the ranks are gone: no other process can take it meanwhile
        return _spawn(fn, world_size, args, backend, timeout, port)


def _spawn(fn, world_size: int, args: tuple, backend: str, timeout: float, port: int) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except queue_module.Empty:
                missing = sorted(set(range(world_size)) - set(results))
                errors.append(f"ranks {missing} gave no result within {timeout:.0f} s (hang or crash)")
                break
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks may now hang in a collective: stop waiting
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
