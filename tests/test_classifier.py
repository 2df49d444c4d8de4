"""FrozenClassifier and ClassifierTransform: hook lifetime, one input transform, checks up front."""

from __future__ import annotations

import copy
import gc
import io
import json
import weakref

import pytest
import torch
from hypothesis import given
from torch import nn

from kdiff import CFDLoss, ClassifierFeatureLoss, ClassifierTransform, FrozenClassifier
from kdiff.eval import ClassifierFeatureExtractor
from kdiff.functional import feature_kl_loss
from kdiff.models import ResNet18

from strategies import tensors


def backbone() -> nn.Sequential:
    """The docs' pattern: a logits-only classifier whose layer "3" holds the pooled features."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    )


class Probe:
    """Keeps weak references to every output of a layer: alive ones are held by someone."""

    def __init__(self, layer: nn.Module) -> None:
        self.refs: list[weakref.ref] = []
        self.handle = layer.register_forward_hook(lambda m, a, out: self.refs.append(weakref.ref(out)))

    def alive(self) -> int:
        gc.collect()
        return sum(r() is not None for r in self.refs)


class Recorder(nn.Module):
    """Returns (logits, features) and remembers what it was fed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        f = self.conv(x).mean((2, 3))
        return f, f


# ------------------------------------------------------------------------------- hook lifetime
def test_direct_calls_of_the_classifier_capture_nothing():
    net = backbone()
    wrappers = [FrozenClassifier(net, feature_layer="3"), ClassifierFeatureLoss(net, feature_layer="3"),
                CFDLoss(net, feature_layer="3")]
    probe = Probe(net[3])
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for _ in range(100):
        net(x).sum().backward()
    assert len(probe.refs) == 100
    assert probe.alive() == 0  # no wrapper kept any of the 100 feature tensors
    # The wrappers still work afterwards and read the right layer.
    logits, feats = wrappers[0](x)
    torch.testing.assert_close(feats, net[:4](((x + 1) / 2).clamp(0, 1)))


def test_two_wrappers_on_one_backbone_keep_memory_flat_over_200_steps():
    net = backbone()
    feature_loss = ClassifierFeatureLoss(net, feature_layer="3", temperature=0.95)
    cfd = CFDLoss(net, feature_layer="3", temperature=0.95, beta=0.003, gamma=0.75)
    probe = Probe(net[3])
    student = nn.Conv2d(3, 3, 3, padding=1)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    alive = {}
    for step in range(200):
        x_hat = student(torch.randn(4, 3, 6, 6, generator=g))
        if step == 0:
            first_x_hat = weakref.ref(x_hat)
        terms = cfd(x_hat, torch.randn(4, 3, 6, 6, generator=g))
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        if step in (19, 199):
            alive[step] = probe.alive()
    del x_hat, terms
    assert len(probe.refs) == 400  # two classifier passes per step
    assert alive[19] == alive[199] <= 2  # only the last step's features, held by the loop's own names
    assert probe.alive() == 0 and first_x_hat() is None  # no student graph kept by the other wrapper
    # Both wrappers read their own pass only: interleaved calls equal calls on separate copies.
    x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    alone = ClassifierFeatureLoss(backbone(), feature_layer="3", temperature=0.95)
    torch.testing.assert_close(cfd(x, y).feature_loss, alone(x, y))
    torch.testing.assert_close(feature_loss(x, y), alone(x, y))


def test_remove_context_manager_and_garbage_collection_detach_the_hook():
    net = backbone()
    layer = net[3]
    clf = FrozenClassifier(net, feature_layer="3")
    assert len(layer._forward_hooks) == 1
    clf.remove()
    clf.remove()  # idempotent
    assert len(layer._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="hook was removed"):
        clf(torch.randn(1, 3, 4, 4))
    with FrozenClassifier(net, feature_layer="3") as clf2:
        assert clf2(torch.randn(1, 3, 4, 4))[1].shape == (1, 8)
        assert len(layer._forward_hooks) == 1
    assert len(layer._forward_hooks) == 0
    loss = CFDLoss(net, feature_layer="3")
    assert len(layer._forward_hooks) == 1
    del loss
    gc.collect()
    assert len(layer._forward_hooks) == 0  # a dropped wrapper does not stay hooked to the module


