import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kdiff import (
    CFDLoss,
    ClassifierFeatureLoss,
    ClassifierTransform,
    DatasetOrientedLoss,
    FrozenClassifier,
)
from kdiff.functional import dataset_oriented_loss, diversity_loss, entropy_loss, feature_kl_loss

from strategies import tensors


def reference_kl(f_s, f_t, tau):
    p = torch.softmax(f_t / tau, -1)
    return (p * (torch.log_softmax(f_t / tau, -1) - torch.log_softmax(f_s, -1))).sum(-1).mean()


dims = st.tuples(st.integers(1, 6), st.integers(2, 12))
temperatures = st.floats(0.05, 5.0)


# ------------------------------------------------------------------------------ feature KL
@given(shape=dims, data=st.data(), tau=temperatures)
def test_kl_nonnegative_and_matches_reference(shape, data, tau):
    f_s, f_t = data.draw(tensors(shape)), data.draw(tensors(shape))
    kl = feature_kl_loss(f_s, f_t, temperature=tau)
    assert float(kl) >= -1e-12
    torch.testing.assert_close(kl, reference_kl(f_s, f_t, tau), rtol=1e-10, atol=1e-12)
    # F.kl_div is torch's own definition: KL(target || input) with log-probabilities.
    torch.testing.assert_close(
        kl, F.kl_div(torch.log_softmax(f_s, -1), torch.log_softmax(f_t / tau, -1), reduction="batchmean", log_target=True)
    )


@given(shape=dims, data=st.data(), tau=temperatures)
def test_kl_zero_iff_tempered_distributions_match(shape, data, tau):
    f_t = data.draw(tensors(shape))
    shift = data.draw(tensors((shape[0], 1)))
    # The student matches the *tempered* teacher: f_S = f_T / tau (+ any per-row constant).
    assert float(feature_kl_loss(f_t / tau + shift, f_t, temperature=tau)) == pytest.approx(0.0, abs=1e-10)
    # Any other student: KL > 0, bounded below by Pinsker's inequality KL >= 1/2 ||p - q||_1^2 per row.
    f_s = data.draw(tensors(shape))
    p, q = torch.softmax(f_t / tau, -1), torch.softmax(f_s, -1)
    per_row = feature_kl_loss(f_s, f_t, temperature=tau, reduction="none").sum(-1)
    assert bool((per_row >= 0.5 * (p - q).abs().sum(-1).square() - 1e-12).all())


@given(shape=dims, data=st.data(), tau=temperatures)
def test_kl_invariant_to_constant_per_feature_row(shape, data, tau):
    f_s, f_t = data.draw(tensors(shape)), data.draw(tensors(shape))
    c_s, c_t = data.draw(tensors((shape[0], 1), scale=100.0)), data.draw(tensors((shape[0], 1), scale=100.0))
    torch.testing.assert_close(
        feature_kl_loss(f_s + c_s, f_t + c_t, temperature=tau), feature_kl_loss(f_s, f_t, temperature=tau), rtol=1e-8, atol=1e-10
    )


def test_kl_reductions():
    f_s, f_t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    none = feature_kl_loss(f_s, f_t, temperature=0.9, reduction="none")
    assert none.shape == (3, 5)
    torch.testing.assert_close(feature_kl_loss(f_s, f_t, temperature=0.9, reduction="sum"), none.sum())
    torch.testing.assert_close(feature_kl_loss(f_s, f_t, temperature=0.9, reduction="mean"), none.mean())
    torch.testing.assert_close(feature_kl_loss(f_s, f_t, temperature=0.9), none.sum() / 3)


# --------------------------------------------------------------------------- entropy / diversity
@given(shape=dims, data=st.data())
def test_entropy_in_range(shape, data):
    logits = data.draw(tensors(shape, scale=10.0))
    h = entropy_loss(logits, reduction="none")
    assert bool((h >= -1e-12).all()) and bool((h <= math.log(shape[1]) + 1e-12).all())
    ref = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(h, ref)
    assert float(entropy_loss(torch.zeros(2, shape[1], dtype=torch.float64))) == pytest.approx(math.log(shape[1]))


