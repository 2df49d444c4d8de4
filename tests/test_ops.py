"""Fused ops (kdiff.ops) against the plain-PyTorch reference: values, gradients, dispatch.

Without a GPU the Triton kernels run through Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` at import, before anything defines a kernel, so CPU tensors can take the
Triton path (float32 and float16: the interpreter has no bfloat16). With a CUDA device the same
tests run the compiled kernels on the GPU, bfloat16 included. Shapes stay small: the
interpreter runs every kernel in NumPy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    # Triton fixes the mode of every kernel, its own library included, when it is imported: set
    # the variable first, then import it so that later tests cannot change the mode.
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
INTERPRETER_OFF = ""
if HAS_TRITON and not ON_GPU and isinstance(tl.sum, triton.JITFunction):
    INTERPRETER_OFF = (
        "triton was imported before this module could set TRITON_INTERPRET=1 (torch.compile "
        "imports it): run with TRITON_INTERPRET=1 in the environment"
    )

import kdiff.functional as ref  # noqa: E402
from kdiff import DiscreteSchedule, ProgressiveDistiller  # noqa: E402
from kdiff.ops import (  # noqa: E402
    IMPLS,
    dataset_oriented_loss,
    feature_kl_loss,
    interpreter_enabled,
    pd_target_loss,
    resolve_impl,
)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or bool(INTERPRETER_OFF),
    reason=INTERPRETER_OFF
    or "triton is not installed (pip install 'kdiff[triton]'); the fused kernels are tested "
    "through its CPU interpreter",
)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# Loss/gradient tolerances per input dtype (the maths is float32 in both paths).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
}
# NumPy warns on -inf - -inf in masked-off lanes of the interpreter; those lanes are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _grads(loss, inputs, grad_output):
    return torch.autograd.grad(loss, inputs, grad_output, retain_graph=True)


def _grad_output(loss):
    # A loss scaled by 2 (grad_output != 1) or per-element weights for reduction="none".
    if loss.ndim == 0:
        return torch.tensor(2.0, device=loss.device)
    return torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device) + 0.5


# ------------------------------------------------------------------------------- dispatch
def test_import_kdiff_does_not_import_triton():
    code = "import sys, kdiff, kdiff.ops; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_unknown_impl_lists_allowed_values():
    x = torch.randn(2, 3)
    for call in (
        lambda: feature_kl_loss(x, x, impl="cuda"),
        lambda: dataset_oriented_loss(x, impl="fast"),
        lambda: resolve_impl("Triton", x, op="feature_kl_loss"),
    ):
        with pytest.raises(ValueError, match="impl must be one of 'auto', 'torch', 'triton'"):
            call()
    assert IMPLS == ("auto", "torch", "triton")


def test_auto_is_torch_for_cpu_tensors_and_mixed_devices_are_refused():
    x = torch.randn(2, 3)
    assert resolve_impl("auto", x, op="op") == "torch"
    assert resolve_impl("torch", x.double(), op="op") == "torch"
    with pytest.raises(ValueError, match="one device; got cpu and meta"):
        resolve_impl("auto", x, torch.empty(2, 3, device="meta"), op="op")


def test_interpreter_flag_reads_triton_env(monkeypatch):
    for value, expected in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreter_enabled() is expected


@needs_triton
@pytest.mark.skipif(ON_GPU, reason="CPU-only dispatch rule; this machine has CUDA")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CPU tensors runs only under Triton's interpreter"):
        feature_kl_loss(x, x, impl="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dataset_oriented_loss(x, impl="triton")


@needs_triton
def test_triton_refuses_unsupported_dtypes():
    with pytest.raises(ValueError, match="float32, float16, bfloat16; got float64"):
        feature_kl_loss(_randn(2, 3).double(), _randn(2, 3).double(), impl="triton")
    if not ON_GPU:
        with pytest.raises(ValueError, match="interpreter .* supports float32, float16; got bfloat16"):
            dataset_oriented_loss(torch.randn(2, 3, dtype=torch.bfloat16), impl="triton")


@needs_triton
def test_feature_kl_triton_refuses_a_target_that_requires_grad():
    f_s, f_t = _randn(3, 5), _randn(3, 5).requires_grad_(True)
    with pytest.raises(ValueError, match="no gradient to target"):
        feature_kl_loss(f_s, f_t, impl="triton")
    # Without grad mode there is nothing to differentiate: the kernel runs.
    with torch.no_grad():
        torch.testing.assert_close(
            feature_kl_loss(f_s, f_t, impl="triton"), ref.feature_kl_loss(f_s, f_t.detach())
        )


def test_bad_arguments_name_themselves():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        feature_kl_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        feature_kl_loss(x, x, temperature=0.0)
    with pytest.raises(ValueError, match=r"input must have shape \[B, D\]"):
        feature_kl_loss(x[0], x[0])
    with pytest.raises(ValueError, match="gamma"):
        dataset_oriented_loss(x, gamma=1.5)
    with pytest.raises(ValueError, match="teacher_prediction must be one of"):
        pd_target_loss(x, x, x, x, *[torch.ones(2)] * 6, teacher_prediction="noise")
    with pytest.raises(ValueError, match=r"alpha_t1 must have shape \[2\]"):
        pd_target_loss(x, x, x, x, torch.ones(2), torch.ones(2), torch.ones(3), *[torch.ones(2)] * 3)


# ------------------------------------------------------------------------------ feature KL
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(41, 1271), (1, 7), (3, 1), (2, 2048)])
def test_feature_kl_matches_reference(shape, reduction, dtype):
    f_s = _randn(*shape, dtype=dtype, scale=2.0).requires_grad_(True)
    f_t = _randn(*shape, dtype=dtype, scale=2.0, seed=1)
    out = feature_kl_loss(f_s, f_t, temperature=0.9, reduction=reduction, impl="triton")
    expected = feature_kl_loss(f_s, f_t, temperature=0.9, reduction=reduction, impl="torch")
    assert out.dtype == expected.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOL[dtype])
    go = _grad_output(expected)
    (grad,), (grad_ref,) = _grads(out, f_s, go), _grads(expected, f_s, go)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), grad_ref.float(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_feature_kl_rows_longer_than_a_block(monkeypatch, reduction):
    from kdiff.ops import feature_kl

    monkeypatch.setattr(feature_kl, "_MAX_BLOCK", 256)  # 1271 columns: 5 blocks, online softmax
    f_s = _randn(41, 1271, scale=3.0).requires_grad_(True)
    f_t = _randn(41, 1271, scale=3.0, seed=1)
    out = feature_kl_loss(f_s, f_t, temperature=0.7, reduction=reduction, impl="triton")
    expected = ref.feature_kl_loss(f_s, f_t, temperature=0.7, reduction=reduction)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    go = _grad_output(expected)
    torch.testing.assert_close(_grads(out, f_s, go)[0], _grads(expected, f_s, go)[0], **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("long_rows", [False, True])
def test_feature_kl_non_finite_inputs_like_the_reference(monkeypatch, long_rows):
    from kdiff.ops import feature_kl

    if long_rows:
        monkeypatch.setattr(feature_kl, "_MAX_BLOCK", 4)
    inf = float("inf")
    f_s = _randn(5, 9)
    f_t = _randn(5, 9, seed=1)
    f_s[0, 2] = -inf  # q = 0 where p > 0: a huge but finite loss, zero gradient there
    f_t[1, :5] = -inf  # p = 0: contributes nothing
    f_s[2, :5] = -inf  # the first block of the row is all -inf (online max starts at -inf)
    f_s[3, 4] = float("nan")  # NaN row
    f_t[4, 0] = inf  # softmax of +inf is NaN in torch too
    f_s.requires_grad_(True)
    for reduction in ("none", "sum"):
        out = feature_kl_loss(f_s, f_t, temperature=0.5, reduction=reduction, impl="triton")
        expected = ref.feature_kl_loss(f_s, f_t, temperature=0.5, reduction=reduction)
        torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-5, atol=1e-6)
        go = _grad_output(expected)
        torch.testing.assert_close(
            _grads(out, f_s, go)[0], _grads(expected, f_s, go)[0], equal_nan=True, rtol=1e-5, atol=1e-6
        )
    finite = feature_kl_loss(f_s[:3], f_t[:3], reduction="none", impl="triton")
    assert bool(torch.isfinite(finite).all())


@needs_triton
def test_feature_kl_without_grad_writes_no_gradient():
    f_s, f_t = _randn(4, 33), _randn(4, 33, seed=1)
    out = feature_kl_loss(f_s, f_t, impl="triton")
    assert not out.requires_grad
    torch.testing.assert_close(out, ref.feature_kl_loss(f_s, f_t))


# --------------------------------------------------------------------- dataset-oriented loss
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(41, 10), (1, 10), (130, 37), (5, 1)])
def test_dataset_oriented_matches_reference(shape, dtype):
    logits = _randn(*shape, dtype=dtype, scale=3.0).requires_grad_(True)
    out = dataset_oriented_loss(logits, gamma=0.7, impl="triton")
    expected = dataset_oriented_loss(logits, gamma=0.7, impl="torch")
    for o, e in zip(out, expected, strict=True):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, e, **TOL[dtype])
    # Each term's gradient on its own (entropy only, diversity only), then the scaled total.
    for i, go in ((1, 1.0), (2, 1.0), (0, 2.0)):
        go = torch.tensor(go, device=DEVICE)
        (grad,), (grad_ref,) = _grads(out[i], logits, go), _grads(expected[i], logits, go)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), grad_ref.float(), **TOL[dtype])


@needs_triton
def test_dataset_oriented_many_classes_loop_over_blocks(monkeypatch):
    from kdiff.ops import dataset_oriented

    monkeypatch.setattr(dataset_oriented, "_MAX_BLOCK_K", 16)  # 37 classes: 3 column blocks
    logits = _randn(70, 37, scale=4.0).requires_grad_(True)
    out = dataset_oriented_loss(logits, gamma=0.25, impl="triton")
    expected = ref.dataset_oriented_loss(logits, gamma=0.25)
    torch.testing.assert_close(torch.stack(out), torch.stack(expected), **TOL[torch.float32])
    go = torch.tensor(2.0)
    torch.testing.assert_close(_grads(out[0], logits, go)[0], _grads(expected[0], logits, go)[0], **TOL[torch.float32])


@needs_triton
def test_dataset_oriented_non_finite_like_the_reference():
    logits = _randn(6, 5, scale=2.0)
    logits[0, 1] = -float("inf")
    logits[:, 3] = -float("inf")  # a class that is -inf in every row
    logits.requires_grad_(True)
    out = dataset_oriented_loss(logits, impl="triton")
    expected = ref.dataset_oriented_loss(logits)
    torch.testing.assert_close(torch.stack(out), torch.stack(expected), rtol=1e-5, atol=1e-6)
    grad = _grads(out[0], logits, None)[0]
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad, _grads(expected[0], logits, None)[0], rtol=1e-5, atol=1e-6)
    nan_logits = logits.detach().clone()
    nan_logits[2, 0] = float("nan")
    out = dataset_oriented_loss(nan_logits, impl="triton")
    assert torch.isnan(out[0]) and torch.isnan(ref.dataset_oriented_loss(nan_logits)[0])


# ------------------------------------------------------------------------- PD target + loss
def _pd_case(shape, dtype=torch.float32, seed=0):
    B = shape[0]
    z_t = _randn(*shape, dtype=dtype, seed=seed)
    teacher_t, teacher_t1 = _randn(*shape, dtype=dtype, scale=1.5, seed=seed + 1), _randn(*shape, dtype=dtype, scale=1.5, seed=seed + 2)
    x_hat = _randn(*shape, dtype=dtype, seed=seed + 3).requires_grad_(True)
    a_t = torch.linspace(0.2, 0.9, B, device=DEVICE)
    a_1, a_2 = a_t + 0.04, a_t + 0.08
    coeffs = [c for a in (a_t, a_1, a_2) for c in (a, (1 - a * a).sqrt())]
    return x_hat, z_t, teacher_t, teacher_t1, coeffs


@needs_triton
@pytest.mark.parametrize("kind", ["x", "eps", "v"])
@pytest.mark.parametrize("clip_x", [False, True])
def test_pd_target_loss_matches_reference(kind, clip_x):
    x_hat, z_t, teacher_t, teacher_t1, coeffs = _pd_case((3, 3, 5, 7))
    for weighting in ref.WEIGHTINGS:
        for reduction in ("mean", "sum", "none"):
            kw = dict(teacher_prediction=kind, clip_x=clip_x, weighting=weighting, reduction=reduction)
            out = pd_target_loss(x_hat, z_t, teacher_t, teacher_t1, *coeffs, impl="triton", **kw)
            expected = pd_target_loss(x_hat, z_t, teacher_t, teacher_t1, *coeffs, impl="torch", **kw)
            for o, e in zip(out, expected, strict=True):
                torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
            assert not out.x_tilde.requires_grad and not out.eps_tilde.requires_grad
            go = _grad_output(expected.loss)
            torch.testing.assert_close(_grads(out.loss, x_hat, go)[0], _grads(expected.loss, x_hat, go)[0], rtol=1e-5, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pd_target_loss_dtypes_and_coefficient_shapes(dtype):
    x_hat, z_t, teacher_t, teacher_t1, coeffs = _pd_case((2, 1, 33, 40), dtype=dtype)  # N > one block
    four_d = [c.reshape(-1, 1, 1, 1) for c in coeffs]
    out = pd_target_loss(x_hat, z_t, teacher_t, teacher_t1, *four_d, clip_x=True, impl="triton")
    # The kernel's maths is float32 (the torch path's target is in the input dtype): compare with
    # the reference on the same values in float32, up to rounding of the outputs to ``dtype``.
    x32 = x_hat.detach().float().requires_grad_(True)
    expected = pd_target_loss(x32, z_t.float(), teacher_t.float(), teacher_t1.float(), *coeffs, clip_x=True, impl="torch")
    assert out.x_tilde.dtype == dtype and out.loss.dtype == torch.float32
    out_tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, **TOL[torch.float32])
    torch.testing.assert_close(out.x_tilde.float(), expected.x_tilde, **out_tol)
    torch.testing.assert_close(out.eps_tilde.float(), expected.eps_tilde, **out_tol)
    go = torch.tensor(2.0, device=DEVICE)
    (grad,), (grad_ref,) = _grads(out.loss, x_hat, go), _grads(expected.loss, x32, go)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), grad_ref, **out_tol)
    # 0-d coefficients: one value for the whole batch.
    scalar = [c[0] for c in coeffs]
    out0 = pd_target_loss(x_hat, z_t, teacher_t, teacher_t1, *scalar, impl="triton")
    expected0 = pd_target_loss(x32, z_t.float(), teacher_t.float(), teacher_t1.float(), *scalar, impl="torch")
    torch.testing.assert_close(out0.loss, expected0.loss, **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_pd_target_loss_reproduces_the_distiller(impl):
    """The fused chain gives ProgressiveDistiller's target and loss from the teacher's outputs."""
    torch.manual_seed(0)
    net_t = torch.nn.Conv2d(3, 3, 3, padding=1).to(DEVICE)
    net_s = torch.nn.Conv2d(3, 3, 3, padding=1).to(DEVICE)
    teacher = lambda z, t: net_t(z) * 0.5
    student = lambda z, t: net_s(z)
    sched = DiscreteSchedule.cosine(1024)
    pd = ProgressiveDistiller(teacher, student, sched, 8, teacher_prediction="v", student_prediction="x",
                              weighting="truncated_snr", clip_teacher_x=True)
    x = _randn(4, 3, 8, 8).clamp(-1, 1)
    t = torch.tensor([128.0, 512.0, 768.0, 1024.0], device=DEVICE)
    res = pd(x, t=t, noise=_randn(4, 3, 8, 8, seed=5))
    coeffs = []
    for time in (t, res.t_mid, res.t_next):
        coeffs += list(sched.alpha_sigma(time, dtype=torch.float32))
    with torch.no_grad():
        out_t, out_t1 = teacher(res.z_t, t), teacher(res.z_mid, res.t_mid)
    out = pd_target_loss(res.x_pred, res.z_t, out_t, out_t1, *coeffs, teacher_prediction="v", clip_x=True, impl=impl)
    torch.testing.assert_close(out.x_tilde, res.x_target, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, res.loss, rtol=1e-4, atol=1e-6)
    # The defining property: one DDIM step from the target lands on the teacher's z_t''.
    torch.testing.assert_close(ref.ddim_update(out.x_tilde, out.eps_tilde, coeffs[4], coeffs[5]), res.z_next, rtol=1e-4, atol=1e-4)
    grad = torch.autograd.grad(out.loss, net_s.weight, retain_graph=True)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(res.loss, net_s.weight)[0], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------ global batch (torch.distributed)
def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        full = torch.randn(9, 7, generator=torch.Generator().manual_seed(0)) * 3
        local = (full[:4] if rank == 0 else full[4:]).clone().requires_grad_(True)
        loss, _, dv = dataset_oriented_loss(local, gamma=0.75, sync_global=True, impl="triton")
        loss.backward()
        torch.save({"loss": loss.detach(), "dv": dv.detach(), "grad": local.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_triton
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(ON_GPU, reason="gloo takes CPU tensors, which reach Triton only through the interpreter (off with CUDA)")
def test_dataset_oriented_global_batch_is_exact_under_ddp():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        res = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    full = (torch.randn(9, 7, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_(True)
    _, _, dv_single = ref.dataset_oriented_loss(full, gamma=0.75)
    for r in res:  # Dv is over the global batch on every rank
        torch.testing.assert_close(r["dv"], dv_single.detach(), rtol=1e-5, atol=1e-6)
    # Each rank's backward reaches every rank's logits through the gathered Dv: the summed
    # gradient equals the single-process gradient of (H_rank terms + 2 Dv).
    h0 = ref.entropy_loss(full[:4])
    h1 = ref.entropy_loss(full[4:])
    total = 0.75 * (h0 + h1) + 0.25 * 2 * dv_single
    (grad_single,) = torch.autograd.grad(total, full)
    torch.testing.assert_close(torch.cat([res[0]["grad"], res[1]["grad"]]), grad_single, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------- modules: CFD losses and the distiller
class _TinyClassifier(torch.nn.Module):
    """A small CNN returning ``(logits, pooled features)``: 3 x 8 x 8 images, D = 16, K = 5."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 16, 3)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        f = self.body(x).relu().mean((2, 3))
        return self.head(f), f