def test_copied_and_pickled_wrappers_attach_their_own_hook():
    net = backbone()
    pair = nn.ModuleList([CFDLoss(net, feature_layer="3"), ClassifierFeatureLoss(net, feature_layer="3")])
    copied = copy.deepcopy(pair)
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(copied[0](x, y).loss, pair[0](x, y).loss)
    torch.testing.assert_close(copied[1](x, y), pair[1](x, y))
    assert len(copied[1].classifier.classifier[3]._forward_hooks) == 2  # one per copy, none stale
    assert len(net[3]._forward_hooks) == 2
    buffer = io.BytesIO()
    torch.save(pair[0], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x, y).loss, pair[0](x, y).loss)


# ------------------------------------------------------------------------ one input transform
@given(x=tensors((2, 3, 4, 4)))
def test_same_module_sees_the_same_input_through_every_wrapper(x):
    x = x.float()
    y = torch.zeros_like(x)
    paper = ClassifierTransform(output_range=(-1, 1), clamp=False)
    for transform, expected in ((None, ((x + 1) / 2).clamp(0, 1)), (paper, x)):
        seen = []
        for wrap in (FrozenClassifier, ClassifierFeatureLoss, CFDLoss):
            module = Recorder()
            out = wrap(module, transform=transform)
            out(x) if isinstance(out, FrozenClassifier) else out(x, y)  # the student's pass is last
            seen.append(module.seen[-1])
        for s in seen:
            torch.testing.assert_close(s, expected, rtol=1e-6, atol=1e-6)
    assert paper(x) is x  # the paper's setting: raw, unbounded images


def test_transform_normalises_its_fields_and_refuses_non_finite_values():
    a = ClassifierTransform(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], size=[8, 8])
    b = ClassifierTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=(8, 8))
    assert a == b and hash(a) == hash(b)  # lists from JSON metadata compare equal to tuples
    json.dumps(a.describe())
    for kwargs, name in (
        (dict(mean=(0.5, float("nan"), 0.5), std=(1.0,) * 3), "mean"),
        (dict(mean=(0.5,) * 3, std=(1.0, float("inf"), 1.0)), "std"),
        (dict(output_range=(0.0, float("inf"))), "output_range"),
        (dict(mean=(0.5,) * 3, std=(1.0,) * 2), "mean and std"),
        (dict(size=True), "size"),
        (dict(clamp=1), "clamp"),
    ):
        with pytest.raises(ValueError, match=name):
            ClassifierTransform(**kwargs)


def test_uint8_and_float_images_go_through_the_same_function():
    tf = ClassifierTransform(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), clamp=True)
    u = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    torch.testing.assert_close(tf(u), tf(u.float() / 127.5 - 1.0))
    # clamp keeps out-of-range floats at the range's ends.
    torch.testing.assert_close(tf(torch.full((1, 3, 2, 2), 3.0)), tf(torch.ones(1, 3, 2, 2)))


def test_classifier_feature_extractor_uses_classifier_transform():
    torch.manual_seed(0)
    clf = Recorder()
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    ext = ClassifierFeatureExtractor(clf, mean=mean, std=std, feature_dim=4)
    assert ext.transform == ClassifierTransform(mean=mean, std=std, clamp=True)
    x = torch.rand(3, 3, 6, 6) * 2.4 - 1.2  # a little outside [-1, 1]: clamped
    feats = ext(x)
    torch.testing.assert_close(clf.seen[-1], ClassifierTransform(mean=mean, std=std)(x.clamp(-1, 1)))
    u = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(ext(u), ext(u.float() / 127.5 - 1))
    # A ready transform is the same thing; its description keys the reference cache.
    same = ClassifierFeatureExtractor(clf, transform=ext.transform, feature_dim=4)
    torch.testing.assert_close(same(x), feats)
    assert same.describe() == ext.describe()
    resized = ClassifierFeatureExtractor(clf, transform=ClassifierTransform(mean=mean, std=std, size=8), feature_dim=4)
    assert resized.describe()["preprocessing"] != ext.describe()["preprocessing"]
    with pytest.raises(ValueError, match="not both"):
        ClassifierFeatureExtractor(clf, mean=mean, std=std, transform=ext.transform, feature_dim=4)
    with pytest.raises(TypeError, match="ClassifierTransform"):
        ClassifierFeatureExtractor(clf, transform=lambda t: t, feature_dim=4)


