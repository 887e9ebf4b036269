"""Search-Softmax as one distributed job (partialfc/train/search.py): the policy update
against a hand-written REINFORCE + Adam step, the rewards and the copy of the best over
2 candidates x 2 gloo ranks, a rigged reward that moves mu, mode random, an exact resume,
and the configuration errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from partialfc.errors import ConfigError
from partialfc.testing.multiprocess import run_distributed
from partialfc.train.config import load_config
from partialfc.train.search import SearchPolicy, normalised_rewards
from tests.train_helpers import tiny_overrides


def search_overrides(run_dir, cache, *extra) -> list[str]:
    """The tiny run as a search: 4 steps per epoch on one rank, 3 epochs, searching from epoch 1."""
    tiny = [o for o in tiny_overrides(run_dir, cache) if not o.startswith("loss.")]
    return [*tiny, "data.synthetic.num_identities=16", "data.batch_size=32", "train.max_steps=null",
            "train.epochs=3", "loss.name=search_softmax", "loss.params={s: 16.0}", "search.enabled=true",
            "search.population=2", "search.start_epoch=1", "search.mu=0.3", *extra]


def rigged_reward(a: float) -> float:
    """Larger |a| (larger |x|, a larger margin) is better."""
    return math.log(-a)


def _diverge(trainer, steps) -> None:
    """From now on the head's loss is NaN at the optimizer steps ``steps`` (0-based)."""
    forward = trainer.head.forward
    trainer.head.forward = lambda *a, **k: forward(*a, **k) * (float("nan") if trainer.step in steps else 1.0)


def _run(rank, world, run_dir, cache, extra, rig, diverging=None):
    from partialfc.train.trainer import Trainer

    trainer = Trainer(load_config(None, search_overrides(run_dir, cache, *extra)))
    local = []
    if diverging is not None and trainer.layout.candidate in diverging:
        _diverge(trainer, diverging[trainer.layout.candidate])
    if rig:
        trainer.search.reward_hook = rigged_reward
    else:
        trainer.search.reward_hook = lambda a: local.append(trainer.search.reward()) or local[-1]
    trainer.train()
    state = trainer.state.live()
    return {"history": trainer.search.history, "schedule": trainer.search.schedule,
            "mu": trainer.search.policy.mu.item(), "local": local,
            "state": {**{k: state["shared"][k] for k in ("engine", "scaler", "head_schedule")},
                      "head": {**state["rows"]["head"], "local": state["local"]["head"]},
                      "head_optimizer": state["rows"]["head_optimizer"]}}


def _tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _same(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) > 0 and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))


def test_policy_update_is_reinforce_with_adam():
    lr, (b1, b2), eps, sigma, mu = 0.05, (0.5, 0.999), 1e-8, 0.2, 0.1
    policy = SearchPolicy(mu, sigma, lr, (b1, b2), seed=0)
    m = v = 0.0
    for t, (xs, rewards) in enumerate([([0.3, -0.1, 0.2], [0.9, 0.7, 0.8]), ([0.05, 0.4, 0.1], [0.5, 0.6, 0.95])], 1):
        spread = max(rewards) - min(rewards) + 1e-6
        r = [2 * (R - sum(rewards) / len(rewards)) / spread for R in rewards]
        # d/dmu of mean_c(-r_c log N(x_c; mu, sigma)) = mean_c(-r_c (x_c - mu) / sigma^2)
        g = sum(-rc * (x - mu) / sigma ** 2 for rc, x in zip(r, xs)) / len(xs)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        mu -= lr * (m / (1 - b1 ** t)) / (math.sqrt(v / (1 - b2 ** t)) + eps)
        policy.update(xs, rewards)
        assert policy.mu.item() == pytest.approx(mu, rel=1e-12, abs=1e-15)
    assert normalised_rewards([1.0, 3.0]).tolist() == pytest.approx([-1.0, 1.0], rel=1e-5)


def test_a_schedule_replays_per_epoch():
    from partialfc.losses import build_loss

    loss = build_loss("search_softmax", s=16.0, schedule=[0.0, -3.0, -1.5])
    assert loss.a == 0.0
    for epoch, a in [(1, -3.0), (2, -1.5), (7, -1.5), (0, 0.0)]:
        loss.set_epoch(epoch)
        assert loss.a == a and loss.margin == pytest.approx(math.log(1 - a) / 16.0)
    with pytest.raises(ValueError, match="a <= 0"):
        build_loss("search_softmax", schedule=[-1.0, 0.5])


