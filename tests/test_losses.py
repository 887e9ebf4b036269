"""Every loss against the naive float64 references of ``tests/reference.py``.

The references re-derive each target-logit transform from losses.md (not from the
library), form the logits by hand and take ``logsumexp`` / ``log1p`` in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from partialfc.losses import (ArcFace, CombinedMargin, CosFace, DSoftmax, NormFace, RandomSoftmax,
                              SearchSoftmax, X2Softmax, build_loss)
from partialfc.losses.registry import LOSSES
from partialfc.ops import Targets
from tests.reference import ANGULAR, CLAMP, SPECS, dsoftmax_rows

# Target cosines covering theta near 0 and pi, exactly +-1, and the fallback regions.
TARGET_COS = torch.tensor([1.0, math.cos(1e-3), 0.97, 0.6, 0.2, 1e-3, -0.3, -0.7, -0.8, -0.86,
                           -0.9, -0.99, math.cos(math.pi - 1e-3), -1.0], dtype=torch.float64)


def make_cos(n_classes=9, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = TARGET_COS.numel()
    cos = torch.rand(b, n_classes, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, n_classes, (b,), generator=gen)
    cos[torch.arange(b), labels] = TARGET_COS
    cos[0, (labels[0] + 1) % n_classes] = 1.0   # a non-target at exactly +1 ...
    cos[1, (labels[1] + 1) % n_classes] = -1.0  # ... and at exactly -1
    return cos.to(dtype), labels


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("gradient", ["exact", "straight_through"])
def test_loss_matches_naive_float64(name, gradient):
    spec = SPECS[name]
    loss = spec.build(build_loss, gradient=gradient)
    a = getattr(loss, "a", None)  # random_softmax: the drawn a
    cos, labels = make_cos()
    expected = spec.rows(cos, labels, a=a)
    torch.testing.assert_close(loss(cos, Targets.from_columns(labels, cos.shape[1])), expected, rtol=1e-10, atol=1e-10)
    cos32 = cos.float()
    got32 = loss(cos32, Targets.from_columns(labels, cos32.shape[1]))
    assert got32.dtype == torch.float32
    clamp32 = torch.tensor(CLAMP, dtype=torch.float32)  # arccos clamps in the input's precision
    torch.testing.assert_close(got32.double(), spec.rows(cos32.clamp(-clamp32, clamp32), labels, a=a),
                               rtol=1e-5, atol=2e-4)


def test_reference_covers_every_registered_loss():
    """Each registered loss has a spec in tests/reference.py (checked above on one process)."""
    assert {spec.loss for spec in SPECS.values()} == set(LOSSES)


@pytest.mark.parametrize("name", ["cosface", "arcface", "x2", "combined_2"])
def test_inter_class_filtering(name):
    spec = SPECS[name]
    loss = spec.build(build_loss, inter_threshold=0.4)
    cos, labels = make_cos(seed=3)
    expected = spec.rows(cos, labels, threshold=0.4)
    torch.testing.assert_close(loss(cos, Targets.from_columns(labels, cos.shape[1])), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(expected, spec.rows(cos, labels))


def smooth_case(seed=1):
    """Target cosines away from the clamp, fallback thresholds and easy-margin kink."""
    gen = torch.Generator().manual_seed(seed)
    cos = (torch.rand(6, 5, generator=gen, dtype=torch.float64) * 1.8 - 0.9)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    cos[torch.arange(6), labels] = torch.tensor([0.95, 0.5, 0.1, -0.4, -0.95, -0.6], dtype=torch.float64)
    return cos.requires_grad_(True), labels


@pytest.mark.parametrize("name", list(SPECS))
def test_gradcheck_exact(name):
    loss = SPECS[name].build(build_loss, gradient="exact")
    cos, labels = smooth_case()
    assert torch.autograd.gradcheck(lambda c: loss(c, Targets.from_columns(labels, c.shape[1])), (cos,))


@pytest.mark.parametrize("name", ANGULAR)
def test_straight_through_target_gradient_is_plain_cosine(name):
    spec = SPECS[name]
    cos, labels = smooth_case()
    st = spec.build(build_loss, gradient="straight_through")
    grad_st, = torch.autograd.grad(st(cos, Targets.from_columns(labels, cos.shape[1])).sum(), cos)
    # Reference: dL/dz = softmax(z) - onehot at the margin logits, times dz/dc = s everywhere.
    with torch.no_grad():
        onehot = torch.nn.functional.one_hot(labels, cos.shape[1]).double()
        z = torch.where(onehot.bool(), st.s * spec.psi(cos), st.s * cos)
        expected = st.s * (torch.softmax(z, dim=1) - onehot)
    torch.testing.assert_close(grad_st, expected, rtol=1e-10, atol=1e-12)
    grad_exact, = torch.autograd.grad(spec.build(build_loss, gradient="exact")(cos, Targets.from_columns(labels, cos.shape[1])).sum(), cos)
    assert not torch.allclose(grad_exact, grad_st)  # the option really changes the backward


def test_default_gradient_modes():
    assert ArcFace().gradient == "exact" and CombinedMargin().gradient == "exact"
    assert X2Softmax().gradient == "exact"  # chosen from the evidence in docs/losses.md
    assert X2Softmax(gradient="straight_through").gradient == "straight_through"


def test_arccos_fallback_region_is_monotone_and_used():
    c = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    for loss in (ArcFace(), CombinedMargin(m1=1.2, m2=0.2, m3=0.1), CombinedMargin(m1=0.9, m2=0.4, m3=0.15),
                 X2Softmax()):
        assert (torch.diff(loss.psi(c)) >= 0).all(), loss
    arc = ArcFace(m=0.5)
    below = torch.tensor([-0.95, -0.999], dtype=torch.float64)
    torch.testing.assert_close(arc.psi(below), below - 0.5 * math.sin(0.5))


# --- D-Softmax --------------------------------------------------------------------------

@pytest.mark.parametrize("regime", ["far", "near", "mixed"])
@pytest.mark.parametrize("s,d", [(64.0, 0.9), (32.0, 0.5)])
def test_dsoftmax_matches_naive_float64(regime, s, d):
    cos, labels = make_cos(n_classes=12, seed=5)
    negatives = ~torch.nn.functional.one_hot(labels, 12).bool()
    if regime == "far":
        cos[negatives] = -1.0
    elif regime == "near":
        cos[negatives] = 0.999
    loss = DSoftmax(s=s, d=d)
    c = cos.clone().requires_grad_(True)
    got = loss(c, Targets.from_columns(labels, c.shape[1]))
    ref_c = cos.clone().requires_grad_(True)
    expected = dsoftmax_rows(ref_c, labels, s, d)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grad, = torch.autograd.grad(got.sum(), c)
    ref_grad, = torch.autograd.grad(expected.sum(), ref_c)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)


def test_dsoftmax_rescaled_inter_matches_naive():
    cos, labels = make_cos(n_classes=12, seed=6)
    loss = DSoftmax(s=16.0, d=0.7, variant="K", K=8, rescale_inter=True)
    torch.testing.assert_close(loss(cos, Targets.from_columns(labels, cos.shape[1])),
                               dsoftmax_rows(cos, labels, 16.0, 0.7, scale=8.0),
                               rtol=1e-10, atol=1e-10)


def test_dsoftmax_gradcheck():
    cos, labels = smooth_case()
    for loss in (DSoftmax(s=16.0, d=0.6), DSoftmax(s=8.0, d=0.2, variant="K", K=4, rescale_inter=True)):
        assert torch.autograd.gradcheck(lambda c: loss(c, Targets.from_columns(labels, c.shape[1])), (cos,))


def grads_for_target_values(loss, cos, labels, values):
    """Gradient w.r.t. the cosines with every row's target cosine set to each of ``values``."""
    onehot = torch.nn.functional.one_hot(labels, cos.shape[1]).bool()
    grads = []
    for value in values:
        c = torch.where(onehot, value, cos).requires_grad_(True)
        grads.append(torch.autograd.grad(loss(c, Targets.from_columns(labels, c.shape[1])).sum(), c)[0])
    return onehot, grads