# ------------------------------------------------------------------------------ up-front checks
def test_wrong_channel_count_is_named_before_the_classifier_runs():
    net = backbone()
    gray = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"images have 1 channels .* first layer '0' expects 3"):
        FrozenClassifier(net, feature_layer="3")(gray)
    with pytest.raises(ValueError, match=r"images have 1 channels .* expects 3"):
        ClassifierFeatureLoss(net, feature_layer="3")(gray, gray)
    tf = ClassifierTransform(mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=r"images must have 3 channels .*got 1"):
        FrozenClassifier(lambda z: (z.mean((2, 3)), z.mean((2, 3))), transform=tf)(gray)
    # A first layer that reveals nothing (Linear) is not guessed at.
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 3))
    assert FrozenClassifier(flat, feature_layer="2")(gray)[1].shape == (2, 4)


def test_unknown_feature_layer_lists_what_helps_choose():
    net = ResNet18(num_classes=10)
    with pytest.raises(ValueError) as info:
        FrozenClassifier(net, feature_layer="avgpol")
    message = str(info.value)
    assert "did you mean 'pool'" in message
    assert "'fc'" in message and "'layer4'" in message  # top-level children, not the first 12 names
    assert "pool (AdaptiveAvgPool2d)" in message
    assert all(p.requires_grad for p in net.parameters())  # refused before freezing anything
    with pytest.raises(ValueError, match=r"3 \(Flatten\)"):
        FrozenClassifier(backbone(), feature_layer="flatten")


def test_options_of_a_frozen_classifier_are_not_accepted_twice():
    net = backbone()
    frozen = FrozenClassifier(net, feature_layer="3")
    tf = ClassifierTransform(output_range=(-1, 1))
    for make in (ClassifierFeatureLoss, CFDLoss):
        with pytest.raises(ValueError, match="transform must be None when classifier is a FrozenClassifier"):
            make(frozen, transform=tf)
        with pytest.raises(ValueError, match="feature_layer must be None when classifier is a FrozenClassifier"):
            make(frozen, feature_layer="2")
        loss = make(frozen)
        assert frozen in loss.modules() and sum(isinstance(m, FrozenClassifier) for m in loss.modules()) == 1
        with pytest.raises(TypeError):
            make(net, mean=(0.5,) * 3)  # normalisation belongs to the transform


def test_wrapper_leaves_the_module_as_given_and_runs_it_in_eval_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    net[2].eval()  # a sub-module the owner keeps in eval mode stays so
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    loss = CFDLoss(net, feature_layer="4", beta=0.5)
    x_hat = torch.rand(6, 3, 8, 8, requires_grad=True) * 2 - 1
    x_hat.retain_grad()
    loss(x_hat, torch.rand(6, 3, 8, 8) * 2 - 1).loss.backward()
    # Gradients reach the images, never the weights; the module's flags are as given.
    assert x_hat.grad is not None and float(x_hat.grad.abs().sum()) > 0
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert [m.training for m in net.modules()] == modes
    # It ran in eval mode: running statistics unchanged, no dropout (the same output twice).
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    clf = loss.feature_loss.classifier
    net.train()  # the owner switches dropout on too: the wrapper's pass still has none
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    reference = copy.deepcopy(net).eval()((x + 1) / 2)
    torch.testing.assert_close(clf(x)[0], reference)
    torch.testing.assert_close(clf(x)[0], reference)
    # .train()/.eval() on the wrapper or a parent leave the classifier's mode alone.
    loss.eval()
    assert net.training and not loss.training and not clf.training
    loss.train()
    assert loss.training and all(m.training for m in net.modules())
    # Parameters that do not require grad are used directly; the result is the same.
    frozen = copy.deepcopy(net).requires_grad_(False)
    torch.testing.assert_close(FrozenClassifier(frozen, feature_layer="4")(x)[1], clf(x)[1])
    # Restored even when the forward fails.
    with pytest.raises(ValueError, match="channels"):
        clf(torch.zeros(2, 1, 8, 8))
    assert [m.training for m in net.modules()] == [True] * len(modes)
    doc = FrozenClassifier.__doc__
    assert "leaves your module as you gave it" in doc and "eval mode" in doc