@given(shape=dims, data=st.data())
def test_diversity_range_permutation_invariance_and_reference(shape, data):
    logits = data.draw(tensors(shape, scale=5.0))
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    dv = diversity_loss(logits)
    torch.testing.assert_close(diversity_loss(logits[perm]), dv, rtol=1e-12, atol=1e-12)
    pbar = torch.softmax(logits, -1).mean(0)
    torch.testing.assert_close(dv, (pbar * pbar.log()).sum())
    assert -math.log(shape[1]) - 1e-12 <= float(dv) <= 1e-12


@given(gamma=st.floats(0.0, 1.0), shape=dims, data=st.data())
def test_dataset_oriented_combination(gamma, shape, data):
    logits = data.draw(tensors(shape))
    loss, h, dv = dataset_oriented_loss(logits, gamma=gamma)
    torch.testing.assert_close(loss, gamma * h + (1 - gamma) * dv)
    torch.testing.assert_close(DatasetOrientedLoss(gamma=gamma)(logits), loss)


# ---------------------------------------------------------------- extreme values: finite, no NaN
EXTREME = torch.tensor(
    [[1e4, -1e4, 0.0, 3.0], [-1e4, -1e4, 1e4, -1e4], [float("-inf"), 0.0, 1.0, float("-inf")], [5.0, 5.0, 5.0, float("-inf")]],
    dtype=torch.float64,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_give_finite_values_and_gradients(dtype):
    logits = EXTREME.to(dtype).clone().requires_grad_(True)
    for fn in (lambda z: entropy_loss(z), lambda z: diversity_loss(z), lambda z: dataset_oriented_loss(z, gamma=0.5)[0]):
        logits.grad = None
        value = fn(logits)
        value.backward()
        assert bool(torch.isfinite(value)), value
        assert bool(torch.isfinite(logits.grad).all()), logits.grad
    # Entropy of a one-hot-like row is 0, not NaN.
    assert float(entropy_loss(EXTREME[1:2].to(dtype))) == pytest.approx(0.0, abs=1e-6)
    # Feature KL with extreme and -inf teacher entries (probability exactly 0 there).
    f_s = torch.tensor([[1e4, -1e4, 0.0, 3.0], [0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 1.0, 5.0], [2.0, 2.0, 2.0, -2.0]], dtype=dtype, requires_grad=True)
    f_t = EXTREME.to(dtype).clone().requires_grad_(True)
    kl = feature_kl_loss(f_s, f_t, temperature=0.5)
    kl.backward()
    assert bool(torch.isfinite(kl)) and bool(torch.isfinite(f_s.grad).all()) and bool(torch.isfinite(f_t.grad).all())


def test_gradcheck_every_loss():
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for reduction in ("batchmean", "mean", "sum"):
        assert torch.autograd.gradcheck(lambda a, b, r=reduction: feature_kl_loss(a, b, temperature=0.7, reduction=r), (f_s, f_t))
    assert torch.autograd.gradcheck(lambda z: entropy_loss(z), (logits,))
    assert torch.autograd.gradcheck(lambda z: diversity_loss(z), (logits,))
    assert torch.autograd.gradcheck(lambda z: dataset_oriented_loss(z, gamma=0.3)[0], (logits,))
    # The modules, through a frozen (float64) classifier: gradients w.r.t. the student image.
    clf = TupleClassifier().double()
    x_hat = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    x_tilde = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ClassifierFeatureLoss(clf, temperature=0.9)(x, x_tilde), (x_hat,))
    assert torch.autograd.gradcheck(lambda x: CFDLoss(clf, beta=0.5, gamma=0.4)(x, x_tilde).loss, (x_hat,))
    # PD loss
    from kdiff.functional import pd_loss

    a, s = torch.tensor([0.6, 0.8], dtype=torch.float64), torch.tensor([0.8, 0.6], dtype=torch.float64)
    for w in ("truncated_snr", "snr_plus_one", "x_mse", "eps_mse"):
        assert torch.autograd.gradcheck(lambda x, w=w: pd_loss(x, x_tilde, a, s, weighting=w), (x_hat,))