def _classifier(device=DEVICE):
    torch.manual_seed(0)
    return _TinyClassifier().to(device)


def _images(device=DEVICE, seed=0):
    x_hat = (_randn(4, 3, 8, 8, scale=1.5, seed=seed)).to(device).requires_grad_(True)
    return x_hat, _randn(4, 3, 8, 8, seed=seed + 1).to(device)


def _distiller(impl, teacher_prediction="v", student_prediction="x", clip=True, device=DEVICE):
    torch.manual_seed(0)
    net_t = torch.nn.Conv2d(3, 3, 3, padding=1).to(device)
    net_s = torch.nn.Conv2d(3, 3, 3, padding=1).to(device)
    pd = ProgressiveDistiller(lambda z, t: 0.5 * net_t(z), lambda z, t: net_s(z), DiscreteSchedule.cosine(1024), 8,
                              teacher_prediction=teacher_prediction, student_prediction=student_prediction,
                              clip_teacher_x=clip, impl=impl)
    return pd, net_s


def _auto_takes_triton(monkeypatch):
    """Make ``impl="auto"`` resolve as ``"triton"`` (what it does for CUDA tensors), counting launches."""
    import kdiff.distill
    import kdiff.ops._dispatch
    import kdiff.ops.functional as ops_functional

    real_resolve, real_load = ops_functional.resolve_impl, ops_functional.load_kernels
    launches = []

    def resolve(impl, *tensors, op):
        return real_resolve("triton" if impl == "auto" else impl, *tensors, op=op)

    def load(name, device):
        launches.append(name)
        return real_load(name, device)

    monkeypatch.setattr(ops_functional, "resolve_impl", resolve)
    monkeypatch.setattr(kdiff.distill, "resolve_impl", resolve)
    monkeypatch.setattr(ops_functional, "load_kernels", load)
    return launches