def test_draws_are_seeded_by_epoch_and_candidate():
    policy = SearchPolicy(0.3, 0.2, 0.05, (0.5, 0.999), seed=7)
    draws = [policy.draw(e, c) for e in range(3) for c in range(2)]
    assert len(set(draws)) == 6 and draws == [policy.draw(e, c) for e in range(3) for c in range(2)]
    assert SearchPolicy(0.3, 0.2, 0.05, (0.5, 0.999), seed=8).draw(0, 0) != draws[0]


@pytest.mark.parametrize("extra, key", [
    (["search.sigma=0"], "search.sigma"),
    (["loss.name=cosface"], "loss.name"),
    (["search.reward=null", "data.synthetic.verification_pairs=0"], "search.reward"),
    (["search.mode=greedy"], "search.mode"),
    (["train.engine=deepspeed"], "train.engine"),
])
def test_bad_search_configs_name_the_key(tmp_path, extra, key):
    overrides = search_overrides(tmp_path, tmp_path, *extra)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_population_must_divide_the_world(tmp_path, cache):
    from partialfc.train.trainer import Trainer

    with pytest.raises(ConfigError, match=r"search\.population=2 must divide the world size 1"):
        Trainer(load_config(None, search_overrides(tmp_path, cache)))


@pytest.mark.multiprocess
@pytest.mark.required
def test_two_candidates_of_two_ranks_gather_rewards_and_copy_the_best(tmp_path, cache):
    results = run_distributed(_run, 4, str(tmp_path), str(cache), ["train.epochs=2", "data.batch_size=16"], False)
    history = results[0]["history"]
    assert [r["epoch"] for r in history] == [1]
    record = history[0]
    # every rank saw the same gathered rewards: candidate c's as evaluated by its own ranks
    for rank, res in enumerate(results):
        assert res["history"] == history
        assert res["local"] == [record["reward"][rank // 2]]
    assert record["best"] == max(range(2), key=lambda c: (record["reward"][c], -c))
    assert record["a"][0] != record["a"][1]
    # after the copy, group rank i of both candidates holds the same state, bit for bit
    for i in range(2):
        assert _same(results[i]["state"], results[2 + i]["state"])
    assert not _same(results[0]["state"]["head"], results[1]["state"]["head"])  # two different shards


@pytest.mark.multiprocess
@pytest.mark.required
def test_rigged_reward_moves_mu_and_random_mode_does_not(tmp_path, cache):
    searched = run_distributed(_run, 2, str(tmp_path / "search"), str(cache), ["train.epochs=4"], True)[0]
    mus = [r["mu"] for r in searched["history"]] + [searched["mu"]]
    assert mus[0] == 0.3 and all(b > a for a, b in zip(mus, mus[1:])), mus  # toward larger |x|
    for r in searched["history"]:
        assert r["best"] == max(range(2), key=lambda c: abs(r["x"][c]))
        assert searched["schedule"][r["epoch"]] == r["a"][r["best"]]
    run_dir = tmp_path / "search"
    assert [json.loads(line) for line in open(run_dir / "search.jsonl")] == searched["history"]
    logged = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [{k: v for k, v in r.items() if k not in ("kind", "step")} for r in logged if r["kind"] == "search"] \
        == searched["history"]
    replay = json.loads((run_dir / "a_schedule.json").read_text())["loss"]
    cfg = load_config(None, [f"run_dir={tmp_path}", "data.rec=unused", "loss.name=search_softmax",
                             f"loss.params={json.dumps(replay['params'])}"])
    assert list(cfg.loss.params.schedule) == searched["schedule"]
    random = run_distributed(_run, 2, str(tmp_path / "random"), str(cache),
                             ["train.epochs=4", "search.mode=random"], True)[0]
    assert [r["mu"] for r in random["history"]] + [random["mu"]] == [0.3] * 4
    assert random["history"][0]["x"] == searched["history"][0]["x"]  # the same draws from the same mu


@pytest.mark.multiprocess
@pytest.mark.required
def test_resume_mid_search_equals_an_uninterrupted_run(tmp_path, cache):
    whole = tmp_path / "whole"
    extra = ["checkpoint.every_steps=6", "checkpoint.keep=0"]  # step 6: in the middle of epoch 1
    full = run_distributed(_run, 2, str(whole), str(cache), extra, True)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints", resumed_dir / "checkpoints")
    for later in resumed_dir.glob("checkpoints/**/step_*"):
        if int(later.name.split("_")[1]) > 6:
            shutil.rmtree(later)
    resumed = run_distributed(_run, 2, str(resumed_dir), str(cache), extra, True)
    for a, b in zip(full, resumed):
        assert a["history"] == b["history"] and a["schedule"] == b["schedule"] and a["mu"] == b["mu"]
        assert _same(a["state"], b["state"])
    assert len(full[0]["history"]) == 2


@pytest.mark.multiprocess
@pytest.mark.required
def test_a_diverged_candidate_gets_the_worst_reward_and_the_best_weights(tmp_path, cache):
    """Candidate 1's loss is NaN through epoch 1 (steps 4-7; it diverges at step 5 with
    max_consecutive_nonfinite=2): the job goes on (it hung: the diverged candidate saved
    while the other was in its next step's agreement), candidate 1 gets the lowest reward
    and candidate 0's state, and trains on with everyone in epoch 2."""
    extra = ["train.max_consecutive_nonfinite=2", "dist.timeout_s=30"]
    results = run_distributed(_run, 2, str(tmp_path), str(cache), extra, True, {1: range(4, 8)}, timeout=120)
    first, second = results[0]["history"]
    assert first["diverged"] == [1] and second["diverged"] == []
    assert first["reward"][1] == 0.0 and first["reward"][0] == rigged_reward(first["a"][0]) and first["best"] == 0
    assert results[0]["local"] == [] and results[1]["history"] == results[0]["history"]
    policy = SearchPolicy(0.3, first["sigma"], 0.05, (0.5, 0.999), seed=0)  # the update saw reward 0
    policy.update(first["x"], [first["reward"][0], 0.0])
    assert first["mu_next"] == pytest.approx(policy.mu.item(), rel=1e-12)
    assert _same(results[0]["state"], results[1]["state"])  # copied at the end of epoch 2 as well


@pytest.mark.multiprocess
@pytest.mark.required
def test_the_search_stops_when_every_candidate_diverges(tmp_path, cache):
    """Both candidates' losses are NaN from step 4: every rank ends with TrainingDiverged
    (not a hang, not a mismatched collective) after a checkpoint of each candidate."""
    extra = ["train.max_consecutive_nonfinite=2", "dist.timeout_s=30"]
    with pytest.raises(RuntimeError) as err:
        run_distributed(_run, 2, str(tmp_path), str(cache), extra, True, {0: range(4, 99), 1: range(4, 99)},
                        timeout=120)
    text = str(err.value)
    assert text.count("TrainingDiverged") == 2 and "every candidate of the search diverged" in text, text
    # both diverged after step 6; the step-7 agreement told every rank so
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000007"]
    assert [p.name for p in (tmp_path / "checkpoints/candidates/1").glob("step_*")] == ["step_00000007"]


@pytest.mark.multiprocess
@pytest.mark.required
def test_a_candidate_diverged_before_the_search_starts_gets_a_healthy_state(tmp_path, cache):
    """Candidate 1 diverges in epoch 0 (before search.start_epoch=1, nothing is evaluated):
    at the epoch's end it takes candidate 0's state instead of skipping every step after."""
    extra = ["train.max_consecutive_nonfinite=2", "dist.timeout_s=30"]
    results = run_distributed(_run, 2, str(tmp_path), str(cache), extra, True, {1: range(0, 4)}, timeout=120)
    assert [r["diverged"] for r in results[0]["history"]] == [[], []]
    assert results[1]["history"] == results[0]["history"]
    assert _same(results[0]["state"], results[1]["state"])


@pytest.mark.multiprocess
@pytest.mark.required
def test_every_candidate_diverged_at_an_epochs_end_stops_there_and_resumes_healthy(tmp_path, cache):
    """Both diverge in the last two steps of epoch 0: the epoch's end (not a later step) stops
    every rank with a checkpoint at step 4, which keeps no divergence: a resume trains on."""
    extra = ["train.max_consecutive_nonfinite=2", "dist.timeout_s=30"]
    with pytest.raises(RuntimeError) as err:
        run_distributed(_run, 2, str(tmp_path), str(cache), extra, True, {0: range(2, 4), 1: range(2, 4)},
                        timeout=120)
    assert "every candidate of the search diverged (step 4" in str(err.value), str(err.value)
    for root in ("checkpoints", "checkpoints/candidates/1"):  # every candidate's ranks saved at step 4
        assert [p.name for p in (tmp_path / root).glob("step_*")] == ["step_00000004"]
    resumed = run_distributed(_run, 2, str(tmp_path), str(cache), extra, True, timeout=120)
    assert [r["epoch"] for r in resumed[0]["history"]] == [1, 2] and resumed[0]["history"][0]["diverged"] == []
