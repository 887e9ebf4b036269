"""``partialfc bench train``: end-to-end training throughput (data + backbone + head) of the
methods of ``partialfc bench head``, with each step's time split into phases.

Methods (``--methods``): ``full_softmax`` (plain data parallelism: every rank holds all class
centres, dense gradient all-reduced, ``torch.optim.SGD``), ``partialfc`` at each
``--sample-rate`` (rate 1 = model-parallel full softmax), ``dsoftmax_b`` / ``dsoftmax_kK``;
the sharded ones step with ``SparseRowSGD``. The backbone (``--backbone``) is replicated and
stepped with ``torch.optim.SGD``.

Data: a synthetic set (``--identities x --images-per-identity``, written once into ``--out``
and reused) read by ``TorchLoader`` with no worker processes (the ranks are daemonic and may
not have children, so decoding runs in the rank and is part of ``data``), or by DALI with
``--loader dali``. The head has ``--classes`` classes although the set has fewer identities:
a fixed random injection (seed 0, the same on every rank) maps identity ``i`` to a class in
``[0, classes)``, so the targets spread over all shards as in a real dataset; the other
classes only ever appear as negatives. Costs do not depend on which classes are targets,
except for D-Softmax-B, whose sampled centres are the batch's targets.

Phases of one step, each closed by ``torch.cuda.synchronize`` on CUDA:

- ``data``: waiting for the next batch (decode, copy to the device);
- ``forward``: backbone + head; the head's own collectives (all-gather of the embeddings,
  softmax reductions) are inside it, as is their share in ``backward``;
- ``backward``;
- ``comm``: the backbone's gradient all-reduce (mean, one flat buffer), done explicitly after
  backward; DDP is deliberately not used, since it overlaps this with ``backward``, so a real
  run is at least as fast. ``full_softmax`` also all-reduces its dense class-matrix gradient here;
- ``optimizer``: backbone SGD + head step, gradients cleared.

``step_s`` is the timed loop's wall time per step (after ``--warmup`` steps), the phases their
per-step means, both averaged over ranks: they sum to ``step_s`` up to the loop's own
bookkeeping. ``--batch`` is the global batch, as in ``partialfc bench head`` (each rank loads
``batch / world_size`` images); ``samples_per_s`` = ``batch / step_s``. Peak memory per rank as in
``partialfc bench head``. ``--compile`` runs every configuration twice, eager and with the
backbone under ``torch.compile`` (compiled during the warm-up steps), so the table holds the
two side by side. ``host_syncs`` and ``collectives``: what rank 0's step makes a host
wait for and sends, counted over one more untimed step by
:class:`~partialfc.testing.host_syncs.HostSyncCounter` (a GPU's slowness counted on any
device). Each configuration runs in fresh processes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from partialfc.bench.common import autocast, average_gradients, build_head, configs, method_label, peak_bytes, setup
from partialfc.errors import InputError
from partialfc.head.optim import mark_head_gradient
from partialfc.ops.collectives import barrier
from partialfc.testing.host_syncs import HostSyncCounter

PHASES = ("data", "forward", "backward", "comm", "optimizer")
COLOURS = ("tab:gray", "tab:blue", "tab:orange", "tab:red", "tab:green")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", default="100000", help="comma-separated class counts of the head")
    parser.add_argument("--sample-rate", default="1.0,0.1", help="comma-separated Partial FC rates")
    parser.add_argument("--methods", default="full_softmax,partialfc",
                        help="comma-separated: full_softmax, partialfc, dsoftmax_b, dsoftmax_k64, ...")
    parser.add_argument("--backbone", default="iresnet_tiny", help="backbone name (partialfc.models)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--batch", type=int, default=64,
                        help="global batch: all ranks together, each loads batch / world size (as in bench head)")
    parser.add_argument("--nproc", default="1", help="comma-separated world sizes (gloo on CPU, NCCL on CUDA)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast dtype of backbone and head (fp16 without loss scaling: timing only)")
    parser.add_argument("--loader", default="torch", choices=["torch", "dali"], help="input pipeline")
    parser.add_argument("--identities", type=int, default=200, help="synthetic set: identities")
    parser.add_argument("--images-per-identity", type=int, default=8, help="synthetic set: images per identity")
    parser.add_argument("--compile", action="store_true",
                        help="also run every configuration with the backbone under torch.compile (side by side)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train"), help="output directory")
    parser.add_argument("--name", default="bench_train", help="base name of the output files")


def _build_loader(cfg: dict, device: torch.device):
    common = dict(batch_size=cfg["batch"] // cfg["world_size"], device=device, seed=0)
    if cfg["loader"] == "dali":
        from partialfc.data.dali_loader import DaliLoader

        return DaliLoader(cfg["data"], num_threads=max(1, cfg["threads"] // cfg["world_size"]), **common)
    from partialfc.data.torch_loader import TorchLoader

    return TorchLoader(cfg["data"], num_workers=0, **common)


def _step_phases(cfg: dict, device: torch.device, world_size: int):
    """Build the training pieces; return the step as ``[(phase, fn)]`` in :data:`PHASES` order
    and the head (for its sample rate)."""
    from partialfc.models import build_backbone

    torch.manual_seed(0)  # the same backbone on every rank
    backbone = build_backbone(cfg["backbone"], cfg["dim"]).to(device)
    if cfg["compile"]:  # compiled in the warm-up steps
        backbone = torch.compile(backbone)
    backbone_opt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sharded = cfg["method"] != "full_softmax"
    # the sharded head bounded as the trainer's: no host read inside its step
    head, head_opt, replicated_head = build_head(cfg, device, cfg["batch"] // world_size if sharded else None)
    mapping = torch.randperm(cfg["classes"], generator=torch.Generator().manual_seed(0))[:cfg["identities"]]
    mapping = mapping.to(device)
    stream = _build_loader(cfg, device).forever()
    state: dict = {}

    def data():
        state["images"], labels = next(stream)
        state["labels"] = mapping[labels]

    def forward():
        with autocast(device, cfg["dtype"]):
            state["loss"] = head(backbone(state.pop("images")), state.pop("labels"))

    def comm():
        if world_size > 1:
            for bucket in (list(backbone.parameters()), replicated_head):
                if bucket:
                    average_gradients(bucket, world_size)

    def optimizer():
        backbone_opt.step()
        if sharded:  # as the trainer steps it: the input check read once, the gradient marked
            head.check_inputs()
            head_opt.step(live_rows=mark_head_gradient(head.weight, 1, head.take_live_rows()))
        else:
            head_opt.step()
        for opt in (backbone_opt, head_opt):
            opt.zero_grad(set_to_none=True)

    steps = [data, forward, lambda: state.pop("loss").backward(), comm, optimizer]
    return list(zip(PHASES, steps)), head


def _measure(rank: int, world_size: int, cfg: dict) -> dict:
    """One rank: per-step loop seconds and phase seconds, peak bytes, the head's sample rate."""
    device, baseline, _, _ = setup(rank, world_size, cfg)  # (its random batch is not used)
    phases, head = _step_phases(cfg, device, world_size)

    def step() -> list[float]:
        marks = [time.perf_counter()]
        for _, fn in phases:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])]

    for _ in range(cfg["warmup"]):
        step()
    with HostSyncCounter() as counted:  # one more untimed step, its host reads and collectives counted
        step()
    barrier()
    start = time.perf_counter()
    times = [step() for _ in range(cfg["steps"])]
    loop_s = (time.perf_counter() - start) / cfg["steps"]
    return dict(loop_s=loop_s, phases=[sum(col) / len(col) for col in zip(*times)],
                peak=peak_bytes(device, baseline), rate=head.sample_rate, syncs=counted.syncs,
                collectives=counted.collectives)


