"""The backbone engines (partialfc/train/engine.py): the BackboneEngine interface, autocast,
and the skip protocol: a step with ``apply=False`` leaves the parameters and the optimizer
state bitwise unchanged on every rank while the lr schedule advances, under DDP and DeepSpeed
(ZeRO 0-2, fp32 and bf16) on 1 and 2 gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch

from partialfc.testing.multiprocess import run_distributed
from partialfc.train.config import load_config

STEPS = ("apply", "skip", "skip_nan", "apply")  # the steps of every run; the reference runs only the applied ones


def _configs(engine: str, precision: str = "fp32", stage: int = 0, *extra: str):
    cfg = load_config(None, ["run_dir=unused", "data.rec=unused", f"train.engine={engine}",
                             f"train.precision={precision}", f"train.deepspeed.zero_stage={stage}",
                             "optim.lr=0.1", "optim.weight_decay=0.01", "optim.clip_grad_norm=0",
                             "optim.schedule.warmup_steps=3", *extra])
    return cfg.optim, cfg.train


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(100 * rank + step))


def _snapshot(engine) -> tuple[int, list[torch.Tensor]]:
    """Model parameters, the torch optimizer's parameters (ZeRO: the fp32 master partitions)
    and every tensor of its state; and how many parameters have state."""
    optimizer = engine.engine.basic_optimizer if hasattr(engine, "engine") else engine.optimizer
    tensors = [p.detach().clone() for p in engine.module.parameters()]
    tensors += [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    tensors += [v.clone() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return len(optimizer.state), tensors


def _same(a, b) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _run(rank: int, engine_name: str, precision: str, stage: int, skips: bool) -> dict:
    """``STEPS`` (``skips``) or only its applied steps with the schedule stepped in place of the
    skipped ones (the reference); returns lrs, the skip checks and the final parameters."""
    from partialfc.train.engine import BackboneEngine, build_engine

    optim, train = _configs(engine_name, precision, stage)
    engine = build_engine(_tiny(), optim, train, micro_batch=3, total_steps=8, device=torch.device("cpu"))
    assert isinstance(engine, BackboneEngine)
    out = {"lrs": [], "unchanged": [], "norms": []}
    for step, kind in enumerate(STEPS):
        if kind != "apply" and not skips:
            engine.schedule.step()
            out["lrs"].append(engine.lr)
            continue
        before = _snapshot(engine)
        hook = None
        if kind == "skip_nan" and rank == 0:  # one rank's gradient; the reduction spreads it
            hook = next(engine.module.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
        with engine.micro_step(True), engine.autocast():
            loss = engine(_batch(rank, step)).float().square().mean()
        engine.backward(loss, True)
        norm = engine.grad_norm()
        out["norms"].append(engine.step(kind == "apply", norm))
        if hook is not None:
            hook.remove()
        out["lrs"].append(engine.lr)
        if kind != "apply":
            out["unchanged"].append(_same(before, _snapshot(engine)))
    out["params"] = [p.detach().float().clone() for p in engine.module.parameters()]
    if hasattr(engine, "engine"):
        out["counters"] = (engine.engine.global_steps, engine.engine.skipped_steps)
    return out


def _cases(rank: int, world: int, cases: list) -> list[tuple[dict, dict]]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    return [(_run(rank, *case, skips=True), _run(rank, *case, skips=False)) for case in cases]


def _plain_reference(world: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The applied steps with a torch SGD on the mean loss over the ranks' batches, lr
    following the schedule through the skipped steps; and the first step's gradient norm."""
    from partialfc.train.optim import build_optimizer, build_schedule

    optim, _ = _configs("ddp")
    model = _tiny()
    optimizer = build_optimizer(model.parameters(), optim)
    schedule = build_schedule(optimizer, optim.schedule, 8)
    norms = []
    for step, kind in enumerate(STEPS):
        if kind == "apply":
            optimizer.zero_grad()
            sum(model(_batch(r, step)).square().mean() for r in range(world)).div(world).backward()
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
            optimizer.step()
        schedule.step()
    return [p.detach().clone() for p in model.parameters()], norms[0]


def _expected_lrs() -> list[float]:
    from partialfc.train.optim import WarmupSchedule

    optim, _ = _configs("ddp")
    factor = WarmupSchedule(optim.schedule, 8)
    return [optim.lr * factor(k + 1) for k in range(len(STEPS))]