def test_dsoftmax_inter_gradient_does_not_depend_on_target():
    cos, labels = make_cos(n_classes=7, seed=8)
    onehot, grads = grads_for_target_values(DSoftmax(s=32.0, d=0.9), cos, labels, (-0.9, 0.1, 0.95))
    for g in grads[1:]:
        torch.testing.assert_close(g[~onehot], grads[0][~onehot], rtol=0, atol=0)
    # ... whereas the softmax cross-entropy's inter gradient does depend on it.
    _, softmax_grads = grads_for_target_values(NormFace(s=32.0), cos, labels, (-0.9, 0.95))
    assert not torch.allclose(softmax_grads[0][~onehot], softmax_grads[1][~onehot])
    # The intra pull stops once c_y passes d: at c_y = 0.95 it is s*sigmoid(s*(d - c_y)).
    pull = -grads[2][onehot]
    expected = 32.0 * torch.sigmoid(torch.tensor(32.0 * (0.9 - 0.95), dtype=torch.float64))
    torch.testing.assert_close(pull, expected.expand_as(pull), rtol=1e-10, atol=0)


@pytest.mark.parametrize("variant,K,rate", [("full", None, None), ("B", None, 0.0), ("K", 64, 1 / 64),
                                            ("k", 10, 0.1)])