def test_modules_validate_and_show_impl():
    from kdiff import CFDLoss, ClassifierFeatureLoss, DatasetOrientedLoss

    clf = _TinyClassifier()
    f = lambda z, t: z  # noqa: E731
    sched = DiscreteSchedule.cosine(64)
    for build in (
        lambda impl: ClassifierFeatureLoss(clf, impl=impl),
        lambda impl: DatasetOrientedLoss(impl=impl),
        lambda impl: CFDLoss(clf, impl=impl),
        lambda impl: ProgressiveDistiller(f, f, sched, 4, teacher_prediction="x", student_prediction="x", impl=impl),
    ):
        for bad in ("cuda", "Triton", None):
            with pytest.raises(ValueError, match="impl must be one of 'auto', 'torch', 'triton'"):
                build(bad)
        assert build("auto").impl == "auto"
        assert "impl='triton'" in repr(build("triton"))
    cfd = CFDLoss(clf, impl="torch")
    assert cfd.feature_loss.impl == cfd.data_loss.impl == "torch"
    pd = ProgressiveDistiller(f, f, sched, 4, teacher_prediction="x", student_prediction="x", impl="torch")
    assert pd.next_round().impl == "torch"


def test_modules_auto_on_cpu_is_bit_identical_to_the_reference():
    """The default impl on CPU runs exactly kdiff.functional's maths: values and gradients."""
    from kdiff import CFDLoss, ClassifierFeatureLoss, DatasetOrientedLoss, FrozenClassifier
    from kdiff.functional import add_noise, ddim_step_coeffs, pd_loss, pd_target

    cpu = torch.device("cpu")
    clf = FrozenClassifier(_classifier(cpu))
    x_hat, x_tilde = _images(cpu)
    with torch.no_grad():
        f_t = clf(x_tilde)[1]
    logits, f_s = clf(x_hat)
    for reduction in ("batchmean", "mean", "sum", "none"):
        loss = ClassifierFeatureLoss(clf, temperature=0.9, reduction=reduction)(x_hat, x_tilde)
        expected = ref.feature_kl_loss(f_s, f_t, temperature=0.9, reduction=reduction)
        assert torch.equal(loss, expected)
    data = DatasetOrientedLoss(gamma=0.6).terms(logits)
    for got, want in zip(data, ref.dataset_oriented_loss(logits, gamma=0.6), strict=True):
        assert torch.equal(got, want)
    out = CFDLoss(clf, temperature=0.9, beta=0.01, gamma=0.6)(x_hat, x_tilde)
    expected = ref.feature_kl_loss(f_s, f_t, temperature=0.9) + 0.01 * ref.dataset_oriented_loss(logits, gamma=0.6)[0]
    assert torch.equal(out.loss, expected)
    assert torch.equal(torch.autograd.grad(out.loss, x_hat)[0], torch.autograd.grad(expected, x_hat)[0])

    # The distiller: the teacher's two DDIM half-steps, pd_target and pd_loss, as written out here.
    pd, net_s = _distiller("auto", device=cpu)
    x = _randn(4, 3, 8, 8).cpu().clamp(-1, 1)
    noise = _randn(4, 3, 8, 8, seed=5).cpu()
    t = torch.tensor([128.0, 512.0, 768.0, 1024.0])
    res = pd(x, t=t, noise=noise)
    sched = pd.schedule
    (a_t, s_t), (a_m, s_m), (a_n, s_n) = (sched.alpha_sigma(u, dtype=torch.float32) for u in (t, res.t_mid, res.t_next))
    z_t = add_noise(x, noise, a_t, s_t)
    with torch.no_grad():
        z_mid = ddim_step_coeffs(pd.teacher(z_t, t), z_t, a_t, s_t, a_m, s_m, prediction_type="v", clip_x=True)[0]
        z_next = ddim_step_coeffs(pd.teacher(z_mid, res.t_mid), z_mid, a_m, s_m, a_n, s_n,
                                  prediction_type="v", clip_x=True)[0]
        x_tilde, eps_tilde = pd_target(z_t, z_next, a_t, s_t, a_n, s_n)
    per_sample = pd_loss(net_s(z_t), x_tilde, a_t, s_t, weighting="truncated_snr", reduction="none")
    for got, want in ((res.z_mid, z_mid), (res.z_next, z_next), (res.x_target, x_tilde),
                      (res.eps_target, eps_tilde), (res.loss_per_sample, per_sample), (res.loss, per_sample.mean())):
        assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(res.loss, net_s.weight)[0], torch.autograd.grad(per_sample.mean(), net_s.weight)[0])