# ------------------------------------------------------------------------------ classifier forms
class TupleClassifier(torch.nn.Module):
    def __init__(self, k: int = 5, d: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, d, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(d, k)

    def forward(self, x):
        f = self.pool(torch.tanh(self.conv(x))).flatten(1)
        return self.fc(f), f


class LogitsOnly(TupleClassifier):
    def forward(self, x):
        return super().forward(x)[0]


def test_three_classifier_forms_agree():
    net = LogitsOnly()
    x = torch.randn(4, 3, 8, 8)
    as_tuple = FrozenClassifier(TupleClassifier.forward.__get__(net))  # a plain callable
    as_hook = FrozenClassifier(net, feature_layer="pool")  # [B, D, 1, 1] is pooled to [B, D]
    as_hook_conv = FrozenClassifier(net, feature_layer="conv")  # [B, D, H, W] is average-pooled
    l1, f1 = as_tuple(x)
    l2, f2 = as_hook(x)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(f1, f2)
    assert as_hook_conv(x)[1].shape == (4, 8)
    module_tuple = TupleClassifier()
    module_tuple.load_state_dict(net.state_dict())
    torch.testing.assert_close(FrozenClassifier(module_tuple)(x)[1], f1)


def test_classifier_gets_no_gradient_and_keeps_its_flags():
    clf = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    loss = ClassifierFeatureLoss(clf, feature_layer="3")
    x_hat = torch.rand(2, 3, 6, 6, requires_grad=True)
    loss(x_hat, torch.rand(2, 3, 6, 6)).backward()
    assert all(p.requires_grad and p.grad is None for p in clf.parameters())
    assert clf.training and x_hat.grad is not None
    loss.eval()
    assert clf.training and not loss.training
    with pytest.raises(TypeError):
        FrozenClassifier(TupleClassifier(), freeze=False)  # nothing to freeze: the module is left as given


def test_teacher_side_has_no_graph_and_gradients_flow_to_student():
    loss_fn = ClassifierFeatureLoss(TupleClassifier(), temperature=0.9)
    x_hat = torch.randn(3, 3, 8, 8, requires_grad=True)
    x_tilde = torch.randn(3, 3, 8, 8, requires_grad=True)
    out = loss_fn.forward_with_outputs(x_hat, x_tilde)
    assert out.teacher_features.grad_fn is None and out.student_features.grad_fn is not None
    out.loss.backward()
    assert x_tilde.grad is None and x_hat.grad is not None and float(x_hat.grad.abs().sum()) > 0


def test_input_transform():
    seen = []

    def clf(x):
        seen.append(x)
        return x.mean((2, 3)), x.mean((2, 3))

    tf = ClassifierTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=16)
    FrozenClassifier(clf, transform=tf)(torch.ones(2, 3, 8, 8))
    assert seen[0].shape == (2, 3, 16, 16)
    torch.testing.assert_close(seen[0], torch.full((2, 3, 16, 16), 2.0))  # 1 -> 1.0 in [0,1] -> (1 - .5)/.25
    loss = ClassifierFeatureLoss(clf, transform=ClassifierTransform(mean=(0.5,) * 3, std=(0.5,) * 3))
    loss(-torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    torch.testing.assert_close(seen[-1], -torch.ones(1, 3, 4, 4))  # -1 -> 0 -> (0 - .5)/.5
    with pytest.raises(ValueError, match="std must be > 0"):
        ClassifierTransform(mean=(0.0,), std=(0.0,))
    with pytest.raises(ValueError, match="mean and std must be given together"):
        ClassifierTransform(mean=(0.0,))
    with pytest.raises(ValueError, match="size must be"):
        ClassifierTransform(size=0)


def test_cfd_loss_combines_terms():
    clf = TupleClassifier()
    cfd = CFDLoss(clf, temperature=0.9, beta=0.25, gamma=0.6, pixel_weight=0.5)
    x_hat, x_tilde = torch.randn(4, 3, 8, 8, requires_grad=True), torch.randn(4, 3, 8, 8)
    pixel = (x_hat - x_tilde).square().mean()
    out = cfd(x_hat, x_tilde, pixel_loss=pixel)
    # The default transform maps [-1, 1] to [0, 1] and bounds the images there.
    logits, f_s = clf(((x_hat + 1) / 2).clamp(0, 1))
    _, f_t = clf(((x_tilde + 1) / 2).clamp(0, 1))
    feat = feature_kl_loss(f_s, f_t, temperature=0.9)
    data, h, dv = dataset_oriented_loss(logits, gamma=0.6)
    torch.testing.assert_close(out.feature_loss, feat)
    torch.testing.assert_close(out.data_loss, data)
    torch.testing.assert_close(out.loss, feat + 0.25 * data + 0.5 * pixel)
    assert all(isinstance(v, torch.Tensor) for v in (out.loss, out.entropy, out.diversity))
    with pytest.raises(ValueError, match="pixel_loss is required"):
        cfd(x_hat, x_tilde)


def test_bad_inputs_named():
    clf = TupleClassifier()
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            ClassifierFeatureLoss(clf, temperature=bad)
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            feature_kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=bad)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
            DatasetOrientedLoss(gamma=bad)
        with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
            CFDLoss(clf, gamma=bad)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        CFDLoss(clf, beta=-1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ClassifierFeatureLoss(clf, reduction="avg")
    with pytest.raises(ValueError, match="input and target must have the same shape"):
        feature_kl_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="input and target must have the same shape"):
        ClassifierFeatureLoss(clf)(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"input must have shape \[B, K\]"):
        entropy_loss(torch.zeros(3))
    with pytest.raises(TypeError, match="classifier returned no features"):
        ClassifierFeatureLoss(LogitsOnly())(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="feature_layer 'head' is not a sub-module"):
        ClassifierFeatureLoss(LogitsOnly(), feature_layer="head")
    with pytest.raises(TypeError, match="classifier must be an nn.Module or callable"):
        ClassifierFeatureLoss(42)  # type: ignore[arg-type]