def _record(cfg: dict) -> dict:
    """Run ``cfg`` on fresh processes; one JSON record (NaN times when it failed)."""
    from partialfc.testing import run_distributed

    world = cfg["world_size"]
    record = dict(method=cfg["method"], compiled=cfg["compile"], classes=cfg["classes"], sample_rate=cfg["rate"],
                  world_size=world, batch_per_rank=cfg["batch"] // world, global_batch=cfg["batch"], backbone=cfg["backbone"],
                  dim=cfg["dim"], dtype=cfg["dtype"], device=cfg["device"], loader=cfg["loader"],
                  identities=cfg["identities"], status="ok")
    try:
        ranks = run_distributed(_measure, world, cfg, backend="nccl" if cfg["device"] == "cuda" else "gloo",
                                timeout=3600)
    except RuntimeError as err:  # an out-of-memory configuration is a result, not a crash
        text = str(err)
        record["status"] = "oom" if "out of memory" in text.lower() else "error: " + text.splitlines()[-1][:200]
        ranks = [dict(loop_s=float("nan"), phases=[float("nan")] * len(PHASES), peak=float("nan"), rate=cfg["rate"],
                      syncs=None, collectives=None)]
    step_s = sum(r["loop_s"] for r in ranks) / len(ranks)
    record.update(sample_rate=ranks[0]["rate"], step_s=step_s, samples_per_s=record["global_batch"] / step_s,
                  peak_mem_mb=max(r["peak"] for r in ranks) / 2**20, host_syncs=ranks[0]["syncs"],
                  collectives=ranks[0]["collectives"])
    for i, phase in enumerate(PHASES):
        seconds = sum(r["phases"][i] for r in ranks) / len(ranks)
        record.update({f"{phase}_s": seconds, f"{phase}_frac": seconds / step_s})
    return record