@needs_triton
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_classifier_feature_loss_triton_matches_torch(reduction):
    from kdiff import ClassifierFeatureLoss

    clf = _classifier()
    x_hat, x_tilde = _images()
    losses = [ClassifierFeatureLoss(clf, temperature=0.9, reduction=reduction, impl=impl)(x_hat, x_tilde)
              for impl in ("triton", "torch")]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    go = _grad_output(losses[1])
    torch.testing.assert_close(_grads(losses[0], x_hat, go)[0], _grads(losses[1], x_hat, go)[0], rtol=1e-5, atol=1e-5)


@needs_triton
def test_dataset_oriented_module_triton_matches_torch():
    from kdiff import DatasetOrientedLoss

    logits = _randn(13, 7, scale=3.0).requires_grad_(True)
    fused = DatasetOrientedLoss(gamma=0.6, impl="triton").terms(logits)
    plain = DatasetOrientedLoss(gamma=0.6, impl="torch").terms(logits)
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    go = torch.tensor(2.0, device=DEVICE)
    torch.testing.assert_close(_grads(fused[0], logits, go)[0], _grads(plain[0], logits, go)[0], rtol=1e-5, atol=1e-5)


@needs_triton
def test_cfd_loss_triton_matches_torch_end_to_end():
    """Student -> x_hat -> frozen classifier -> both CFD terms, fused and plain: values and the student's gradient."""
    from kdiff import CFDLoss

    clf = _classifier()
    results = {}
    for impl in ("triton", "torch"):
        pd, net_s = _distiller("torch")
        res = pd(_randn(4, 3, 8, 8).clamp(-1, 1), t=torch.tensor([128.0, 512.0, 768.0, 1024.0], device=DEVICE),
                 noise=_randn(4, 3, 8, 8, seed=5))
        terms = CFDLoss(clf, temperature=0.9, beta=0.5, gamma=0.6, pixel_weight=0.1, impl=impl)(
            res.x_pred, res.x_target, pixel_loss=res.loss
        )
        grad = torch.autograd.grad(terms.loss * 2.0, net_s.weight)[0]
        results[impl] = (terms, grad)
    (fused, grad), (plain, grad_ref) = results["triton"], results["torch"]
    for name in ("loss", "feature_loss", "data_loss", "entropy", "diversity"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize(("teacher", "student", "clip"), [("v", "x", True), ("eps", "eps", False), ("x", "v", False)])
def test_distiller_triton_matches_torch(teacher, student, clip):
    fields = ("loss", "loss_per_sample", "z_t", "z_mid", "z_next", "x_target", "eps_target", "x_pred", "eps_pred",
              "alpha_t", "sigma_t", "t_mid", "t_next")
    results = {}
    for impl in ("triton", "torch"):
        pd, net_s = _distiller(impl, teacher, student, clip)
        # t = 1024 is the top of the schedule (alpha_t near 0): z_t'' and x_tilde reach ~1e4 there.
        res = pd(_randn(4, 3, 8, 8).clamp(-1, 1), t=torch.tensor([128.0, 512.0, 768.0, 1024.0], device=DEVICE),
                 noise=_randn(4, 3, 8, 8, seed=5))
        results[impl] = (res, torch.autograd.grad(res.loss * 2.0, net_s.weight)[0])
    (fused, grad), (plain, grad_ref) = results["triton"], results["torch"]
    assert pd.weighting == ("eps_mse" if student == "eps" else "truncated_snr")
    for name in fields:
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=1e-5, atol=1e-5, msg=name)
    assert not fused.x_target.requires_grad and not fused.z_next.requires_grad
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


