"""The Triton kernels of the fused objective, run by Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1`` is set in the spawned ranks before Triton is imported), against
the plain objective and the float64 oracle: the same cases as ``test_fused`` on 1-3 gloo
processes (every loss and gradient mode, rates 1 / 0.5 / 0, a rank without centres, a
chunk size of 3 that divides nothing, hence several column splits per row block)."""

from __future__ import annotations

import pytest

from partialfc.testing import run_distributed
from tests import fused_helpers

pytest.importorskip("triton")  # in the dev extra: CI installs it

pytestmark = [pytest.mark.required, pytest.mark.multiprocess]

CASES = fused_helpers.cases()
INTERPRET = {"TRITON_INTERPRET": "1"}


@pytest.fixture(scope="module", params=[1, 2, 3])
def world(request):
    return request.param, run_distributed(fused_helpers.rank_run, request.param, "triton", CASES, fused_helpers.CHUNK,
                                           INTERPRET)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_triton_matches_plain_and_reference(world, case):
    world_size, results = world
    fused_helpers.check(results, world_size, case)
