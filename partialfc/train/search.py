"""Search-Softmax as one distributed job (ICML 2020, arXiv 2007.06542; docs/losses.md section 4).

The world is ``population x G`` ranks (:func:`partialfc.dist.candidate_groups`); each
candidate is a complete trainer of G ranks. Per epoch ``e``: before ``search.start_epoch``
every candidate trains with ``x = mu``; from it, candidate ``c`` draws ``x ~ N(mu, sigma)``
from the ``(seed, e, c)`` stream of :data:`partialfc.seeding.Stream.SEARCH`. The loss gets
``a = -|x| exp(s/3)`` (:func:`partialfc.losses.search.global_a`). After the epoch each
candidate's reward (verification accuracy on the reward set, evaluated by its own ranks) is
all-gathered over the world; ``r = 2 (R - mean R) / (max R - min R + 1e-6)``; one Adam step
on ``mu`` minimises ``mean_c(-r_c log N(x_c; mu, sigma))`` in float64, identically on every
rank (``mode: random`` skips it); the best candidate's complete state (first best on ties)
is broadcast to every candidate over the cross groups, so all continue from the best model.
A candidate that diverged during the epoch is not evaluated: its reward is
:data:`DIVERGED_REWARD` and it is never the best (the trainer ends the search only when
every candidate has diverged).
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import torch

from partialfc import dist as pdist
from partialfc.dist import CandidateLayout
from partialfc.losses.search import global_a
from partialfc.ops.collectives import all_gather, broadcast, broadcast_object
from partialfc.seeding import Stream, seeded_generator
from partialfc.train.config_schema import Config
from partialfc.train.train_state import TrainState

SEARCH_FILE = "search.jsonl"
DIVERGED_REWARD = 0.0  # a diverged candidate's reward: the lowest accuracy there is
SCHEDULE_FILE = "a_schedule.json"
PLOT_FILE = "search.png"


def normalised_rewards(rewards: list[float]) -> torch.Tensor:
    """``2 (R - mean R) / (max R - min R + 1e-6)`` in float64: ``(population,)``."""
    r = torch.tensor(rewards, dtype=torch.float64)
    return 2.0 * (r - r.mean()) / (r.max() - r.min() + 1e-6)


class SearchPolicy:
    """The policy ``N(mu, sigma)`` over ``x`` and Adam on ``mu`` (float64; no randomness in
    the update, so every rank computes the same ``mu`` from the same rewards)."""

    def __init__(self, mu: float, sigma: float, lr: float, betas: tuple[float, float], seed: int):
        self.mu = torch.tensor(float(mu), dtype=torch.float64, requires_grad=True)
        self.sigma, self.seed = float(sigma), int(seed)
        self.optimizer = torch.optim.Adam([self.mu], lr=lr, betas=tuple(betas))

    def draw(self, epoch: int, candidate: int) -> float:
        """``x ~ N(mu, sigma)`` from the ``(seed, epoch, candidate)`` stream."""
        gen = seeded_generator(self.seed, Stream.SEARCH, int(epoch), int(candidate))
        return self.mu.item() + self.sigma * torch.randn((), generator=gen, dtype=torch.float64).item()

    def update(self, draws: list[float], rewards: list[float]) -> None:
        """One Adam step on ``mu`` for ``mean_c(-r_c log N(x_c; mu, sigma))``."""
        x = torch.tensor(draws, dtype=torch.float64)
        log_prob = torch.distributions.Normal(self.mu, self.sigma).log_prob(x)
        loss = -(normalised_rewards(rewards) * log_prob).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"mu": self.mu.item(), "adam": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.mu.fill_(state["mu"])
        self.optimizer.load_state_dict(state["adam"])


def gather_rewards(layout: CandidateLayout, reward: float) -> list[float]:
    """Collective over the world: every candidate's reward, by candidate (each candidate's
    first rank's value)."""
    rows = all_gather(torch.tensor([reward], dtype=torch.float64))
    return [float(rows[layout.world_rank(c, 0)]) for c in range(layout.population)]