def test_dsoftmax_variant_selects_head_sample_rate(variant, K, rate):
    from partialfc import PartialFC

    loss = DSoftmax(variant=variant, K=K)
    assert loss.sample_rate == rate
    head = PartialFC(8, 1000, loss=loss)
    assert head.sample_rate == (1.0 if rate is None else rate)


# --- Random / Search-Softmax --------------------------------------------------------------

@pytest.mark.parametrize("a", [0.0, -1e-12, -0.5, -3.0, -1e4, -math.exp(64 / 3)])
def test_search_softmax_equals_unified_form_and_cosface(a):
    s = 64.0
    cos, labels = make_cos(seed=9)
    loss = SearchSoftmax(s=s, a=a)
    got = loss(cos, Targets.from_columns(labels, cos.shape[1]))
    # Unified form: L = -log p + log(a*p + 1 - a), p the plain softmax probability of the target,
    # with a*p + 1 - a written as 1 - a*(1 - p) and log(1 - p) as a log-sum-exp over the
    # non-targets, to keep float64 accurate for huge |a| and p near 1.
    z = s * cos
    onehot = torch.nn.functional.one_hot(labels, z.shape[1]).bool()
    log_p = torch.log_softmax(z, dim=1)[onehot]
    log_1mp = torch.logsumexp(z.masked_fill(onehot, float("-inf")), dim=1) - torch.logsumexp(z, dim=1)
    unified = -log_p + torch.log1p(-a * torch.exp(log_1mp))
    torch.testing.assert_close(got, unified, rtol=1e-9, atol=1e-9)
    cosface = CosFace(s=s, m=math.log(1 - a) / s)(cos, Targets.from_columns(labels, cos.shape[1]))
    torch.testing.assert_close(got, cosface, rtol=1e-12, atol=1e-12)


def test_search_softmax_set_a_per_epoch():
    cos, labels = make_cos(seed=10)
    loss = SearchSoftmax(s=32.0)
    targets = Targets.from_columns(labels, cos.shape[1])
    torch.testing.assert_close(loss(cos, targets), NormFace(s=32.0)(cos, targets))
    loss.set_a(-2.0)
    assert loss.margin == pytest.approx(math.log(3.0) / 32.0)
    torch.testing.assert_close(loss(cos, targets), CosFace(s=32.0, m=math.log(3.0) / 32.0)(cos, targets))
    for bad in (0.1, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="a <= 0"):
            loss.set_a(bad)
    assert loss.a == -2.0  # a rejected value leaves the loss unchanged


def test_random_softmax_draws_reproducible_margins():
    a, b = RandomSoftmax(s=64.0, seed=3), RandomSoftmax(s=64.0, seed=3)
    draws = [a.set_epoch(e) for e in range(20)]
    assert draws == [b.set_epoch(e) for e in range(20)]
    assert len(set(draws)) == 20 and all(x < 0 for x in draws)
    margins = []
    for e in range(20):
        a.set_epoch(e)
        margins.append(a.margin)
    assert 0.15 < min(margins) and max(margins) < 0.36


# --- X2-Softmax ---------------------------------------------------------------------------

def two_class_margin_deg(psi, phi):
    """Angular gap between the two classes' decision boundaries for centres ``phi`` apart:
    class 1's boundary solves psi(cos t) = cos(phi - t) (bisection on [0, phi/2])."""
    lo, hi = 0.0, phi / 2
    for _ in range(80):
        mid = (lo + hi) / 2
        c = torch.tensor([math.cos(mid)], dtype=torch.float64)
        if psi(c).item() > math.cos(phi - mid):
            lo = mid
        else:
            hi = mid
    return math.degrees(phi - 2 * lo)


def test_x2_decision_margin_grows_above_90_degrees():
    x2 = X2Softmax()
    angles = [math.radians(a) for a in range(90, 181, 10)]
    margins = [two_class_margin_deg(x2.psi, phi) for phi in angles]
    assert all(b > a for a, b in zip(margins, margins[1:]))
    assert margins[0] == pytest.approx(36.0, abs=0.5)   # losses.md: 36 at 90 degrees,
    assert margins[6] == pytest.approx(44.0, abs=0.5)   # 44 at 150,
    assert margins[-1] == pytest.approx(53.0, abs=0.5)  # 53 at 180
    arc = [two_class_margin_deg(ArcFace().psi, phi) for phi in angles]
    assert max(arc) - min(arc) < 1e-6 and arc[0] == pytest.approx(math.degrees(0.5), abs=1e-6)