def _table_rows(records: list[dict]) -> list[dict]:
    """Records with each phase as ``"ms (percent)"`` for the Markdown table."""
    return [{**r, **{p: f"{1e3 * r[p + '_s']:.1f} ({r[p + '_frac']:.0%})" for p in PHASES}} for r in records]


def _figure(records: list[dict], title: str):
    """Left: stacked phase times per configuration; right: samples/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    labels = [f"{method_label(r)}{' compiled' if r.get('compiled') else ''}\nx{r['world_size']}" for r in ok]
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(ok) + 4), 4.5))
    bottom = [0.0] * len(ok)
    for phase, colour in zip(PHASES, COLOURS):
        heights = [1e3 * r[f"{phase}_s"] for r in ok]
        ax_t.bar(range(len(ok)), heights, bottom=bottom, color=colour, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_s.bar(range(len(ok)), [r["samples_per_s"] for r in ok], color="tab:purple")
    for ax, ylabel in ((ax_t, "ms per step"), (ax_s, "samples / s (global)")):
        ax.set_xticks(range(len(ok)), labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _dataset(args) -> str:
    """Prefix of the synthetic set in ``args.out`` (written on first use, shuffled for DALI)."""
    from partialfc.data.synthetic import write_synthetic_dataset

    prefix = args.out / f"synthetic_{args.identities}x{args.images_per_identity}"
    if not Path(str(prefix) + ".rec").exists():
        args.out.mkdir(parents=True, exist_ok=True)
        write_synthetic_dataset(prefix, args.identities, args.images_per_identity, verification_pairs=0,
                                shuffle=True)
    return str(prefix)


def run(args) -> int:
    from rich.console import Console
    from rich.progress import track

    from partialfc.bench.report import markdown_table, stamp_records, write_outputs

    runs = [{**cfg, "compile": compiled} for cfg in configs(argparse.Namespace(**vars(args), no_reference=False))
            for compiled in ((False, True) if args.compile else (False,))]
    if any(c["classes"] < args.identities for c in runs):
        raise ValueError(f"--classes must be at least --identities ({args.identities})")
    if any(c["batch"] % c["world_size"] for c in runs):
        raise InputError(f"--batch {args.batch} (the global batch) must divide evenly over --nproc {args.nproc}")
    extra = dict(backbone=args.backbone, loader=args.loader, warmup=args.warmup, identities=args.identities,
                 data=_dataset(args))
    records = [_record({**cfg, **extra}) for cfg in
               track(runs, description="bench train", console=Console(stderr=True))]
    hardware = stamp_records(records, "train", args.device)
    columns = [("method", "method"), ("compiled", "compiled"), ("sample_rate", "rate"), ("classes", "classes"),
               ("world_size", "ranks"), ("global_batch", "global batch"), ("step_s", "step s"), ("samples_per_s", "samples/s"),
               *[(p, f"{p} ms (%)") for p in PHASES], ("host_syncs", "host syncs/step"),
               ("collectives", "collectives/step"), ("peak_mem_mb", "peak MB/rank"), ("status", "status")]
    setting = (f"{args.backbone}, dim {args.dim}, global batch {args.batch}, {args.dtype}, {args.loader} loader, "
               f"{hardware}, torch {torch.__version__}")
    table = (f"Training step (data + forward + backward + gradient all-reduce + optimizer), {setting}; "
             f"{args.identities}x{args.images_per_identity} synthetic images, labels spread over the classes\n\n"
             + markdown_table(_table_rows(records), columns))
    fig = _figure(records, f"Training step - {setting}")
    paths = write_outputs(args.out, args.name, records, table, fig)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r["status"] in ("ok", "oom") for r in records) else 1
