"""The backbone's data parallelism: DDP (or a single process) or a DeepSpeed engine.

Both satisfy :class:`BackboneEngine`, the interface the trainer drives. The sharded head never
goes through these: its gradients are not all-reduced and it keeps its own optimizer (stepped
with the engine's ``scaler``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import ContextManager, Protocol, runtime_checkable

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from partialfc import dist as pdist
from partialfc.errors import CheckpointError, ConfigError
from partialfc.train.optim import build_optimizer, build_schedule, clip_grads_, grad_norm, sync_schedule


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use a loss scaler)`` for ``train.precision`` ``name``.
    ``auto``: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    name = str(name)
    if name == "auto":
        if device.type != "cuda":
            return None, False
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[name]


@runtime_checkable
class BackboneEngine(Protocol):
    """The backbone, its data parallelism, optimizer and lr schedule, as the trainer drives them.

    One optimizer step: for each of ``grad_accum`` micro-batches, under ``micro_step(last)``,
    ``with autocast(): loss = head(engine(images))`` then ``backward(loss, last)``; then
    ``grad_norm()``, the trainer's shared decision ``finite``, and ``step(finite, norm)``."""

    module: torch.nn.Module  # the bare backbone (for evaluation, export and checkpoints)
    scaler: torch.amp.GradScaler  # the loss scaler (disabled unless fp16); the head's optimizer shares it
    autocast_dtype: torch.dtype | None  # dtype of the evaluator's autocast; None: fp32 or a self-casting engine

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images -> ``(B, D)`` embeddings."""

    def autocast(self) -> ContextManager:
        """The context for the forward pass and the loss (mixed precision where the engine wants it)."""

    def micro_step(self, last: bool) -> ContextManager:
        """The context for one micro-step's forward and backward; ``last``: the step's final one."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradient of ``loss / grad_accum``; reduced over the ranks when ``last``."""

    def grad_norm(self) -> torch.Tensor | None:
        """After the last backward: the unscaled, unclipped global gradient norm (the same on
        every rank), or None when it is only known after :meth:`step`."""

    def step(self, apply: bool, norm: torch.Tensor | None) -> torch.Tensor:
        """End the optimizer step: clip and update when ``apply`` (the same on every rank),
        else leave the parameters and optimizer state bitwise unchanged; either way clear the
        gradients and advance the lr schedule by one step. Returns the pre-clip norm; sets
        :attr:`applied`."""

    applied: bool
    """Whether the last :meth:`step` updated the parameters, known on the host: ``apply``,
    unless the engine skipped a non-finite step itself (the same on every rank)."""

    @property
    def lr(self) -> float:
        """The learning rate of the next step (first parameter group)."""

    def state_dict(self) -> dict:
        """What ``trainer.pt`` keeps of the backbone."""

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` output."""

    def save_files(self, directory: str) -> None:
        """Write what ``state_dict`` does not hold into the checkpoint ``directory``."""

    def load_files(self, directory: str) -> None:
        """Read it back from checkpoint ``directory`` (after :meth:`load_state_dict`)."""


class DDPEngine:
    """Backbone under DDP (plain module on one process), torch optimizer and schedule, autocast
    to the precision's dtype and a GradScaler for fp16; with ``train.compile`` the forward runs
    ``torch.compile``'s graph while :attr:`module` stays the plain backbone (its state_dict has
    no ``_orig_mod.`` keys, so checkpoints and exports do not depend on the option).

    ``backward`` divides the loss by ``accum``; inner micro-steps run under ``no_sync`` so
    gradients are all-reduced once per optimizer step."""

    def __init__(self, backbone: torch.nn.Module, optim, train, *, total_steps: int, device: torch.device,
                 group=None):
        self.module, self.device = backbone, torch.device(device)
        self.ddp = DistributedDataParallel(backbone, process_group=group) if pdist.get_world_size(group) > 1 else None
        self.model = self.ddp if self.ddp is not None else backbone
        if train.compile:  # DDP first, then compile (its optimizer splits the graph at the buckets)
            self.model = torch.compile(self.model)
        self.accum, self.clip = train.grad_accum, optim.clip_grad_norm
        self.applied = False  # no step yet
        self.autocast_dtype, use_scaler = resolve_precision(train.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.optimizer = build_optimizer(backbone.parameters(), optim)
        self.schedule = build_schedule(self.optimizer, optim.schedule, total_steps)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def autocast(self) -> ContextManager:
        """``torch.autocast`` to ``autocast_dtype`` (bf16/fp16), a null context for fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def micro_step(self, last: bool) -> ContextManager:
        if last or self.ddp is None:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.scaler.scale(loss / self.accum).backward()

    def grad_norm(self) -> torch.Tensor:
        """Unscales the gradients (fp16) and returns their norm (identical on all ranks)."""
        self.scaler.unscale_(self.optimizer)
        return grad_norm(self.module.parameters())

    def step(self, apply: bool, norm: torch.Tensor) -> torch.Tensor:
        """Clip and step unless ``apply`` is False (the scaler also skips non-finite steps),
        clear the gradients and advance the schedule."""
        if apply:
            clip_grads_(self.module.parameters(), self.clip, norm)
            self.scaler.step(self.optimizer)
        self.applied = apply
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state:
            raise CheckpointError("it was written by the deepspeed engine; resume it with train.engine=deepspeed")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        sync_schedule(self.schedule)

    def save_files(self, directory: str) -> None:
        """Nothing beyond ``state_dict`` (kept in ``trainer.pt``)."""

    def load_files(self, directory: str) -> None:
        """Nothing beyond ``state_dict``."""


@contextlib.contextmanager
def _frozen(optimizer: torch.optim.Optimizer, wrapper):
    """Within: ``optimizer.step()`` does nothing, so a DeepSpeed step that calls it (directly,
    or through a ZeRO/bf16 wrapper that then copies its unchanged fp32 master weights back
    to the model) leaves parameters and optimizer state as they were. Restores the entries a
    defaultdict ``state`` gains on lookup and ``wrapper``'s lazy link to that state."""
    had = set(optimizer.state)
    linked = getattr(wrapper, "_hp_optimizer_states_linked", None)
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step
        for param in [p for p in optimizer.state if p not in had]:
            del optimizer.state[param]
        if linked is not None:
            wrapper._hp_optimizer_states_linked = linked


TESTED_DEEPSPEED = (0, 19, 8)  # the oldest release that skips every non-finite step itself (pyproject's pin)


def _merge(into: dict, extra: Mapping) -> None:
    """``extra`` merged into ``into`` in place, nested mappings key by key."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


class DeepSpeedEngine:
    """Backbone in a DeepSpeed engine (ZeRO 0-2, bf16 or fp32) with a client torch optimizer.
    In bf16, ZeRO-1/2 accumulate gradients in fp32; ZeRO-0 would in bf16, so it refuses
    ``grad_accum > 1``.

    DeepSpeed casts the model and its inputs itself, divides the loss by the accumulation
    steps, reduces gradients at the boundary, clips the backbone (``gradient_clipping``) and
    steps the schedule. A step with ``apply`` False runs DeepSpeed's step with the client
    optimizer's ``step`` disabled (:func:`_frozen`); it is counted in ``skipped_steps``."""

    autocast_dtype = None  # the module itself is cast to bf16 (the evaluator follows its dtype)

    def __init__(self, backbone: torch.nn.Module, optim, train, *, micro_batch: int, total_steps: int,
                 device: torch.device):
        device = torch.device(device)
        dtype, use_scaler = resolve_precision(train.precision, device)
        if use_scaler:
            raise ConfigError(f"train.engine=deepspeed supports precision bf16 or fp32, not fp16 (train.precision="
                              f"{train.precision} on this device); set train.precision=bf16 or fp32")
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        if not pdist.is_initialized():  # one process, no launcher: a group of one, not MPI discovery
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0,
                                                 world_size=1, store=torch.distributed.HashStore())  # no port
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on reading it
        import deepspeed
        from packaging.version import Version  # a dependency of DeepSpeed

        if Version(deepspeed.__version__).release < TESTED_DEEPSPEED:
            raise ConfigError(f"train.engine=deepspeed needs DeepSpeed >= {'.'.join(map(str, TESTED_DEEPSPEED))} "
                              f"(installed: {deepspeed.__version__}, which applies some non-finite steps or asserts "
                              "on them); pip install -e '.[deepspeed]'")
        stage = train.deepspeed.zero_stage
        if dtype == torch.bfloat16 and stage == 0 and train.grad_accum > 1:
            raise ConfigError(f"train.engine=deepspeed with ZeRO-0 would add up the {train.grad_accum} micro-batches' "
                              "gradients in bf16 (DeepSpeed accumulates in fp32 from ZeRO-1); set "
                              "train.deepspeed.zero_stage=1 or 2, train.grad_accum=1, or train.engine=ddp")
        if dtype is not None:  # DeepSpeed casts the parameters only: BatchNorm's statistics must follow
            backbone.to(dtype)
        optimizer = build_optimizer(backbone.parameters(), optim)
        schedule = build_schedule(optimizer, optim.schedule, total_steps)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": train.grad_accum,
            "train_batch_size": micro_batch * train.grad_accum * pdist.get_world_size(),
            # the norm decides DeepSpeed's own skip of a non-finite step, which the trainer follows
            "zero_optimization": {"stage": stage, "compute_grad_norm": True},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": optim.clip_grad_norm,
            # DeepSpeed skips a non-finite bf16 step itself only when asked (default by version)
            "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
            # ZeRO-1/2 in bf16: gradients accumulate (and are reduced) in fp32, not the model's bf16
            **({"data_types": {"grad_accum_dtype": "fp32"}} if dtype == torch.bfloat16 and stage > 0 else {}),
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        extra = train.deepspeed.extra
        _merge(ds_config, OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else extra)
        # DeepSpeed takes the GPU numbered LOCAL_RANK unless told: under a one-GPU-per-task
        # binding that GPU does not exist, so name the one this process uses
        args = SimpleNamespace(device_rank=device.index or 0) if device.type == "cuda" else None
        self.applied = False  # no step yet
        self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
            args=args, model=backbone, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
        if train.compile:  # in place: the module and its state_dict keys stay as they are
            self.engine.compile()
        self.module = self.engine.module
        self.dtype = dtype or torch.float32
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images.to(self.dtype))

    def autocast(self) -> ContextManager:
        """A null context: DeepSpeed runs the module in its own dtype."""
        return contextlib.nullcontext()

    def micro_step(self, last: bool) -> ContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def grad_norm(self) -> torch.Tensor | None:
        """ZeRO-0: the norm of the reduced gradients (identical on all ranks). ZeRO-1/2: None;
        the gradients are partitioned, DeepSpeed's step takes their norm and skips itself on
        a non-finite one (``overflow``; bf16 ``check_grad_overflow``, on by default)."""
        return grad_norm(self.module.parameters()) if self.engine.zero_optimization_stage() == 0 else None

    def step(self, apply: bool, norm) -> torch.Tensor:
        """DeepSpeed's boundary step; with ``apply`` False its client optimizer does not step.

        DeepSpeed does not advance the schedule when it skips a step itself (non-finite
        gradients under ZeRO-1/2); this does, as DDP does. Returns DeepSpeed's global norm
        (else ``norm``) on the device, NaN where it is not finite (DeepSpeed says -1 or inf) or
        DeepSpeed skipped an applied step itself. DeepSpeed decides that skip on the host, from
        the same norm (``is_invalid_grad_norm``): :attr:`applied` says it without a read, so
        that the trainer skips the head's step too (the same on every rank)."""
        with contextlib.nullcontext() if apply else _frozen(self.engine.basic_optimizer, self.optimizer):
            self.engine.step()
        skipped_itself = apply and not self.engine.was_step_applied()
        self.applied = apply and not skipped_itself
        if not self.engine.was_step_applied():
            self.schedule.step()
        elif not apply:
            self.engine.skipped_steps += 1
        value = self.engine.get_global_grad_norm()
        if value is None:
            return norm
        value = torch.as_tensor(value, dtype=torch.float32)  # a tensor on the device: no host read here
        honest = torch.isfinite(value) & (value >= 0) & (not skipped_itself)  # its non-finite sentinel: -1 or inf
        return torch.where(honest, value, torch.full_like(value, float("nan")))

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def state_dict(self) -> dict:
        """The module's weights (for exports); the rest is in DeepSpeed's own files."""
        return {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Nothing: :meth:`load_files` restores the module, its optimizer and schedule."""

    def save_files(self, directory: str) -> None:
        self.engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag="backbone", save_latest=False)

    def load_files(self, directory: str) -> None:
        folder = os.path.join(directory, "deepspeed")
        if not os.path.isdir(folder):
            raise CheckpointError("it has no DeepSpeed state; it was written with train.engine=ddp")
        self.engine.load_checkpoint(folder, tag="backbone", load_lr_scheduler_states=True)


def build_engine(backbone: torch.nn.Module, optim, train, *, micro_batch: int, total_steps: int,
                 device: torch.device, group=None) -> BackboneEngine:
    """The engine ``train.engine`` names for ``backbone`` (already on ``device``).

    ``optim``: the backbone's OptimizerConfig; ``train``: the TrainConfig (precision, grad_accum,
    engine, deepspeed); ``micro_batch``: images per rank per micro-step; ``total_steps``: the
    schedule's horizon in optimizer steps; ``group``: the backbone's data-parallel ranks (DDP
    only; default: the world). fp16 under DeepSpeed is a ConfigError."""
    if train.engine == "deepspeed":
        if group is not None:
            raise ConfigError("train.engine=deepspeed trains over the whole world; a rank group needs train.engine=ddp")
        return DeepSpeedEngine(backbone, optim, train, micro_batch=micro_batch, total_steps=total_steps,
                               device=device)
    return DDPEngine(backbone, optim, train, total_steps=total_steps, device=device, group=group)
