"""The backbone's data parallelism: DDP (or a single process) or a DeepSpeed engine.

Both expose the same small interface to the trainer. The sharded head never goes through
these: its gradients are not all-reduced and it keeps its own optimizer.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from partialfc import dist as pdist
from partialfc.errors import ConfigError
from partialfc.train.optim import build_optimizer, build_schedule, clip_grads_, grad_norm, sync_schedule


class DDPEngine:
    """Backbone under DDP (plain module on one process), torch optimizer and schedule.

    ``backward`` divides the loss by ``accum``; inner micro-steps run under ``no_sync`` so
    gradients are all-reduced once per optimizer step."""

    def __init__(self, backbone: torch.nn.Module, cfg, total_steps: int, scaler: torch.amp.GradScaler,
                 group=None):
        self.module = backbone
        self.model = (DistributedDataParallel(backbone, process_group=group) if pdist.get_world_size(group) > 1
                      else backbone)
        self.accum = cfg.train.grad_accum
        self.clip = cfg.optim.clip_grad_norm
        self.scaler = scaler
        self.optimizer = build_optimizer(backbone.parameters(), cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.optim.schedule, total_steps)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def micro_step(self, last: bool):
        """Context for one micro-step's forward and backward."""
        if last or self.model is self.module:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.scaler.scale(loss / self.accum).backward()

    def grad_norm(self) -> torch.Tensor:
        """Unscaled, unclipped gradient norm of the backbone (identical on all ranks)."""
        self.scaler.unscale_(self.optimizer)
        return grad_norm(self.module.parameters())

    def step(self, apply: bool, norm: torch.Tensor) -> torch.Tensor:
        """Clip, step (unless ``apply`` is False; the scaler also skips non-finite steps),
        clear the gradients and advance the schedule. Returns the pre-clip norm."""
        if apply:
            clip_grads_(self.module.parameters(), self.clip, norm)
            self.scaler.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict, path: str) -> None:
        self.module.load_state_dict(state["module"])
        if "optimizer" not in state:
            raise ValueError(f"{path} was written by the deepspeed engine; resume it with train.engine=deepspeed")
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        sync_schedule(self.schedule)

    def save_extra(self, directory: str) -> None:
        """Nothing beyond ``state_dict`` (kept in ``trainer.pt``)."""


class DeepSpeedEngine:
    """Backbone in a DeepSpeed engine (ZeRO 0-2, bf16 or fp32) with a client torch optimizer.

    DeepSpeed divides the loss by the accumulation steps, reduces gradients at the boundary,
    clips the backbone (``gradient_clipping``) and steps its schedule itself."""

    def __init__(self, backbone: torch.nn.Module, cfg, total_steps: int, bf16: bool):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        if not pdist.is_initialized():  # one process, no launcher: a group of one, not MPI discovery
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0,
                                                 world_size=1, store=torch.distributed.HashStore())  # no port
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on reading it
        import deepspeed

        optimizer = build_optimizer(backbone.parameters(), cfg.optim)
        schedule = build_schedule(optimizer, cfg.optim.schedule, total_steps)
        world = pdist.get_world_size()
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world,
            "zero_optimization": {"stage": cfg.train.deepspeed.zero_stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": cfg.optim.clip_grad_norm,
            "bf16": {"enabled": bf16},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
            **dict(cfg.train.deepspeed.extra),
        }
        self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=backbone, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
        self.module = self.engine.module
        self.dtype = torch.bfloat16 if bf16 else torch.float32

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images.to(self.dtype))

    def micro_step(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def grad_norm(self):
        return None  # known after DeepSpeed's step

    def step(self, apply: bool, norm) -> torch.Tensor:
        """DeepSpeed's boundary step (it handles fp16 overflow itself; ``apply`` is advisory)."""
        self.engine.step()
        value = self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if value is None else float(value))

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict, path: str) -> None:
        folder = os.path.join(path, "deepspeed")
        if not os.path.isdir(folder):
            raise ValueError(f"{path} has no DeepSpeed state; it was written with train.engine=ddp")
        self.engine.load_checkpoint(folder, tag="backbone", load_lr_scheduler_states=True)

    def save_extra(self, directory: str) -> None:
        self.engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag="backbone", save_latest=False)


def build_engine(backbone: torch.nn.Module, cfg, total_steps: int, scaler, autocast_dtype, group=None):
    """The configured engine; ``group``: the backbone's data-parallel ranks (DDP only; default: the world)."""
    if cfg.train.engine == "deepspeed":
        if scaler.is_enabled():
            raise ConfigError(f"train.engine=deepspeed supports precision bf16 or fp32, not fp16 (train.precision="
                              f"{cfg.train.precision} on this device); set train.precision=fp32")
        return DeepSpeedEngine(backbone, cfg, total_steps, bf16=autocast_dtype == torch.bfloat16)
    return DDPEngine(backbone, cfg, total_steps, scaler, group)