def _check(results: list, cases: list, world: int) -> None:
    plain, first_norm = _plain_reference(world)
    for case, per_rank in zip(cases, zip(*results)):
        for rank, (run, reference) in enumerate(per_rank):
            assert run["unchanged"] == [True, True], (case, rank)
            assert run["lrs"] == pytest.approx(_expected_lrs()) and reference["lrs"] == run["lrs"], case
            # the skipped steps leave no trace: the last applied step is the reference's, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(run["params"], reference["params"])), (case, rank)
            assert all(torch.equal(a, b) for a, b in zip(run["params"], per_rank[0][0]["params"])), (case, rank)
            if case[1] == "fp32":  # the norm: DDP's and ZeRO-0's before the step, ZeRO-1/2's from DeepSpeed
                torch.testing.assert_close(run["norms"][0], first_norm, rtol=1e-5, atol=1e-6)
                for a, b in zip(run["params"], plain):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:  # bf16 weights: one bf16 rounding step from the fp32 computation
                assert not all(torch.equal(a, b) for a, b in zip(run["params"], plain))
                for a, b in zip(run["params"], plain):
                    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
            if case[0] == "deepspeed":
                assert run["counters"] == (4, 2) and reference["counters"] == (2, 0), case


def test_ddp_single_process_skip_holds_and_matches_torch():
    cases = [("ddp", "fp32", 0), ("ddp", "bf16", 0)]
    _check([_cases(0, 1, cases)], cases, 1)


@pytest.mark.required
@pytest.mark.multiprocess
def test_ddp_two_ranks_skip_holds_and_matches_torch():
    cases = [("ddp", "fp32", 0)]
    _check(run_distributed(_cases, 2, cases), cases, 2)


DEEPSPEED_CASES = [("deepspeed", "fp32", 0), ("deepspeed", "fp32", 1), ("deepspeed", "fp32", 2),
                   ("deepspeed", "bf16", 0), ("deepspeed", "bf16", 1)]


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [1, 2])
def test_deepspeed_skip_holds_on_every_rank_and_matches_torch(world):
    pytest.importorskip("deepspeed")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    _check(run_distributed(_cases, world, DEEPSPEED_CASES, timeout=400), DEEPSPEED_CASES, world)


def _one_deepspeed_process(fn, *args):
    """``fn(0, 1, *args)``'s result from a process of its own (DeepSpeed's set-up stays out of
    pytest's)."""
    pytest.importorskip("deepspeed")
    return run_distributed(fn, 1, *args, timeout=300)[0]


def _autocast_of(rank: int, world: int) -> dict:
    from partialfc.train.engine import BackboneEngine, build_engine

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = {}
    for name, precision in (("ddp", "fp32"), ("ddp", "bf16"), ("deepspeed", "bf16")):
        engine = build_engine(_tiny(), *_configs(name, precision), micro_batch=3, total_steps=8,
                              device=torch.device("cpu"))
        with engine.autocast():
            out[name, precision] = (isinstance(engine, BackboneEngine), torch.is_autocast_enabled("cpu"),
                                    engine(_batch(0, 0)).dtype, engine.autocast_dtype, engine.scaler.is_enabled())
    return out


@pytest.mark.required
@pytest.mark.multiprocess
def test_autocast_is_the_engines_and_both_engines_are_backbone_engines():
    out = _one_deepspeed_process(_autocast_of)
    assert out["ddp", "fp32"] == (True, False, torch.float32, None, False)
    assert out["ddp", "bf16"] == (True, True, torch.bfloat16, torch.bfloat16, False)
    assert out["deepspeed", "bf16"] == (True, False, torch.bfloat16, None, False)  # DeepSpeed casts the module


def test_deepspeed_refuses_fp16_with_one_line():
    from partialfc.errors import ConfigError
    from partialfc.train.engine import build_engine

    optim, train = _configs("ddp", "fp16")
    train.engine = type(train.engine)("deepspeed")  # what precision=auto resolves to on a GPU without bf16
    with pytest.raises(ConfigError, match="train.engine=deepspeed supports precision bf16 or fp32, not fp16"):
        build_engine(_tiny(), optim, train, micro_batch=3, total_steps=8, device=torch.device("cpu"))