def test_autocast_bf16_cfd():
    clf = TupleClassifier()
    cfd = CFDLoss(clf)
    x_hat = torch.randn(4, 3, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cfd(x_hat, torch.randn(4, 3, 8, 8))
    assert out.loss.dtype == torch.float32 and bool(torch.isfinite(out.loss))
    out.loss.backward()
    assert bool(torch.isfinite(x_hat.grad).all())


# ------------------------------------------------------------- -inf logits: finite values and grads
def _masked_logits(data, shape):
    """Logits with -inf entries (every row keeps one finite logit; column 0 is -inf in every row
    for about half of the draws) and the same logits with -inf replaced by -60, a finite stand-in
    whose probabilities (< e^-50) change nothing at float64 tolerance."""
    b, k = shape
    logits = data.draw(tensors(shape, scale=2.0))
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b * k, max_size=b * k))).view(b, k)
    if data.draw(st.booleans()):
        mask[:, 0] = True
    mask[:, -1] = False
    return logits.masked_fill(mask, float("-inf")), logits.masked_fill(mask, -60.0)


def _value_and_grad(fn, logits):
    z = logits.clone().requires_grad_(True)
    value = fn(z)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


@given(shape=st.tuples(st.integers(1, 5), st.integers(2, 6)), data=st.data())
def test_minus_inf_logits_give_finite_values_and_gradients_equal_to_the_reference(shape, data):
    logits, finite = _masked_logits(data, shape)
    references = {
        "entropy": lambda z: -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1).mean(),
        "diversity": lambda z: (torch.softmax(z, -1).mean(0) * torch.softmax(z, -1).mean(0).log()).sum(),
    }
    losses = {"entropy": entropy_loss, "diversity": diversity_loss}
    for name, fn in losses.items():
        value, grad = _value_and_grad(fn, logits)
        assert bool(torch.isfinite(value)) and bool(torch.isfinite(grad).all()), (name, value, grad)
        ref_value, ref_grad = _value_and_grad(references[name], finite)
        torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    value, grad = _value_and_grad(lambda z: DatasetOrientedLoss(gamma=0.4)(z), logits)
    assert bool(torch.isfinite(value)) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_minus_inf_in_every_row_and_batch_of_one(dtype):
    every_row = torch.tensor([[0.0, float("-inf"), 1.0], [2.0, float("-inf"), -1.0]], dtype=dtype)
    single = torch.tensor([[0.5, float("-inf"), 1.0, 3.0]], dtype=dtype)
    for logits in (every_row, single):
        for fn in (diversity_loss, lambda z: DatasetOrientedLoss(gamma=0.75)(z)):
            value, grad = _value_and_grad(fn, logits)
            assert bool(torch.isfinite(value)) and bool(torch.isfinite(grad).all()), grad
            assert bool((grad[:, 1] == 0).all())  # a class with probability 0 gets no gradient
    # Dv of the finite columns alone: the -inf class contributes 0 * log 0 = 0.
    expected = diversity_loss(every_row[:, [0, 2]])
    torch.testing.assert_close(diversity_loss(every_row), expected)


