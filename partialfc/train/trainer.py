"""The training loop over composable pieces: data, backbone engine, sharded head, optimizers,
checkpoints, logging and verification.

``Trainer(cfg).train()`` runs to ``total_steps`` optimizer steps (one step = ``grad_accum``
micro-batches per rank) and returns the final metrics. Works as one process or under any
launcher that :func:`partialfc.dist.init_distributed` understands.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
from omegaconf import OmegaConf

from partialfc import dist as pdist
from partialfc.errors import ConfigError, DistributedError, TrainingDiverged
from partialfc.eval.verification import VerificationSet
from partialfc.head import PartialFC
from partialfc.losses import build_loss
from partialfc.models import build_backbone
from partialfc.ops.collectives import all_reduce
from partialfc.train import checkpoint as ckpt
from partialfc.train.data import build_loader, prepare_dataset
from partialfc.train.engine import build_engine
from partialfc.train.logging import RunLogger, new_run_id, plot_curves
from partialfc.train.optim import build_optimizer, build_schedule, clip_grads_, grad_norm
from partialfc.train.preemption import Preempted, StopRequest
from partialfc.train.preflight import preflight
from partialfc.train.search import SearchDriver
from partialfc.train.state import Components, Progress, build_rank_state, build_shared, checkpoint_root, \
    resume_path, restore, seed_rank_stream

CURVES_FILE = "curves.png"


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use a loss scaler)``. ``auto``: bf16 on GPUs that support
    it, fp16 on older GPUs, fp32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return None, False
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[name]


def load_backbone_weights(backbone: torch.nn.Module, path: str) -> None:
    """Initialise from an exported backbone (``partialfc train export-backbone``) or a
    checkpoint; the class count of the run that produced it does not matter."""
    from partialfc.train.artifacts import read_backbone

    state = read_backbone(path)["state_dict"]
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        raise ckpt.CheckpointError(f"{path} does not fit this backbone: {str(err).splitlines()[0]}") from None


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        preflight(cfg)  # before the process group, the dataset and the model
        launch = pdist.init_distributed(timeout_s=pdist.resolve_timeout(cfg.dist.timeout_s))
        self.rank, self.world_size = pdist.get_rank(), pdist.get_world_size()
        # Search-Softmax: this rank's candidate is a complete trainer over its group's ranks.
        self.layout = pdist.candidate_groups(cfg.search.population) if cfg.search.enabled else None
        self.group = self.layout.group if self.layout is not None else None
        self.group_rank, self.group_size = pdist.get_rank(self.group), pdist.get_world_size(self.group)
        self.device = torch.device(f"cuda:{launch.local_rank}" if torch.cuda.is_available() else "cpu")
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        prefix, bins = prepare_dataset(cfg)
        self.loader = build_loader(cfg, prefix, self.device, self.group_rank, self.group_size)
        self.batches = self.loader.forever()
        self.num_classes = self.loader.num_classes
        self.steps_per_epoch = len(self.loader) // cfg.train.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} is more than the {len(self.loader)} "
                              f"batches per rank of an epoch of {prefix}; lower it or data.batch_size")
        self.total_steps = cfg.train.max_steps or max(1, round(cfg.train.epochs * self.steps_per_epoch))

        torch.manual_seed(cfg.seed)  # same backbone initialisation on every rank
        backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size,
                                  gradient_checkpointing=cfg.model.gradient_checkpointing,
                                  **dict(cfg.model.options)).to(self.device)
        if cfg.checkpoint.init_backbone:
            load_backbone_weights(backbone, cfg.checkpoint.init_backbone)
        seed_rank_stream(cfg.seed, self.group_rank, 0)  # dropout, ...
        self.head = PartialFC(cfg.model.embedding_size, self.num_classes,
                              loss=build_loss(cfg.loss.name, **dict(cfg.loss.params)),
                              sample_rate=cfg.head.sample_rate, seed=cfg.seed, init_std=cfg.head.init_std,
                              device=self.device, process_group=self.group, fused=str(cfg.head.fused),
                              dtype=torch.bfloat16 if str(cfg.head.storage) == "bf16" else torch.float32)
        self.head_optimizer = build_optimizer([self.head.weight], cfg.head.optimizer, sparse_rows=True)
        self.head_schedule = build_schedule(self.head_optimizer, cfg.head.optimizer.schedule, self.total_steps)
        autocast_dtype, use_scaler = resolve_precision(cfg.train.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.engine = build_engine(backbone, cfg, self.total_steps, self.scaler, autocast_dtype, self.group)
        self.autocast_dtype = autocast_dtype if cfg.train.engine == "ddp" else None
        self.eval_sets = [VerificationSet(p) for p in bins]
        self.parts = Components(self.engine, self.head, self.head_optimizer, self.head_schedule, self.scaler,
                                self.loader)
        self.search = None  # Search-Softmax driver (train/search.py); its state is in the checkpoints
        if self.layout is not None:
            reward_set = VerificationSet(cfg.search.reward or prefix + ".bin")
            self.search = SearchDriver(cfg, self.layout, self.parts, lambda: reward_set.evaluate(
                self.engine.module, group=self.group, batch_size=cfg.eval.batch_size, device=self.device,
                autocast_dtype=self.autocast_dtype).accuracy)
            self.parts = dataclasses.replace(self.parts, search=self.search)

        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.run_id = new_run_id()
        candidate = self.layout.candidate if self.layout is not None else 0
        self.checkpoint_root = checkpoint_root(cfg, candidate)
        self.checkpoint_requested = False  # agreed by all ranks
        self.local_checkpoint_request = False  # this rank's, from SIGUSR1
        self.stop = StopRequest()
        self.stop_requested = False
        self.last_accuracy: float | None = None
        resume = resume_path(cfg, candidate)
        if resume is not None:
            self.load(resume)
        if self.search is not None:
            self.search.begin_epoch(self.step // self.steps_per_epoch)
        self.logger = RunLogger(cfg.run_dir, self.run_id, cfg.log.wandb, OmegaConf.to_container(cfg),
                                resume_step=self.step if resume is not None else None)
        self.print_summary()
        if resume is not None:
            self.logger.print(f"resumed from {resume} at step {self.step}")

    def print_summary(self) -> None:
        """The start-up summary (rank 0; also in ``training.log``): data, model, loss and head,
        ranks and precision, steps."""
        cfg = self.cfg
        dtype, scaled = resolve_precision(cfg.train.precision, self.device)
        data = cfg.data.rec or f"synthetic ({cfg.data.synthetic.num_identities} identities)"
        for line in (
                f"run {cfg.run_dir}",
                f"data {data}: {self.num_classes} classes, {self.loader.num_images} images, {cfg.data.loader} loader",
                f"model {cfg.model.backbone} ({cfg.model.embedding_size}-d), {cfg.train.engine}",
                f"loss {cfg.loss.name} {dict(cfg.loss.params)}, head sample rate {self.head.sample_rate:g}",
                f"world {self.world_size} rank(s) on {self.device.type}, precision "
                f"{str(dtype or torch.float32).removeprefix('torch.')}{' with loss scaling' if scaled else ''}, "
                f"global batch {cfg.data.batch_size * cfg.train.grad_accum * self.world_size}",
                f"steps {self.step} -> {self.total_steps} ({self.steps_per_epoch} per epoch)"):
            self.logger.print(line)

    # ----------------------------------------------------------------- data
    @property
    def epoch(self) -> float:
        return self.loader.epoch + self.loader.batches_consumed / len(self.loader)

    # ----------------------------------------------------------------- one step
    def _head_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The head's loss; NaN (with a backward that reaches the backbone only) when any
        rank's embeddings are non-finite, so that all ranks skip the step together."""
        bad = all_reduce((~torch.isfinite(embeddings).all()).float().reshape(1), group=self.group)
        if bad.item():
            return embeddings.float().sum() * float("nan")
        if self.group_size > 1 and embeddings.requires_grad:
            # The head hands each rank the exact gradient of the global-batch mean for its own
            # rows; DDP/DeepSpeed then *average* the backbone gradients over the ranks. Scaling
            # by the world size here makes that average the gradient of the global mean loss.
            embeddings.register_hook(lambda grad: grad * self.group_size)
        return self.head(embeddings, labels)

    def _global_head_norm(self) -> torch.Tensor:
        """Head gradient norm over all shards; also shares the checkpoint and stop requests,
        so that every rank acts on them at the same step."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.head_optimizer)
        local = grad_norm([self.head.weight])
        # The signal handler only sets the local request; what the step acts on is the agreed flag.
        asked, self.local_checkpoint_request = self.local_checkpoint_request, False
        # One slot per search candidate (one slot without a search): the norm sums over this
        # candidate's shards only, the requests over the whole job.
        slots, mine = (self.layout.population, self.layout.candidate) if self.layout is not None else (1, 0)
        packed = torch.zeros(slots + 2, dtype=torch.float64)
        packed[slots:] = torch.tensor([float(asked), float(self.stop.local_flag())], dtype=torch.float64)
        packed[mine] = local.double().cpu() ** 2
        all_reduce(packed)  # over the world; the wrapper moves it to the group's device and back
        self.checkpoint_requested, self.stop_requested = bool(packed[slots] > 0), bool(packed[slots + 1] > 0)
        return packed[mine].sqrt().float()

    def _follow_epoch(self) -> None:
        """Losses with a per-epoch parameter (Random-Softmax's draw of ``a``) get each new
        epoch; the draw is seeded by the epoch, so a resumed run draws the same value."""
        set_epoch = getattr(self.head.loss, "set_epoch", None)
        if set_epoch is not None and self.loader.epoch != getattr(self, "_loss_epoch", None):
            self._loss_epoch = self.loader.epoch
            set_epoch(self._loss_epoch)

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        accum, wait, losses = self.cfg.train.grad_accum, 0.0, []
        for i in range(accum):
            tick = time.perf_counter()
            images, labels = next(self.batches)
            wait += time.perf_counter() - tick
            self._follow_epoch()
            last = i == accum - 1
            with self.engine.micro_step(last):
                autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                            if self.autocast_dtype is not None else nullcontext())
                with autocast:
                    loss = self._head_loss(self.engine(images), labels)
                self.engine.backward(loss, last)
            losses.append(loss.detach().float())
        loss = torch.stack(losses).mean().cpu()
        backbone_norm = self.engine.grad_norm()
        head_norm = self._global_head_norm()
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(head_norm)) and (
            backbone_norm is None or bool(torch.isfinite(backbone_norm)))
        # ``finite`` is the same on every rank (global loss, all-reduced norms): all ranks
        # step or skip together; the scaler's own per-optimizer checks would see only this
        # rank's head shard and could let the ranks' loss scales drift apart.
        backbone_norm = self.engine.step(finite, backbone_norm)
        if finite:
            clip_grads_([self.head.weight], self.cfg.head.optimizer.clip_grad_norm, head_norm)
            self.scaler.step(self.head_optimizer)
        self.head_optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update(None if finite else self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.head_schedule.step()
        self.step += 1
        self.skipped_steps += not finite
        self.consecutive_nonfinite = 0 if finite else self.consecutive_nonfinite + 1
        return {"loss": float(loss), "finite": finite, "grad_norm_backbone": float(backbone_norm),
                "grad_norm_head": float(head_norm), "data_wait": wait}

    # ----------------------------------------------------------------- loop
    def request_checkpoint(self, *_) -> None:
        """Ask for a checkpoint (safe from a signal handler): the ranks agree on it at the next
        step's all-reduce and all save after that step."""
        self.local_checkpoint_request = True

    def train(self) -> dict:
        """Run to the end; returns ``{"step", "loss", "accuracy", ...}``."""
        cfg = self.cfg
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGUSR1, self.request_checkpoint)
        self.stop.install()
        try:
            if cfg.eval.at_start and self.step == 0:
                self.evaluate()
            summary = self._loop()
            if cfg.eval.at_end:
                summary.update(self.evaluate())
            if self.step != getattr(self, "_saved_step", None):
                self.save()
            if self.logger.active and cfg.log.plot:
                plot_curves(self.logger.path, os.path.join(cfg.run_dir, CURVES_FILE))
            if self.last_accuracy is not None:
                self.logger.print(f"accuracy: {self.last_accuracy:.3f}")
            return summary
        except RuntimeError as err:
            reason = pdist.collective_failure(err)
            if reason is None:
                raise
            raise DistributedError(
                f"rank {self.rank} at step {self.step}: a collective failed ({reason}): a rank died, hung or was "
                f"stopped, or did not answer within dist.timeout_s={pdist.resolve_timeout(cfg.dist.timeout_s):g} s; "
                "resume from the last checkpoint") from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGUSR1, previous)
            self.stop.uninstall()
            self.close()

    def close(self) -> None:
        """Shut the data workers down and close the logs (every exit path of :meth:`train`)."""
        self.batches.close()
        self.loader.close()
        self.logger.close()

    def _loop(self) -> dict:
        cfg = self.cfg
        every = max(cfg.log.every_steps, 1)
        start, start_step = time.perf_counter(), self.step
        window = {"loss": [], "wait": 0.0, "time": time.perf_counter()}
        last: dict = {}
        while self.step < self.total_steps:
            last = self.train_step()
            if self.search is not None and self.step % self.steps_per_epoch == 0:
                self._search_epoch_end()
            if last["finite"]:
                window["loss"].append(last["loss"])
            window["wait"] += last["data_wait"]
            if self.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                path = self.save()
                raise TrainingDiverged(
                    f"{self.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient "
                    f"(step {self.step}, last loss {last['loss']}); checkpoint written to {path}. "
                    "Lower the learning rate, raise warm-up, or use bf16 instead of fp16.")
            if self.step % every == 0 or self.step == self.total_steps:
                self._log_train(last, window, start, start_step)
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < self.total_steps:
                self.evaluate()
            if self.stop_requested:
                path = self.save()
                if self.rank == 0:
                    self.stop.acknowledge(self.step)
                self.logger.print(f"stopped on request at step {self.step}; checkpoint {path}")
                raise Preempted(self.step, path)
            if (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0) or self.checkpoint_requested:
                self.save()
        return {"step": self.step, "loss": last.get("loss"), "skipped_steps": self.skipped_steps}

    def _search_epoch_end(self) -> None:
        """Collective: the search's step after each epoch (rewards, mu, copy of the best)."""
        record = self.search.end_epoch(self.step // self.steps_per_epoch - 1)
        if record is not None:
            self.logger.log("search", self.step, record)
            self.logger.print(f"search epoch {record['epoch']}: mu {record['mu']:.4f} -> {record['mu_next']:.4f} "
                              f"x {[round(x, 4) for x in record['x']]} reward "
                              f"{[round(r, 4) for r in record['reward']]} best {record['best']}")

    def _log_train(self, last: dict, window: dict, start: float, start_step: int) -> None:
        now = time.perf_counter()
        elapsed = now - window["time"]
        steps = len(window["loss"]) or 1
        per_step = (now - start) / max(self.step - start_step, 1)
        samples = self.cfg.data.batch_size * self.cfg.train.grad_accum * self.world_size
        metrics = {"epoch": round(self.epoch, 4),
                   "loss": float(np.mean(window["loss"])) if window["loss"] else float("nan"),
                   "lr_backbone": self.engine.lr, "lr_head": self.head_optimizer.param_groups[0]["lr"],
                   "samples_per_s": samples * steps / max(elapsed, 1e-9),
                   "eta_s": per_step * (self.total_steps - self.step),
                   "grad_norm_backbone": last["grad_norm_backbone"], "grad_norm_head": last["grad_norm_head"],
                   "data_wait_fraction": window["wait"] / max(elapsed, 1e-9), "skipped_steps": self.skipped_steps}
        self.logger.log("train", self.step, metrics)
        self.logger.print(
            f"step {self.step}/{self.total_steps} epoch {metrics['epoch']:.2f} loss {metrics['loss']:.4f} "
            f"lr {metrics['lr_backbone']:.4g}/{metrics['lr_head']:.4g} {metrics['samples_per_s']:.0f} samples/s "
            f"eta {int(metrics['eta_s']) // 60}m{int(metrics['eta_s']) % 60:02d}s "
            f"grad {metrics['grad_norm_backbone']:.3g}/{metrics['grad_norm_head']:.3g} "
            f"data {100 * metrics['data_wait_fraction']:.0f}% skipped {self.skipped_steps}")
        window.update(loss=[], wait=0.0, time=now)

    def evaluate(self) -> dict:
        """Verification accuracy on every ``.bin`` set (all ranks take part)."""
        out = {}
        for vs in self.eval_sets:
            result = vs.evaluate(self.engine.module, group=self.group, batch_size=self.cfg.eval.batch_size,
                                 device=self.device, autocast_dtype=self.autocast_dtype)
            name = os.path.basename(vs.path)
            self.logger.log("eval", self.step, {"set": name, **result.as_dict()})
            self.logger.print(f"eval {name} step {self.step}: accuracy {result.accuracy:.4f} "
                              f"+- {result.accuracy_std:.4f}, TAR@FAR=1e-3 {result.tar_at_far_1e3:.4f}")
            out.setdefault("accuracy", result.accuracy)
            out[f"accuracy/{name}"] = result.accuracy
        if "accuracy" in out:
            self.last_accuracy = out["accuracy"]
        return out

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> str:
        """Collective: write a complete checkpoint of this step."""
        shared = None
        if self.group_rank == 0:
            shared = build_shared(self.cfg, self.parts, Progress(self.step, self.skipped_steps, self.run_id))
        path = ckpt.save_checkpoint(self.checkpoint_root, self.step, shared, build_rank_state(self.parts),
                                    keep=self.cfg.checkpoint.keep, write_extra=self.engine.save_extra,
                                    rank=self.group_rank)
        self._saved_step = self.step
        self.checkpoint_requested = False
        self.logger.print(f"checkpoint step {self.step} -> {path}")
        return path

    def load(self, path: str) -> None:
        """Restore everything from ``path``; reshards the head if the world size changed."""
        self.step, self.skipped_steps, self.run_id = restore(path, self.cfg, self.parts)
        self._saved_step = self.step