def _self_skip(rank: int, world: int, precision: str, stage: int) -> dict:
    """An applied DeepSpeed step whose gradients hold a NaN: what step() reports and changes."""
    from partialfc.train.engine import build_engine

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    engine = build_engine(_tiny(), *_configs("deepspeed", precision, stage), micro_batch=3, total_steps=8,
                          device=torch.device("cpu"))
    hook = next(engine.module.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
    engine.backward(engine(_batch(rank, 0)).float().square().mean(), True)
    hook.remove()
    before, lr = _snapshot(engine), engine.lr
    norm = engine.step(True, engine.grad_norm())
    return {"norm": float(norm), "unchanged": _same(before, _snapshot(engine)), "lr_moved": engine.lr != lr,
            "applied": engine.engine.was_step_applied(), "engine_applied": engine.applied}


@pytest.mark.required
@pytest.mark.multiprocess
def test_a_step_deepspeed_skips_itself_reports_a_nan_norm():
    """ZeRO-1 bf16: DeepSpeed finds the non-finite partitioned gradients and skips its step; the
    engine says so with a NaN norm (the trainer then skips the head too) and still advances the
    schedule."""
    out = _one_deepspeed_process(_self_skip, "bf16", 1)
    assert out["applied"] is False and out["engine_applied"] is False and out["unchanged"] and out["lr_moved"], out
    assert out["norm"] != out["norm"], out  # NaN


def test_deepspeed_settings_partialfc_decides_are_refused_in_extra(tmp_path):
    """``train.deepspeed.extra`` cannot turn off bf16's overflow check (bf16 ZeRO-1/2 steps would
    apply NaN) or ZeRO's norm (fp32 ZeRO-1/2 would apply NaN while the trainer, which follows
    DeepSpeed's skip, stepped the head), nor set precision, accumulation dtype, batch or stage
    behind partialfc's back."""
    from partialfc.errors import ConfigError

    for extra, key in [("{bf16: {check_grad_overflow: false}}", "bf16"), ("{data_types: {grad_accum_dtype: bf16}}",
                                                                          "data_types"), ("{bf16: null}", "bf16"),
                       ("{zero_optimization: null}", "zero_optimization.stage"),
                       ("{zero_optimization: {stage: 3}}", "zero_optimization.stage"),
                       ("{zero_optimization: {compute_grad_norm: false}}", "zero_optimization.compute_grad_norm"),
                       ("{gradient_accumulation_steps: 4}", "gradient_accumulation_steps")]:
        with pytest.raises(ConfigError, match=rf"train\.deepspeed\.extra\.{key} is written by partialfc"):
            load_config(None, [f"run_dir={tmp_path}", "data.rec=unused", "train.engine=deepspeed",
                               f"train.deepspeed.extra={extra}"])
    cfg = load_config(None, [f"run_dir={tmp_path}", "data.rec=unused", "train.engine=deepspeed",
                             "train.deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    assert cfg.train.deepspeed.extra.zero_optimization.overlap_comm is True  # its own keys merge in


def _ds_config_and_errors(rank: int, world: int) -> dict:
    """The DeepSpeed config partialfc generates (nested extra merged), and the one-line refusals."""
    import deepspeed

    from partialfc.errors import ConfigError
    from partialfc.train.engine import build_engine

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    optim, train = _configs("deepspeed", "bf16", 2, "data.batch_size=1000",  # an interpolation, resolved
                            "train.deepspeed.extra={zero_optimization: {reduce_bucket_size: '${data.batch_size}'}}")
    engine = build_engine(_tiny(), optim, train, micro_batch=3, total_steps=8, device=torch.device("cpu"))
    out = {"config": engine.engine.config, "errors": []}
    optim, train = _configs("deepspeed", "bf16", 0)
    train.grad_accum = 4
    for version in (None, "0.19.3"):
        real = deepspeed.__version__
        deepspeed.__version__ = version or real
        try:
            build_engine(_tiny(), optim, train, micro_batch=3, total_steps=8, device=torch.device("cpu"))
        except ConfigError as err:
            out["errors"].append(str(err))
        finally:
            deepspeed.__version__ = real
        train.grad_accum = 1
    return out


@pytest.mark.required
@pytest.mark.multiprocess
def test_deepspeed_config_checks_overflow_accumulates_in_fp32_and_refuses_old_versions():
    out = _one_deepspeed_process(_ds_config_and_errors)
    config = out["config"]
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert config["zero_optimization"] == {"stage": 2, "compute_grad_norm": True, "reduce_bucket_size": 1000}
    zero0, old = out["errors"]
    assert "ZeRO-0 would add up the 4 micro-batches' gradients in bf16" in zero0 and "\n" not in zero0
    assert "needs DeepSpeed >= 0.19.8 (installed: 0.19.3" in old


ACCUM = 16  # micro-batches: enough for bf16 accumulation to lose bits an fp32 one keeps


def _accumulated_step(rank: int, world: int, stage: int) -> dict:
    """One DeepSpeed bf16 optimizer step over ACCUM micro-batches: its fp32 master weights after
    the step, and the weights before it."""
    from partialfc.train.engine import build_engine

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    optim, train = _configs("deepspeed", "bf16", stage)
    train.grad_accum = ACCUM
    engine = build_engine(_tiny(), optim, train, micro_batch=3, total_steps=8, device=torch.device("cpu"))
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    for i in range(ACCUM):
        engine.backward(engine(_batch(0, i)).float().square().mean(), i == ACCUM - 1)
    engine.step(True, engine.grad_norm())
    master = torch.cat([p.detach().flatten() for g in engine.engine.basic_optimizer.param_groups for p in g["params"]])
    return {"before": before, "master": master}


@pytest.mark.required
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_bf16_accumulates_micro_batches_in_fp32(stage):
    """The master weights after a bf16 step of 16 micro-batches are those of torch's optimizer
    given the micro-batches' bf16 gradients summed in fp32 (DeepSpeed would sum them in bf16
    without ``data_types.grad_accum_dtype``; that sum is shown to be further off here). ZeRO-1
    (DeepSpeed's BF16_Optimizer) then reduces the fp32 sum in bf16, DeepSpeed's default
    ``communication_data_type``: one rounding of the sum, not one per micro-batch."""
    from partialfc.train.optim import build_optimizer, build_schedule

    out = _one_deepspeed_process(_accumulated_step, stage)
    model = _tiny().bfloat16()
    with torch.no_grad():
        for p, w in zip(model.parameters(), out["before"]):
            p.copy_(w)
    sums = {torch.float32: [torch.zeros_like(w) for w in out["before"]],
            torch.bfloat16: [torch.zeros_like(w, dtype=torch.bfloat16) for w in out["before"]]}
    reduced = (lambda g: g.bfloat16().float()) if stage == 1 else (lambda g: g)
    for i in range(ACCUM):
        model.zero_grad()
        (model(_batch(0, i).bfloat16()).float().square().mean() / ACCUM).backward()
        for dtype, acc in sums.items():
            for a, p in zip(acc, model.parameters()):
                a += p.grad.to(dtype)
    expected = {}
    for dtype, acc in sums.items():
        master = [torch.nn.Parameter(w.clone()) for w in out["before"]]
        optim, _ = _configs("deepspeed", "bf16", stage)
        optimizer = build_optimizer(master, optim)
        build_schedule(optimizer, optim.schedule, 8)
        for p, g in zip(master, acc):
            p.grad = reduced(g.float())
        optimizer.step()
        expected[dtype] = torch.cat([p.detach().flatten() for p in master])
    got = out["master"][: expected[torch.float32].numel()]
    torch.testing.assert_close(got, expected[torch.float32], rtol=1e-6, atol=1e-8)
    assert (got - expected[torch.bfloat16]).abs().max() > 1e-5  # what bf16 accumulation would give


def _compiled_steps(rank: int, world: int, engine_name: str) -> dict:
    from partialfc.train.engine import build_engine

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    optim, train = _configs(engine_name, "bf16", 1)
    train.compile = True
    engine = build_engine(_tiny(), optim, train, micro_batch=3, total_steps=8, device=torch.device("cpu"))
    norms = []
    for i in range(3):
        with engine.micro_step(True), engine.autocast():
            loss = engine(_batch(rank, i)).float().square().mean()
        engine.backward(loss, True)
        norms.append(float(engine.step(True, engine.grad_norm())))
    return {"norms": norms, "keys": list(engine.module.state_dict()), "plain": list(_tiny().state_dict())}


@pytest.mark.required
@pytest.mark.multiprocess
def test_train_compile_under_each_engine_keeps_the_plain_module():
    """``train.compile``: DDP's model is compiled, DeepSpeed's engine compiles its module in
    place; either way ``module`` (what checkpoints and exports save) keeps the plain keys."""
    pytest.importorskip("deepspeed")
    for name in ("ddp", "deepspeed"):
        out = run_distributed(_compiled_steps, 2, name, timeout=600)[0]
        assert out["keys"] == out["plain"] and all(n == n and n > 0 for n in out["norms"]), (name, out)


def test_clipping_scales_on_the_device_as_torch_does():
    """``clip_grads_`` against ``torch.nn.utils.clip_grad_norm_`` on dense gradients; a sparse
    bf16 gradient keeps its dtype and coalesced mark, its values scaled in fp32; a norm under
    the limit and ``max_norm <= 0`` leave the gradients as they were."""
    from partialfc.train.optim import clip_grads_, grad_norm

    torch.manual_seed(0)
    ours, theirs = _tiny(), _tiny()
    for model in (ours, theirs):
        model(_batch(0, 0)).square().sum().backward()
    norm = grad_norm(ours.parameters())
    clip_grads_(ours.parameters(), 0.5, norm)
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    values = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).bfloat16()
    weight = torch.nn.Parameter(torch.zeros(10, 4, dtype=torch.bfloat16))
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 7]]), values, (10, 4), is_coalesced=True)
    norm = torch.linalg.vector_norm(values.float())
    clip_grads_([weight], 0.25, norm)
    assert weight.grad.is_sparse and weight.grad.is_coalesced() and weight.grad.dtype == torch.bfloat16
    expected = (values.float() * (0.25 / (norm + 1e-6))).bfloat16()
    assert torch.equal(weight.grad._values(), expected)
    before = weight.grad._values().clone()
    clip_grads_([weight], 10.0, norm)
    clip_grads_([weight], 0.0, norm)
    assert torch.equal(weight.grad._values(), before)