def test_spatial_features_are_global_average_pooled():
    net = backbone()
    x = torch.randn(3, 3, 5, 5)
    feats = FrozenClassifier(net, feature_layer="1")(x)[1]  # the ReLU's [B, 8, 5, 5] output
    torch.testing.assert_close(feats, net[:2](((x + 1) / 2).clamp(0, 1)).mean((2, 3)))


@pytest.mark.slow
def test_feature_layer_loss_compiles_fullgraph():
    net = backbone()
    loss_fn = ClassifierFeatureLoss(net, feature_layer="1", temperature=0.9)  # spatial layer: pooled
    compiled = torch.compile(loss_fn, fullgraph=True)
    x_hat = torch.randn(4, 3, 6, 6, requires_grad=True)
    x_tilde = torch.randn(4, 3, 6, 6)
    loss = compiled(x_hat, x_tilde)
    (grad,) = torch.autograd.grad(loss, x_hat)
    expected = loss_fn(x_hat, x_tilde)
    (expected_grad,) = torch.autograd.grad(expected, x_hat)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    f = lambda z: net[:2](((z + 1) / 2).clamp(0, 1)).mean((2, 3))  # noqa: E731
    torch.testing.assert_close(expected, feature_kl_loss(f(x_hat), f(x_tilde), temperature=0.9))
    probe = Probe(net[1])
    net(x_hat)  # a direct call after compiled ones records nothing in the wrapper
    assert probe.alive() == 0


# ------------------------------------------------------------------- the bound on the input range
def test_bound_keeps_inside_gradients_exact_and_zeroes_outside_ones():
    """The default transform clamps both images to [-1, 1]: inside, values and gradients are those
    of the unbounded loss on the clamped images, bit for bit; outside, the gradient is 0."""
    torch.manual_seed(0)
    net = backbone().double()
    bounded = ClassifierFeatureLoss(net, feature_layer="3", temperature=0.9)
    unbounded = ClassifierFeatureLoss(net, feature_layer="3", temperature=0.9,
                                      transform=ClassifierTransform(clamp=False))
    x_hat = (torch.randn(4, 3, 6, 6, dtype=torch.float64) * 2).requires_grad_(True)
    x_tilde = torch.randn(4, 3, 6, 6, dtype=torch.float64) * 2
    inside = x_hat.detach().abs() <= 1
    assert 0.2 < float(inside.double().mean()) < 0.8  # both kinds of pixel are present
    (grad,) = torch.autograd.grad(bounded(x_hat, x_tilde), x_hat)
    clamped = x_hat.detach().clamp(-1, 1).requires_grad_(True)
    value = unbounded(clamped, x_tilde.clamp(-1, 1))  # the target is bounded as well
    (reference,) = torch.autograd.grad(value, clamped)
    assert torch.equal(bounded(x_hat, x_tilde), value)
    assert torch.equal(grad[inside], reference[inside])
    assert bool((grad[~inside] == 0).all()) and bool((grad[inside] != 0).any())
    # The bound has one owner, the transform: without it the loss feeds the raw images.
    assert not torch.equal(unbounded(x_hat, x_tilde), value)
    seen = Recorder()
    ClassifierFeatureLoss(seen, transform=ClassifierTransform(clamp=False))(x_hat.float(), x_tilde.float())
    torch.testing.assert_close(seen.seen[-1], (x_hat.detach().float() + 1) / 2)
    assert float(seen.seen[-1].max()) > 1
    assert ClassifierTransform().describe()["clamp"] is True


# ------------------------------------------------------------------------- any classifier
class TorchvisionLike(nn.Module):
    """torchvision's ResNet layout: ``avgpool`` ([B, C, 1, 1]) then ``flatten`` in forward, then ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.avgpool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


class TimmLike(nn.Module):
    """timm's API: ``forward_features`` (unpooled), ``forward_head(x, pre_logits=False)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head_drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward_features(self, x):
        return torch.relu(self.norm(self.stem(x)))

    def forward_head(self, x, pre_logits: bool = False):
        x = self.head_drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_torchvision_style_classifier_reads_the_pooled_input_of_fc():
    torch.manual_seed(0)
    net = TorchvisionLike()
    x = torch.rand(3, 3, 6, 6) * 2 - 1
    logits, feats = FrozenClassifier(net, feature_layer="avgpool")(x)
    reference = copy.deepcopy(net).eval()
    inputs = []
    reference.fc.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    torch.testing.assert_close(logits, reference((x + 1) / 2))
    torch.testing.assert_close(feats, inputs[-1])  # [B, 8, 1, 1] pooled to [B, 8]: fc's input
    assert feats.shape == (3, 8)