# ------------------------------------------------------------------------- hyper-parameter checks
BAD_NUMBERS = [float("inf"), float("-inf"), float("nan"), True]


@pytest.mark.parametrize("bad", BAD_NUMBERS, ids=["inf", "-inf", "nan", "bool"])
def test_non_finite_and_bool_hyper_parameters_are_refused_by_name(bad):
    clf = TupleClassifier()
    z = torch.zeros(2, 3)
    builders = {
        "temperature": [
            lambda v: ClassifierFeatureLoss(clf, temperature=v),
            lambda v: CFDLoss(clf, temperature=v),
            lambda v: feature_kl_loss(z, z, temperature=v),
        ],
        "beta": [lambda v: CFDLoss(clf, beta=v)],
        "gamma": [
            lambda v: CFDLoss(clf, gamma=v),
            lambda v: DatasetOrientedLoss(gamma=v),
            lambda v: dataset_oriented_loss(z, gamma=v),
        ],
        "pixel_weight": [lambda v: CFDLoss(clf, pixel_weight=v)],
    }
    for name, makers in builders.items():
        for make in makers:
            with pytest.raises(ValueError, match=rf"^{name} must be"):
                make(bad)


@given(tau=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3) | st.booleans())
def test_temperature_accepted_iff_finite_positive_number(tau):
    f = torch.zeros(1, 3, dtype=torch.float64)
    ok = not isinstance(tau, bool) and math.isfinite(tau) and tau > 0
    if ok:
        assert float(feature_kl_loss(f, f, temperature=tau)) == pytest.approx(0.0, abs=1e-12)
    else:
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            feature_kl_loss(f, f, temperature=tau)


# ------------------------------------------------------------------------------------ empty batch
def test_empty_batch_is_refused_by_every_loss():
    clf = TupleClassifier()
    empty_logits, empty_images = torch.zeros(0, 5), torch.zeros(0, 3, 4, 4)
    calls = [
        lambda: feature_kl_loss(empty_logits, empty_logits),
        lambda: entropy_loss(empty_logits),
        lambda: diversity_loss(empty_logits),
        lambda: dataset_oriented_loss(empty_logits),
        lambda: DatasetOrientedLoss()(empty_logits),
        lambda: ClassifierFeatureLoss(clf)(empty_images, empty_images),
        lambda: CFDLoss(clf)(empty_images, empty_images),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"input must have at least one row \(B >= 1\)"):
            call()