def _strip(obj, leaves: list[torch.Tensor]):
    """``obj`` with every tensor replaced by its index in ``leaves`` (appended)."""
    if torch.is_tensor(obj):
        leaves.append(obj)
        return ("tensor", len(leaves) - 1)
    if isinstance(obj, dict):
        return {k: _strip(v, leaves) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, leaves) for v in obj)
    return obj


def _fill(obj, leaves: list[torch.Tensor]):
    """Inverse of :func:`_strip`."""
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "tensor" and isinstance(obj[1], int):
        return leaves[obj[1]]
    if isinstance(obj, dict):
        return {k: _fill(v, leaves) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, leaves) for v in obj)
    return obj


def broadcast_state(state: dict | None, src: int, group, device: torch.device) -> dict:
    """Collective over ``group``: the nested ``state`` of world rank ``src`` on every rank
    (others pass None). The structure and plain values travel pickled
    (``broadcast_object_list``), every tensor as a tensor (on ``device`` for the transfer,
    back on the CPU if it was there)."""
    leaves: list[torch.Tensor] = []
    skeleton = _strip(state, leaves) if state is not None else None
    skeleton, meta = broadcast_object((skeleton, [(tuple(t.shape), t.dtype, t.device.type) for t in leaves]),
                                      src, group)
    if state is None:
        leaves = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, _ in meta]
    else:
        leaves = [t.detach().to(device).contiguous() for t in leaves]
    for t in leaves:
        broadcast(t, src, group)
    return _fill(skeleton, [t.cpu() if kind == "cpu" else t for t, (_, _, kind) in zip(leaves, meta)])