def test_timm_style_classifier_gives_pre_logits_features_and_gradients_to_the_images_only():
    torch.manual_seed(0)
    net = TimmLike()  # train mode, trainable: as a user may pass it
    clf = FrozenClassifier(net, features="timm")
    x = (torch.rand(4, 3, 6, 6) * 2 - 1).requires_grad_(True)
    logits, feats = clf(x)
    reference = copy.deepcopy(net).eval()
    h = reference.forward_features((x.detach() + 1) / 2)
    torch.testing.assert_close(feats, reference.forward_head(h, pre_logits=True))
    torch.testing.assert_close(logits, reference((x.detach() + 1) / 2))
    (logits.sum() + feats.sum()).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert net.training and net.head_drop.training  # modes as given; the call ran without dropout
    loss = CFDLoss(net, features="timm", beta=0.1)
    assert bool(torch.isfinite(loss(x, torch.zeros_like(x)).loss))
    with pytest.raises(TypeError, match="forward_features"):
        FrozenClassifier(backbone(), features="timm")

    class NoPreLogits(TimmLike):
        def forward_head(self, x):  # type: ignore[override]
            return self.fc(x.mean((2, 3)))

    with pytest.raises(TypeError, match="pre_logits"):
        FrozenClassifier(NoPreLogits(), features="timm")


def test_logits_only_classifier_uses_its_logits_when_told_so():
    torch.manual_seed(0)
    net = backbone()
    x = torch.rand(3, 3, 6, 6) * 2 - 1
    logits, feats = FrozenClassifier(net, features="logits")(x)
    torch.testing.assert_close(logits, net((x + 1) / 2))
    assert feats is logits
    loss = ClassifierFeatureLoss(net, features="logits", temperature=0.9)
    y = torch.rand(3, 3, 6, 6) * 2 - 1
    torch.testing.assert_close(loss(x, y), feature_kl_loss(net((x + 1) / 2), net((y + 1) / 2), temperature=0.9))
    # A logits-only module without either option is refused with the ways out named.
    with pytest.raises(TypeError, match="feature_layer=.*features='timm'.*features='logits'"):
        FrozenClassifier(net)(x)
    with pytest.raises(ValueError, match="features must be None, 'timm' or 'logits'; got 'pool'"):
        FrozenClassifier(net, features="pool")
    with pytest.raises(ValueError, match="feature_layer or features, not both"):
        FrozenClassifier(net, feature_layer="3", features="logits")
    with pytest.raises(ValueError, match="features must be None when classifier is a FrozenClassifier"):
        CFDLoss(FrozenClassifier(net, features="logits"), features="logits")
    # A plain callable can give its logits too.
    fn_logits, fn_feats = FrozenClassifier(lambda z: z.mean((2, 3)), features="logits")(x)
    assert fn_feats is fn_logits and fn_logits.shape == (3, 3)


@pytest.mark.slow
def test_timm_features_in_train_mode_compile_fullgraph():
    """Eval mode for the call and detached trainable weights trace into one graph."""
    torch.manual_seed(0)
    net = TimmLike()
    loss_fn = CFDLoss(net, features="timm", beta=0.1)
    x_hat = (torch.rand(4, 3, 6, 6) * 2 - 1).requires_grad_(True)
    x_tilde = torch.rand(4, 3, 6, 6) * 2 - 1
    weight = torch.tensor([1.0, 0.0, 0.5, 1.0])
    compiled = torch.compile(lambda a, b, w: loss_fn(a, b, weight=w).loss, fullgraph=True)
    loss = compiled(x_hat, x_tilde, weight)
    (grad,) = torch.autograd.grad(loss, x_hat)
    expected = loss_fn(x_hat, x_tilde, weight=weight).loss
    (expected_grad,) = torch.autograd.grad(expected, x_hat)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())