# ------------------------------------------------------------------------- per-sample weights
def _cfd_pair(seed: int = 0, b: int = 6):
    g = torch.Generator().manual_seed(seed)
    x_hat = (torch.rand(b, 3, 6, 6, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    x_tilde = torch.rand(b, 3, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    torch.manual_seed(seed)
    return CFDLoss(TupleClassifier().double(), temperature=0.9, beta=0.5, gamma=0.4), x_hat, x_tilde


def _terms(out):
    return torch.stack([out.loss, out.feature_loss, out.data_loss, out.entropy, out.diversity])


def test_weight_of_ones_is_the_unweighted_loss():
    cfd, x_hat, x_tilde = _cfd_pair()
    ones = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(_terms(cfd(x_hat, x_tilde, weight=ones)), _terms(cfd(x_hat, x_tilde)), rtol=1e-14, atol=1e-15)
    for reduction in ("batchmean", "mean", "sum", "none"):
        loss = ClassifierFeatureLoss(cfd.feature_loss.classifier, temperature=0.9, reduction=reduction)
        torch.testing.assert_close(loss(x_hat, x_tilde, weight=ones), loss(x_hat, x_tilde), rtol=1e-14, atol=1e-15)
    # A bool gate is the same as its float version.
    gate = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(_terms(cfd(x_hat, x_tilde, weight=gate)), _terms(cfd(x_hat, x_tilde, weight=gate.double())))


def test_gate_is_the_kept_fraction_times_the_loss_of_the_kept_samples():
    cfd, x_hat, x_tilde = _cfd_pair()
    gate = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    kept = gate.bool()
    out = cfd(x_hat, x_tilde, weight=gate)
    alone = cfd(x_hat[kept], x_tilde[kept])
    torch.testing.assert_close(_terms(out), 0.5 * _terms(alone), rtol=1e-12, atol=1e-14)  # 3 of 6 kept
    (grad,) = torch.autograd.grad(out.loss, x_hat)
    assert bool((grad[~kept] == 0).all()) and bool((grad[kept] != 0).any())
    # Linear in the weight: scaling it scales every term.
    torch.testing.assert_close(_terms(cfd(x_hat, x_tilde, weight=3 * gate)), 3 * _terms(out), rtol=1e-12, atol=1e-14)


def test_weighted_terms_follow_the_documented_formulas():
    cfd, x_hat, x_tilde = _cfd_pair()
    w = torch.tensor([0.2, 1.0, 0.0, 2.5, 0.7, 1.3], dtype=torch.float64)
    out = cfd(x_hat, x_tilde, weight=w)
    clf = cfd.feature_loss.classifier
    logits, f_s = clf(x_hat)
    _, f_t = clf(x_tilde)
    kl = feature_kl_loss(f_s, f_t, temperature=0.9, reduction="none").sum(-1)
    p = torch.softmax(logits, -1)
    h = -(p * torch.log_softmax(logits, -1)).sum(-1)
    pbar = (w[:, None] * p).sum(0) / w.sum()
    dv = w.mean() * (pbar * pbar.log()).sum()
    torch.testing.assert_close(out.feature_loss, (w * kl).mean())
    torch.testing.assert_close(out.entropy, (w * h).mean())
    torch.testing.assert_close(out.diversity, dv)
    torch.testing.assert_close(out.loss, (w * kl).mean() + 0.5 * (0.4 * (w * h).mean() + 0.6 * dv))
    none = ClassifierFeatureLoss(clf, temperature=0.9, reduction="none")(x_hat, x_tilde, weight=w)
    torch.testing.assert_close(none, w[:, None] * feature_kl_loss(f_s, f_t, temperature=0.9, reduction="none"))
    for reduction, reduce in (("sum", torch.sum), ("mean", torch.mean)):
        loss = ClassifierFeatureLoss(clf, temperature=0.9, reduction=reduction)
        torch.testing.assert_close(loss(x_hat, x_tilde, weight=w), reduce(none))
    weighted = lambda x: cfd(x, x_tilde, weight=w).loss  # noqa: E731
    assert torch.autograd.gradcheck(weighted, (x_hat,))
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: DatasetOrientedLoss(gamma=0.3)(z, weight=w), (logits,))


def test_all_zero_weights_give_zero_and_finite_zero_gradients():
    cfd, x_hat, x_tilde = _cfd_pair()
    out = cfd(x_hat, x_tilde, weight=torch.zeros(6, dtype=torch.float64))
    assert bool((_terms(out) == 0).all())
    (grad,) = torch.autograd.grad(out.loss, x_hat)
    assert bool((grad == 0).all())
    # -inf logits and zero weights together stay finite too.
    logits = EXTREME.clone().requires_grad_(True)
    for w in (torch.zeros(4, dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0, 2.0], dtype=torch.float64)):
        value, grad = _value_and_grad(lambda z, w=w: DatasetOrientedLoss(gamma=0.5)(z, weight=w), logits)
        assert bool(torch.isfinite(value)) and bool(torch.isfinite(grad).all())
        assert bool((grad[w == 0] == 0).all())


def test_bad_weights_are_refused_by_name():
    cfd, x_hat, x_tilde = _cfd_pair()
    for bad in (torch.ones(6, 1), torch.ones(1), torch.ones(()), torch.ones(7), torch.ones(2, 3)):
        with pytest.raises(ValueError, match=r"weight must have shape \[6\] \(one value per sample\)"):
            cfd(x_hat, x_tilde, weight=bad)
    with pytest.raises(ValueError, match=r"weight must have shape \[6\]"):
        DatasetOrientedLoss()(torch.zeros(6, 3), weight=torch.ones(5))
    for bad in (torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, float("nan"), 1, 1, 1, 1])):
        with pytest.raises(ValueError, match="weight must hold finite values >= 0"):
            cfd(x_hat, x_tilde, weight=bad)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor; got list"):
        cfd(x_hat, x_tilde, weight=[1.0] * 6)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="weight must be a real"):
        cfd(x_hat, x_tilde, weight=torch.ones(6, dtype=torch.complex64))


