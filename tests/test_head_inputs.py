"""Bad input gives a clear error on every rank (no hang); numerics at the edges."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from partialfc import InputError, PartialFC
from partialfc.losses import ArcFace, CosFace
from partialfc.testing import run_distributed

BAD_INPUTS = {
    "label_high": (lambda: torch.randn(4, 8), lambda: torch.tensor([0, 1, 2, 10]), r"label 10 outside \[0, 10\)"),
    "label_negative": (lambda: torch.randn(4, 8), lambda: torch.tensor([0, -1, 2, 3]), r"label -1 outside"),
    "float_labels": (lambda: torch.randn(4, 8), lambda: torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer tensor"),
    "wrong_width": (lambda: torch.randn(4, 7), lambda: torch.tensor([0, 1, 2, 3]), r"shape \(batch, 8\)"),
    "nan": (lambda: torch.tensor([[math.nan] * 8] + [[0.5] * 8] * 3), lambda: torch.tensor([0, 1, 2, 3]), "NaN or inf"),
    "inf": (lambda: torch.full((4, 8), math.inf), lambda: torch.tensor([0, 1, 2, 3]), "NaN or inf"),
    "label_shape": (lambda: torch.randn(4, 8), lambda: torch.tensor([[0], [1], [2], [3]]), r"labels( on rank \d)? must have shape \(4,\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_single_process(case):
    make_x, make_y, message = BAD_INPUTS[case]
    with pytest.raises(InputError, match=message) as err:
        PartialFC(8, 10, sample_rate=0.5)(make_x(), make_y())
    assert "on rank" not in str(err.value)  # one process: no rank to name (the optional part of the pattern)


def _bad_on_rank_one(rank, world_size):
    """Every case in turn in the same group: a rank that failed to raise would hang the next."""
    head = PartialFC(8, 10, sample_rate=0.5)
    messages = {}
    for case, (make_x, make_y, _) in BAD_INPUTS.items():
        x, y = (make_x(), make_y()) if rank == 1 else (torch.randn(3, 8), torch.tensor([0, 4, 9]))
        try:
            head(x, y)
            messages[case] = "no error"
        except InputError as err:
            messages[case] = str(err)
    try:  # a dtype that differs from the other rank's
        head(torch.randn(3, 8, dtype=torch.float64 if rank == 1 else torch.float32), torch.tensor([0, 4, 9]))
        messages["dtype"] = "no error"
    except InputError as err:
        messages["dtype"] = str(err)
    # an empty rank without autograd next to ranks with it: backward still meets in the collective
    x = torch.randn(3, 8, requires_grad=True) if rank == 0 else torch.empty(0, 8)
    head(x, torch.tensor([1, 8, 2]) if rank == 0 else torch.empty(0, dtype=torch.int64)).backward()
    messages["grad"] = x.grad.shape if rank == 0 else None
    head(torch.randn(2, 8), torch.tensor([1, 8]))  # the group still works afterwards
    return messages


@pytest.mark.required
@pytest.mark.multiprocess
def test_bad_input_on_one_rank_raises_on_every_rank():
    results = run_distributed(_bad_on_rank_one, 2, timeout=120)
    for case, (_, _, message) in BAD_INPUTS.items():
        messages = [r[case] for r in results]
        for rank, text in enumerate(messages):
            assert text != "no error", f"{case}: rank {rank} did not raise"
            assert re.search(message, text), (case, rank, text)
        if case in ("float_labels", "wrong_width", "label_shape"):
            assert all("on rank 1" in m for m in messages), messages
    for rank in (0, 1):
        assert "rank 0: torch.float32, rank 1: torch.float64" in results[rank]["dtype"], results[rank]["dtype"]
    assert results[0]["grad"] == (3, 8)


def _bad_on_rank_one_bounded(rank, world_size):
    """The same cases with ``max_batch``: every call and its backward complete on both ranks
    (the bad rank sends padding), and the deferred check raises the eager check's message on
    every rank. Then the host syncs and collectives of a good call at a sample rate, counted."""
    from partialfc.testing.host_syncs import HostSyncCounter

    head = PartialFC(8, 10, sample_rate=0.5, max_batch=4, nonfinite="raise")
    cases = {**BAD_INPUTS, "over_bound": (lambda: torch.randn(5, 8), lambda: torch.arange(5), "over the head's max_batch=4")}
    messages = {}
    for case, (make_x, make_y, _) in cases.items():
        x, y = (make_x(), make_y()) if rank == 1 else (torch.randn(3, 8), torch.tensor([0, 4, 9]))
        x = x.requires_grad_(True) if x.is_floating_point() else x
        head(x, y).backward()  # no error yet, no out-of-range index, no hang
        try:
            head.check_inputs()
            messages[case] = "no error"
        except InputError as err:
            messages[case] = str(err)
    x = torch.randn(3, 8, requires_grad=True) if rank == 0 else torch.empty(0, 8)
    head(x, torch.tensor([1, 8, 2]) if rank == 0 else torch.empty(0, dtype=torch.int64)).backward()
    head.check_inputs()
    messages["grad"] = x.grad.shape if rank == 0 else None
    head = PartialFC(8, 100, sample_rate=0.5, max_batch=4)  # a sample (25 per rank) the batch cannot fill
    x = torch.randn(2 + rank, 8, requires_grad=True)
    with HostSyncCounter() as counted:
        head(x, torch.tensor([1, 80, 2][: 2 + rank])).backward()
    messages["syncs"], messages["collectives"] = dict(counted.sync_sites), counted.collectives
    head.check_inputs()
    return messages


@pytest.mark.required
@pytest.mark.multiprocess
def test_bounded_head_defers_the_same_errors_and_waits_for_nothing():
    results = run_distributed(_bad_on_rank_one_bounded, 2, timeout=120)
    eager = run_distributed(_bad_on_rank_one, 2, timeout=120)
    for case in [*BAD_INPUTS, "over_bound"]:
        for rank in (0, 1):
            assert results[rank][case] == (eager[rank][case] if case in BAD_INPUTS else
                                           "embeddings on rank 1 hold 5 rows, over the head's max_batch=4"), \
                (case, rank, results[rank][case])
    assert results[0]["grad"] == (3, 8)
    for r in results:
        assert r["syncs"] == {}, r["syncs"]
        # 2 all-gathers (statuses; rows with their labels), the objective's MAX and SUM, and the
        # gather's backward (an all-reduce on gloo): the eager head's 3 all-gathers less one
        assert r["collectives"] == 5, r["collectives"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_labels_travel_bit_for_bit_as_embedding_columns(dtype):
    """Labels whose bytes read as NaN, infinity or denormals in the embeddings' dtype survive
    the padding, the concatenation and the slicing of the gather exactly."""
    from partialfc.head.inputs import columns_as_labels, labels_as_columns

    labels = torch.tensor([0, 1, 5, 0x7C00, 0x7E00, 0x7F80, 0x7FC0, 0xFFFF, 0x7FC00000, 0x7FF8000000000000,
                           2**40 + 3, -1], dtype=torch.int64)
    emb = torch.randn(labels.shape[0], 3).to(dtype)
    block = torch.cat([F.pad(emb, (0, 0, 0, 2)), labels_as_columns(torch.cat([labels, labels.new_full((2,), -1)]), dtype)],
                      dim=1)
    assert block.dtype == dtype and block.shape == (labels.shape[0] + 2, 3 + 8 // emb.element_size())
    assert torch.equal(columns_as_labels(block[:, 3:])[: labels.shape[0]], labels)
    assert torch.equal(block[: labels.shape[0], :3], emb)


@pytest.mark.parametrize("dim,dtype", [(3, torch.float32), (6, torch.float16), (5, torch.float64)])
def test_a_bounded_head_of_one_row(dim, dtype):
    """One gathered row: its label columns are a contiguous slice at an odd offset."""
    head = PartialFC(dim, 10, max_batch=1, dtype=dtype)
    x = torch.randn(1, dim, dtype=dtype)
    expected = PartialFC(dim, 10, dtype=dtype)(x, torch.tensor([3]))
    torch.testing.assert_close(head(x, torch.tensor([3])), expected)
    head.check_inputs()


def test_a_bounded_head_that_is_never_checked_checks_itself():
    head = PartialFC(8, 10, max_batch=4)
    head(torch.randn(4, 8), torch.tensor([0, 1, 2, 10]))  # deferred
    with pytest.raises(InputError, match="label 10 outside"):
        for _ in range(100):
            head(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))


def test_cosine_exactly_plus_minus_one_is_finite():
    w = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    for loss in (ArcFace(s=64, m=0.5), ArcFace(s=64, m=0.5, easy_margin=True), CosFace(s=64)):
        head = PartialFC(8, 6, loss=loss, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(w)
        x = torch.stack([w[0], -w[1], w[2] * 3.0]).requires_grad_(True)  # cos = +1, -1, +1
        out = head(x, torch.tensor([0, 1, 2]))
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("sample_rate", [1.0, 0.2])
def test_bf16_autocast_close_to_fp32(sample_rate):
    """bf16 cosine matmul under autocast, fp32 after it: loss within 2% of fp32 at s=64.

    bf16 keeps 8 mantissa bits, so a cosine is off by up to ~4e-3 and a logit by ~0.25 at
    s=64; averaged over the batch the loss moves by well under 2%."""
    torch.manual_seed(0)
    head = PartialFC(128, 2000, loss=ArcFace(), sample_rate=sample_rate)
    x, y = torch.randn(64, 128), torch.randint(0, 2000, (64,))
    state = head.sampler.generator.get_state()
    ref = head(x, y)
    head.sampler.generator.set_state(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head(x.bfloat16(), y)
    assert low.dtype == torch.float32
    assert torch.isfinite(low)
    assert low.item() == pytest.approx(ref.item(), rel=0.02)


def test_half_embeddings_without_autocast_are_promoted_to_the_centres_dtype():
    """A bf16 backbone without autocast (a DeepSpeed bf16 engine) feeds an fp32 head."""
    head = PartialFC(16, 50, loss=CosFace(s=32), sample_rate=0.5)
    x, y = torch.randn(8, 16).bfloat16(), torch.randint(0, 50, (8,))
    state = head.sampler.generator.get_state()
    low = x.clone().requires_grad_(True)
    out = head(low, y)
    out.backward()
    head.sampler.generator.set_state(state)
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad).all()
    assert out.item() == pytest.approx(head(x.float(), y).item(), rel=1e-6)