def test_x2_penalty_values():
    theta = torch.tensor([0.0, 30.0, 45.0, 60.0, 90.0], dtype=torch.float64).deg2rad()
    c = torch.cos(theta)
    penalty = c - X2Softmax().psi(c)
    expected = torch.tensor([0.350, 0.463, 0.612, 0.837, 1.571], dtype=torch.float64)
    torch.testing.assert_close(penalty, expected, atol=1e-3, rtol=0)


# --- numerics -----------------------------------------------------------------------------

ALL_LOSSES = [lambda: NormFace(), lambda: CosFace(), lambda: ArcFace(), lambda: ArcFace(easy_margin=True),
              lambda: CombinedMargin(), lambda: X2Softmax(), lambda: X2Softmax(gradient="exact"),
              lambda: DSoftmax(), lambda: DSoftmax(variant="K", K=64, rescale_inter=True),
              lambda: SearchSoftmax(a=-1e6), lambda: ArcFace(gradient="straight_through", inter_threshold=0.4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_inputs_stay_finite(dtype):
    """s=64, 10^6 classes, cosines exactly +-1 at targets and non-targets, half inputs."""
    gen = torch.Generator().manual_seed(11)
    n = 10 ** 6
    cos = (torch.rand(4, n, generator=gen) * 2 - 1)
    labels = torch.tensor([0, 1, 2, n - 1])
    cos[:, :4] = torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, -1.0, -1.0, 1.0],
                               [1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    cos[2, 5:] = 1.0  # every negative at +1
    cos[3, n - 1] = -1.0
    cos = cos.to(dtype)
    for make in ALL_LOSSES:
        loss = make()
        c = cos.clone().requires_grad_(True)
        out = loss(c, Targets.from_columns(labels, c.shape[1]))
        assert out.dtype == torch.float32
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(c.grad).all(), loss
        if dtype != torch.float32:  # upcast before the margin: same as fp32 on the rounded input
            torch.testing.assert_close(out, loss(cos.float(), Targets.from_columns(labels, cos.float().shape[1])), rtol=0, atol=0)


# --- registry -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,cls", [
    ("normface", {}, NormFace), ("CosFace", {"m": 0.35}, CosFace), ("arcface", {"m": 0.5}, ArcFace),
    ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}, CombinedMargin), ("x2softmax", {"a": -0.8}, X2Softmax),
    ("dsoftmax", {"variant": "K", "K": 64}, DSoftmax), ("search-softmax", {"a": -1.0}, SearchSoftmax),
    ("random_softmax", {"sigma": 0.3}, RandomSoftmax)])
def test_build_loss_by_name(name, params, cls):
    loss = build_loss(name, **params)
    assert type(loss) is cls
    for key, value in params.items():
        assert getattr(loss, key) == value


def test_build_loss_errors_list_valid_choices():
    with pytest.raises(ValueError, match="valid losses: arcface, combined, cosface, dsoftmax, normface, "
                                         "random_softmax, search_softmax, x2softmax"):
        build_loss("sphereface")
    with pytest.raises(ValueError, match=r"no parameter\(s\) m1; valid parameters: s, m, easy_margin, "
                                         "gradient, inter_threshold"):
        build_loss("arcface", m1=1.0)
    with pytest.raises(ValueError, match="valid parameters: s, d, variant, K, rescale_inter"):
        build_loss("dsoftmax", k=64)


@pytest.mark.parametrize("name,params,message", [
    ("x2softmax", {"a": 0.1}, "a < 0"), ("x2softmax", {"h": 0.5}, "h <= 0"),
    ("dsoftmax", {"variant": "Q"}, "full, B, K"), ("dsoftmax", {"variant": "K"}, "needs K >= 1"),
    ("dsoftmax", {"K": 8}, "only used with variant='K'"), ("dsoftmax", {"rescale_inter": True}, "variant='K' only"),
    ("dsoftmax", {"d": 2.0}, r"\[-1, 1\]"), ("search_softmax", {"a": 0.5}, "a <= 0"),
    ("combined", {"m1": 0.0}, "m1 must be > 0"), ("combined", {"m1": 4.0, "m2": 0.0}, "monotone"),
    ("arcface", {"m": 3.5}, r"\[0, pi\)"), ("cosface", {"s": -1.0}, "s must be > 0"),
    ("cosface", {"m": 1.0}, r"CosFace margin m must lie in \[0, 1\)"), ("cosface", {"m": -0.1}, r"\[0, 1\)"),
    ("arcface", {"gradient": "fast"}, "exact.*straight_through"), ("random_softmax", {"sigma": 0}, "sigma > 0"),
    ("cosface", {"s": "big"}, "valid parameters: s, m")])
def test_build_loss_rejects_invalid_values(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, **params)