def test_weighted_diversity_over_processes_equals_the_whole_batch(monkeypatch):
    """With sync_global, the gathered weighted class mix and mean weight are the global batch's."""
    import kdiff.losses as losses_module

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.0, 1.5, 1.0], dtype=torch.float64)
    whole = DatasetOrientedLoss(gamma=0.0)(logits, weight=w)  # Dv alone
    parts = ((logits[:3], w[:3]), (logits[3:], w[3:]))  # unequal shares, as processes may have
    sent = {}
    monkeypatch.setattr(losses_module, "world_size", lambda group=None: 2)
    monkeypatch.setattr(losses_module, "all_gather_with_grad", lambda t, group=None: sent.setdefault("t", t).unsqueeze(0).expand(2, -1))
    DatasetOrientedLoss(gamma=0.0, sync_global=True)(*parts[1][:1], weight=parts[1][1])
    other = sent.pop("t").detach()
    monkeypatch.setattr(losses_module, "all_gather_with_grad", lambda t, group=None: torch.stack([t, other]))
    local = DatasetOrientedLoss(gamma=0.0, sync_global=True)(parts[0][0], weight=parts[0][1])
    torch.testing.assert_close(local, whole)


def test_snr_gate_keeps_the_log_snr_range():
    from kdiff import DiscreteSchedule
    from kdiff.losses import snr_gate

    schedule = DiscreteSchedule.linear(1000)
    t = torch.arange(0, 1001, 50)
    alpha, sigma = schedule.alpha_sigma(t, dtype=torch.float64)
    logsnr = schedule.logsnr(t).to(torch.float64)
    torch.testing.assert_close(snr_gate(alpha, sigma, min_logsnr=-5.0), (logsnr >= -5).double())
    both = snr_gate(alpha, sigma, min_logsnr=-5.0, max_logsnr=2.0)
    torch.testing.assert_close(both, ((logsnr >= -5) & (logsnr <= 2)).double())
    assert 0 < float(both.sum()) < len(t)
    a, s = torch.tensor([0.6, 1.0, 0.0]), torch.tensor([0.8, 0.0, 1.0])  # logSNR 2 log(3/4), +inf, -inf
    assert snr_gate(a, s, min_logsnr=2 * math.log(0.75)).tolist() == [1.0, 1.0, 0.0]  # bounds are inclusive
    assert snr_gate(a, s, max_logsnr=0.0).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="give min_logsnr, max_logsnr or both"):
        snr_gate(a, s)
    with pytest.raises(ValueError, match="min_logsnr must be <= max_logsnr"):
        snr_gate(a, s, min_logsnr=1.0, max_logsnr=0.0)
    with pytest.raises(ValueError, match="max_logsnr must be a finite number"):
        snr_gate(a, s, max_logsnr=float("nan"))
    with pytest.raises(ValueError, match="alpha_t and sigma_t must have the same shape"):
        snr_gate(a, s[:2], min_logsnr=0.0)
