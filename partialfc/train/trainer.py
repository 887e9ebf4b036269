"""The training loop over composable pieces: data, backbone engine, sharded head, optimizers,
checkpoints, logging and verification.

``Trainer(cfg).train()`` runs to ``total_steps`` optimizer steps (one step = ``grad_accum``
micro-batches per rank) and returns the final metrics. Works as one process or under any
launcher that :func:`partialfc.dist.init_distributed` understands. The trainer composes;
the parts own their state (:class:`~partialfc.train.train_state.TrainState`, saved by the
:class:`~partialfc.train.state.Checkpointer`) and their timing (checkpointer, evaluator,
:class:`~partialfc.train.logging.TrainMetrics`).
"""

from __future__ import annotations

import os
import time

import torch
from omegaconf import OmegaConf

from partialfc import dist as pdist
from partialfc.errors import ConfigError, DistributedError, TrainingDiverged
from partialfc.head.data_parallel import scale_for_data_parallel
from partialfc.head.optim import mark_head_gradient
from partialfc.train.build import build_backbone_for, build_head, build_search, describe_run, run_meta
from partialfc.train.config import Config
from partialfc.train.data import build_loader, prepare_dataset
from partialfc.train.engine import build_engine
from partialfc.train.evaluation import Evaluator
from partialfc.train.logging import RunLogger, TrainMetrics, new_run_id, plot_curves
from partialfc.train.optim import build_optimizer, build_schedule, clip_grads_, grad_norm
from partialfc.train.preemption import Preempted, StopRequest, agree
from partialfc.train.preflight import preflight
from partialfc.train.state import Checkpointer, checkpoint_root, resume_path
from partialfc.train.train_state import HeadShard, Progress, RngState, SyncedSchedule, TrainState, seed_rank_stream