def test_triton_refuses_what_the_modules_cannot_fuse():
    from kdiff import CFDLoss, ClassifierFeatureLoss, DatasetOrientedLoss

    clf = _TinyClassifier()
    x_hat, x_tilde = _images(torch.device("cpu"))
    weight = torch.tensor([1.0, 0.5, 0.0, 1.0])
    for call in (
        lambda: ClassifierFeatureLoss(clf, impl="triton")(x_hat, x_tilde, weight=weight),
        lambda: DatasetOrientedLoss(impl="triton")(torch.randn(4, 5), weight=weight),
        lambda: CFDLoss(clf, impl="triton")(x_hat, x_tilde, weight=weight),
    ):
        with pytest.raises(ValueError, match="weight is not supported with impl='triton'.*impl='auto'"):
            call()
    # float64 has no kernel: the distiller says so before running any network.
    pd, _ = _distiller("triton", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="ProgressiveDistiller: impl='triton' supports input dtypes .* got float64"):
        pd(torch.rand(2, 3, 8, 8, dtype=torch.float64))


@needs_triton
def test_auto_falls_back_to_torch_for_a_weight(monkeypatch):
    """Where ``auto`` takes the kernels (CUDA), a per-sample weight takes the torch path instead."""
    from kdiff import CFDLoss

    clf = _classifier()
    x_hat, x_tilde = _images()
    weight = torch.tensor([1.0, 0.5, 0.0, 1.0], device=DEVICE)
    expected = CFDLoss(clf, beta=0.5, impl="torch")(x_hat, x_tilde, weight=weight)
    launches = _auto_takes_triton(monkeypatch)
    auto = CFDLoss(clf, beta=0.5)
    weighted = auto(x_hat, x_tilde, weight=weight)
    assert launches == []
    for name in ("loss", "feature_loss", "data_loss"):
        assert torch.equal(getattr(weighted, name), getattr(expected, name))
    assert torch.equal(torch.autograd.grad(weighted.loss, x_hat)[0], torch.autograd.grad(expected.loss, x_hat)[0])
    auto(x_hat, x_tilde)  # unweighted: both fused ops
    assert launches == ["feature_kl", "dataset_oriented"]
    pd, _ = _distiller("auto")
    pd(_randn(4, 3, 8, 8).clamp(-1, 1))
    assert launches[-1] == "pd_target"