class SearchDriver:
    """Runs the search around a trainer: :meth:`begin_epoch` sets the epoch's ``a`` on the
    loss, :meth:`end_epoch` (collective over the world) rewards, updates and copies.

    ``loss``: the candidate's Search-Softmax; ``state``: its training state (the best
    candidate's is copied onto the others); ``reward()`` evaluates this candidate's model
    (collective over its group);
    ``reward_hook(a)``, if set, replaces it (tests rig the reward as a function of ``a``).
    ``history``: one record per search epoch; ``schedule``: the ``a`` the run's model trained
    with in every finished epoch (the best candidate's from ``start_epoch``)."""

    def __init__(self, cfg: Config, layout: CandidateLayout, loss, state: TrainState, reward: Callable[[], float],
                 device: torch.device):
        s = cfg.search
        self.layout, self.loss, self.state, self.reward, self.device = layout, loss, state, reward, device
        self.start_epoch, self.mode, self.run_dir = s.start_epoch, str(s.mode), cfg.run_dir
        self.write_files = pdist.get_rank() == 0
        self.plot = bool(cfg.log.plot)
        self.policy = SearchPolicy(s.mu, s.sigma, s.lr, tuple(s.betas), cfg.seed)
        self.reward_hook: Callable[[float], float] | None = None
        self.history: list[dict] = []
        self.schedule: list[float] = []
        self.x: float | None = None  # this candidate's draw for the current epoch
        self.diverged = False  # this candidate diverged this epoch (set by the trainer, agreed by its ranks)
        self.everyone_diverged = False  # the last epoch's end found every candidate diverged

    def begin_epoch(self, epoch: int) -> float:
        """Draw (or, before ``start_epoch``, take ``mu``) and set ``a``; returns ``a``."""
        self.x = self.policy.draw(epoch, self.layout.candidate) if epoch >= self.start_epoch else self.policy.mu.item()
        self.loss.set_a(global_a(self.x, self.loss.s))
        return self.loss.a

    def end_epoch(self, epoch: int, logger=None, step: int = 0) -> dict | None:
        """Collective: after epoch ``epoch``; returns its search record (None before
        ``start_epoch``), logged as a ``search`` record at ``step`` with a console line when a
        :class:`~partialfc.train.logging.RunLogger` is given, and sets the next epoch's ``a``.

        Every epoch's end gathers which candidates diverged: a diverged one is not evaluated,
        gets :data:`DIVERGED_REWARD` and the best candidate's state (before ``start_epoch`` the
        first healthy one's). When all have diverged, nothing is updated or copied and
        :attr:`everyone_diverged` tells every rank to stop."""
        a, searching = self.loss.a, epoch >= self.start_epoch
        if self.diverged:
            reward = float("nan")
        elif not searching:
            reward = 0.0  # warm-up: nothing is evaluated, only divergence is gathered
        else:
            reward = self.reward_hook(a) if self.reward_hook is not None else self.reward()
        gathered = gather_rewards(self.layout, reward)
        diverged = [c for c, r in enumerate(gathered) if math.isnan(r)]
        self.everyone_diverged = len(diverged) == len(gathered)
        if self.everyone_diverged:
            return None
        rewards = [DIVERGED_REWARD if math.isnan(r) else r for r in gathered]
        best = max(range(len(rewards)), key=lambda c: (c not in diverged, rewards[c], -c))
        if not searching:
            if diverged:
                self._copy_from(best)
                self.diverged = False
            self.schedule.append(a)
            self.begin_epoch(epoch + 1)
            return None
        xs = [self.policy.draw(epoch, c) for c in range(self.layout.population)]  # every candidate's x
        mu = self.policy.mu.item()
        if self.mode == "search":
            self.policy.update(xs, rewards)
        self._copy_from(best)
        self.diverged = False
        record = {"epoch": epoch, "mu": mu, "mu_next": self.policy.mu.item(), "sigma": self.policy.sigma,
                  "x": xs, "a": [global_a(x, self.loss.s) for x in xs], "reward": rewards, "best": best,
                  "diverged": diverged}
        self.history.append(record)
        self.schedule.append(record["a"][best])
        self.begin_epoch(epoch + 1)
        if self.write_files:
            self.write_outputs()
        if logger is not None:
            logger.log("search", step, record)
            logger.print(f"search epoch {epoch}: mu {mu:.4f} -> {record['mu_next']:.4f} x {[round(x, 4) for x in xs]} "
                         f"reward {[round(r, 4) for r in rewards]} best {best}")
        return record

    def _copy_from(self, best: int) -> None:
        """The best candidate's complete state onto every candidate (group rank ``i`` from
        the best candidate's rank ``i``)."""
        if self.layout.population == 1:
            return
        mine = self.state.live() if self.layout.candidate == best else None
        source = self.layout.world_rank(best, self.layout.group_rank)
        state = broadcast_state(mine, source, self.layout.cross, self.device)
        if mine is None:
            self.state.apply_live(state)

    def write_outputs(self) -> None:
        """``search.jsonl`` (every record), ``a_schedule.json`` and, with ``log.plot``, the PNG."""
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, SEARCH_FILE), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        with open(os.path.join(self.run_dir, SCHEDULE_FILE), "w") as f:
            json.dump({"loss": {"name": "search_softmax", "params": {"s": self.loss.s, "schedule": self.schedule}}},
                      f, indent=1)
        if self.plot and self.history:
            plot_search(self.history, os.path.join(self.run_dir, PLOT_FILE))

    def state_dict(self) -> dict:
        return {**self.policy.state_dict(), "history": self.history, "schedule": self.schedule,
                "diverged": self.diverged}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state)
        self.history, self.schedule = list(state["history"]), list(state["schedule"])
        self.diverged = bool(state.get("diverged", False))  # absent in checkpoints before it was kept


def plot_search(history: list[dict], path: str) -> None:
    """``mu`` before each search epoch and every candidate's reward, over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(epochs, [r["mu"] for r in history], marker="o")
    top.set_ylabel("mu")
    for c in range(len(history[0]["reward"])):
        bottom.plot(epochs, [r["reward"][c] for r in history], marker=".", label=f"candidate {c}")
    bottom.plot(epochs, [max(r["reward"]) for r in history], color="k", lw=2, label="best")
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("reward (accuracy)")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