CURVES_FILE = "curves.png"


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        preflight(cfg)  # before the process group, the dataset and the model
        launch = pdist.init_distributed(timeout_s=pdist.resolve_timeout(cfg.dist.timeout_s))
        self.rank, self.world_size = pdist.get_rank(), pdist.get_world_size()
        # Search-Softmax: this rank's candidate is a complete trainer over its group's ranks.
        self.layout = pdist.candidate_groups(cfg.search.population) if cfg.search.enabled else None
        self.group = self.layout.group if self.layout is not None else None
        self.group_rank, self.group_size = pdist.get_rank(self.group), pdist.get_world_size(self.group)
        self.device = launch.device
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        prefix, bins = prepare_dataset(cfg.data, cfg.eval.bins)
        self.loader = build_loader(cfg.data, prefix, self.device, self.group_rank, self.group_size)
        self.batches = self.loader.forever()
        self.steps_per_epoch = len(self.loader) // cfg.train.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} is more than the {len(self.loader)} "
                              f"batches per rank of an epoch of {prefix}; lower it or data.batch_size")
        self.total_steps = cfg.train.max_steps or max(1, round(cfg.train.epochs * self.steps_per_epoch))

        backbone = build_backbone_for(cfg, self.device)
        seed_rank_stream(cfg.seed, self.group_rank, 0)  # dropout, ...
        self.head = build_head(cfg, self.loader.num_classes, self.device, self.group)
        self.engine = build_engine(backbone, cfg.optim, cfg.train, micro_batch=cfg.data.batch_size,
                                   total_steps=self.total_steps, device=self.device, group=self.group)
        self.head_optimizer = build_optimizer([self.head.weight], cfg.head.optimizer, sparse_rows=True)
        self.head_schedule = build_schedule(self.head_optimizer, cfg.head.optimizer.schedule, self.total_steps)
        self.progress = Progress(run_id=new_run_id())
        shard = HeadShard(self.head)
        self.state = TrainState(
            shared={"progress": self.progress, "engine": self.engine, "head_optimizer": self.head_optimizer,
                    "head_schedule": SyncedSchedule(self.head_schedule), "scaler": self.engine.scaler,
                    "data": self.loader},
            local={"head": shard, "rng": RngState(cfg.seed, self.group_rank), "data": self.loader},
            rows={"head": shard, "head_optimizer": self.head_optimizer})
        self.search = None  # Search-Softmax driver (train/search.py); its state is in the checkpoints
        if self.layout is not None:
            self.search = build_search(cfg, self.layout, self.head.loss, self.state, self.engine, prefix, self.device)
            self.state.shared["search"] = self.search
        self.loss_epoch: int | None = None  # the epoch the loss was last told of
        candidate = self.layout.candidate if self.layout is not None else 0
        self.checkpointer = Checkpointer(cfg, checkpoint_root(cfg, candidate), self.state,
                                         lambda: run_meta(cfg, self.head), rank=self.group_rank,
                                         world_size=self.group_size, shard=(self.head.class_start, self.head.num_local),
                                         files=self.engine)
        self.requests = StopRequest()
        resume = resume_path(cfg, candidate)
        if resume is not None:
            self.checkpointer.restore(resume, self.head.num_classes)
        if self.search is not None:
            self.search.begin_epoch(self.step // self.steps_per_epoch)
        self.logger = RunLogger(cfg.run_dir, self.progress.run_id, cfg.log.wandb, OmegaConf.to_container(cfg),
                                resume_step=self.step if resume is not None else None)
        self.metrics = TrainMetrics(self.logger, cfg.log.every_steps,
                                    cfg.data.batch_size * cfg.train.grad_accum * self.world_size, self.total_steps)
        self.evaluator = Evaluator(bins, cfg.eval, self.engine.module, self.logger, group=self.group,
                                   device=self.device, autocast_dtype=self.engine.autocast_dtype)
        for line in describe_run(self):
            self.logger.print(line)
        if resume is not None:
            self.logger.print(f"resumed from {resume} at step {self.step}")

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def skipped_steps(self) -> int:
        return self.progress.skipped_steps

    @property
    def epoch(self) -> float:
        return self.loader.epoch + self.loader.batches_consumed / len(self.loader)

    # ----------------------------------------------------------------- one step
    def _follow_epoch(self) -> None:
        """Losses with a per-epoch parameter (Random-Softmax's draw of ``a``) get each new
        epoch; the draw is seeded by the epoch, so a resumed run draws the same value."""
        set_epoch = getattr(self.head.loss, "set_epoch", None)
        if set_epoch is not None and self.loader.epoch != self.loss_epoch:
            self.loss_epoch = self.loader.epoch
            set_epoch(self.loss_epoch)

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics (host
        values, except ``grad_norm_backbone`` under DeepSpeed ZeRO-1/2: a 0-dim tensor on the
        device, known after DeepSpeed's step, read when logged). A step with a non-finite loss
        or gradient on any rank is skipped by every rank."""
        accum, wait, losses = self.cfg.train.grad_accum, 0.0, []
        for i in range(accum):
            tick = time.perf_counter()
            images, labels = next(self.batches)
            wait += time.perf_counter() - tick
            self._follow_epoch()
            last = i == accum - 1
            with self.engine.micro_step(last):
                with self.engine.autocast():
                    loss = self.head(scale_for_data_parallel(self.engine(images), self.group), labels)
                self.engine.backward(loss, last)
            losses.append(loss.detach().float())
        loss = torch.stack(losses).mean()
        live_rows = mark_head_gradient(self.head.weight, accum, self.head.take_live_rows())
        backbone_norm = self.engine.grad_norm()
        scaler = self.engine.scaler
        if scaler.is_enabled():
            scaler.unscale_(self.head_optimizer)
        slot, slots = (self.layout.candidate, self.layout.population) if self.layout is not None else (0, 1)
        diverged = self.search is not None and self.search.diverged
        agreed = agree(self.requests, grad_norm([self.head.weight]), slot, slots, diverged)
        head_norm = agreed.head_norm
        norms = [head_norm] if backbone_norm is None else [head_norm, backbone_norm.to(head_norm.device)]
        values = torch.stack([loss.to(head_norm.device).double(), *(n.double() for n in norms)])
        # The step's one host read: the shared decision, the requests, the head's input check
        # and what the log shows. ``finite`` is the same on every rank (global loss, all-reduced
        # norms): all ranks step or skip together; the scaler's own per-optimizer checks would
        # see only this rank's head shard and could let the ranks' loss scales drift apart.
        read = torch.cat([torch.isfinite(values).all().double()[None], values, agreed.flags,
                          self.head.take_input_statuses().to(values.device, torch.float64)]).tolist()
        finite, loss_value, *norm_values = read[:1 + len(values)]
        checkpoint, stop, diverged_ranks = read[1 + len(values): 4 + len(values)]
        self.head.raise_for_inputs(read[4 + len(values):])  # the same InputError on every rank, before any update
        finite, head_value = bool(finite), norm_values[0]
        after = self.engine.step(finite, backbone_norm)
        # DeepSpeed ZeRO-1/2: the norm is known after its step, which skips a non-finite one
        # itself (decided on the host: engine.applied); the norm stays on the device until logged
        backbone_value = norm_values[1] if backbone_norm is not None else after
        finite = finite and self.engine.applied
        if finite:
            clip_grads_([self.head.weight], self.cfg.head.optimizer.clip_grad_norm, head_norm)
            scaler.step(self.head_optimizer, live_rows=live_rows)
        self.head_optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update(None if finite else scaler.get_scale() * scaler.get_backoff_factor())
        self.head_schedule.step()
        self.progress.count(finite)
        return {"loss": loss_value, "finite": finite, "grad_norm_backbone": backbone_value,
                "grad_norm_head": head_value, "data_wait": wait, "checkpoint_requested": checkpoint > 0,
                "stop_requested": stop > 0, "all_diverged": diverged_ranks == self.world_size}

    # ----------------------------------------------------------------- loop
    def train(self) -> dict:
        """Run to the end; returns ``{"step", "loss", "accuracy", ...}``."""
        cfg = self.cfg
        self.requests.install()
        try:
            if cfg.eval.at_start and self.step == 0:
                self.evaluator.evaluate(self.step)
            summary = self._loop()
            if cfg.eval.at_end:
                summary.update(self.evaluator.evaluate(self.step))
            if self.step != self.checkpointer.saved_step:
                self.save()
            if self.logger.active and cfg.log.plot:
                plot_curves(self.logger.path, os.path.join(cfg.run_dir, CURVES_FILE))
            if self.evaluator.last_accuracy is not None:
                self.logger.print(f"accuracy: {self.evaluator.last_accuracy:.3f}")
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
            self.requests.uninstall()
            self.close()

    def close(self) -> None:
        """Shut the data workers down and close the logs (every exit path of :meth:`train`)."""
        self.batches.close()
        self.loader.close()
        self.logger.close()

    def _loop(self) -> dict:
        last: dict = {}
        self.metrics.begin(self.step)
        while self.step < self.total_steps:
            last = self.train_step()
            self._check_divergence(last)
            if self.search is not None and self.step % self.steps_per_epoch == 0:
                was_diverged = self.search.diverged
                self.search.end_epoch(self.step // self.steps_per_epoch - 1, self.logger, self.step)
                if self.search.everyone_diverged:  # every rank gathered the same verdict
                    self._stop_diverged("every candidate of the search diverged", last)
                if was_diverged and not self.search.diverged:  # now a copy of the best candidate
                    self.progress.consecutive_nonfinite = 0
            self.metrics.update(self.step, last, self._log_context)
            if self.evaluator.due(self.step, self.total_steps):
                self.evaluator.evaluate(self.step)
            if last["stop_requested"]:
                path = self.save()
                if self.rank == 0:
                    self.requests.acknowledge(self.step)
                self.logger.print(f"stopped on request at step {self.step}; checkpoint {path}")
                raise Preempted(self.step, path)
            if self.checkpointer.due(self.step, last["checkpoint_requested"]):
                self.save()
        return {"step": self.step, "loss": last.get("loss"), "skipped_steps": self.skipped_steps}

    def _check_divergence(self, last: dict) -> None:
        """After a step: ``train.max_consecutive_nonfinite`` non-finite steps in a row end the
        run with a checkpoint and :class:`TrainingDiverged`. In a search they only mark this
        candidate diverged (it trains on, skipping, and at the epoch's end gets the lowest
        reward and the best candidate's state); the search ends when the step's agreement
        (or an epoch's end) says every candidate has diverged, on every rank at the same step."""
        limit = self.cfg.train.max_consecutive_nonfinite
        if self.search is None:
            if self.progress.consecutive_nonfinite >= limit:
                self._stop_diverged(f"{self.progress.consecutive_nonfinite} consecutive steps with a non-finite loss "
                                    "or gradient", last)
            return
        if self.progress.consecutive_nonfinite >= limit and not self.search.diverged:
            self.search.diverged = True
            self.logger.print(f"candidate {self.layout.candidate} diverged at step {self.step} ({limit} "
                              "consecutive non-finite steps); it is replaced by the best at the epoch's end")
        if last["all_diverged"]:
            self._stop_diverged("every candidate of the search diverged", last)

    def _stop_diverged(self, what: str, last: dict) -> None:
        """Collective: write a checkpoint and raise :class:`TrainingDiverged` saying ``what``.
        A search's checkpoint does not keep the divergence: a resume (with a lower learning
        rate, say) starts every candidate healthy."""
        if self.search is not None:
            self.search.diverged = False
        path = self.save()
        raise TrainingDiverged(f"{what} (step {self.step}, last loss {last['loss']}); checkpoint written to {path}. "
                               "Lower the learning rate, raise warm-up, or use bf16 instead of fp16.")

    def _log_context(self) -> dict:
        return {"epoch": round(self.epoch, 4), "lr_backbone": self.engine.lr,
                "lr_head": self.head_optimizer.param_groups[0]["lr"], "skipped_steps": self.skipped_steps}

    def save(self) -> str:
        """Collective: write a complete checkpoint of this step."""
        path = self.checkpointer.save(self.step)
        self.logger.print(f"checkpoint step {self.step} -> {path}")
        return path