# -------------------------------------------------------------- kernels compile for sm_90
_COMPILE_CHECK = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kdiff.ops import dataset_oriented, feature_kl, pd_target

    FLOAT_ARGS = {"tau", "grad_scale", "inv_b", "two_over_n"}
    FP32_PTRS = {"loss_ptr", "lse_ptr", "h_ptr", "part_ptr", "log_sum_ptr", "g_ls_ptr", "g_h_ptr", "coef_ptr"}

    def compile_for_h100(kernel, dtype, **constexprs):
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*fp32" if name in FP32_PTRS else "*" + dtype
            else:
                sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

    n = 0
    for dtype in ("fp32", "fp16", "bf16"):
        for single in (True, False):
            for none in (True, False):
                compile_for_h100(feature_kl._feature_kl_fwd_kernel, dtype, REDUCE_NONE=none,
                                 COMPUTE_GRAD=True, BLOCK=2048, SINGLE=single)
            compile_for_h100(feature_kl._feature_kl_bwd_kernel, dtype, BLOCK=2048, SINGLE=single)
        compile_for_h100(dataset_oriented._dataset_fwd_kernel, dtype, BLOCK_B=64, BLOCK_K=16)
        compile_for_h100(dataset_oriented._dataset_bwd_kernel, dtype, BLOCK_B=64, BLOCK_K=16)
        for kind in (0, 1, 2):
            compile_for_h100(pd_target._pd_fwd_kernel, dtype, KIND=kind, CLIP=kind == 2,
                             COMPUTE_GRAD=True, BLOCK=1024)
        n += 10
    print("compiled", n)
    """
)


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter is lenient about types; compile every kernel to sm_90 machine code too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 30" in proc.stdout
