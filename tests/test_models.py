"""Tests for kdiff.models (UNet denoiser and CFD classifiers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdiff.models import ResNet18, SmallCNN, UNet, UNetConfig, build_classifier
from kdiff.models.unet import AttnBlock, num_groups_for, timestep_embedding

ASSETS = Path(__file__).resolve().parents[1] / "benchmarks" / "assets" / "tiny"

DDPM_CIFAR10_PARAMS = 35.7e6


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace the (partly zero) init so outputs depend on inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny() -> UNet:
    torch.manual_seed(0)
    return _randomize(UNet(UNetConfig.tiny())).eval()


# --------------------------------------------------------------------------- UNet


def test_default_param_count_meta() -> None:
    with torch.device("meta"):
        model = UNet(UNetConfig.paper())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - DDPM_CIFAR10_PARAMS) / DDPM_CIFAR10_PARAMS < 0.01, n
    assert model.num_parameters() == n
    assert UNetConfig.paper() == UNetConfig()


def test_config_roundtrip() -> None:
    cfg = UNetConfig.tiny(num_classes=10, time_embed_scale=1000.0)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert UNetConfig.from_dict(d) == cfg
    model = UNet.from_config(d)
    assert model.config == cfg
    assert model.num_classes == 10 and model.in_channels == 3 and model.out_channels == 3
    assert UNet.from_config(cfg).config == cfg
    assert UNet(ch=32, ch_mult=(1, 2), attn_resolutions=()).config.ch == 32
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ch": 0},
        {"ch_mult": ()},
        {"num_res_blocks": 0},
        {"dropout": 1.0},
        {"num_classes": 0},
        {"image_size": 30},
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        UNetConfig(**kwargs)


def test_group_norm_fallback() -> None:
    assert num_groups_for(128) == 32
    assert num_groups_for(24) == 24
    assert num_groups_for(48) == 24
    assert num_groups_for(8) == 8
    model = UNet(UNetConfig.tiny(ch=24))
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2))
    assert out.shape == (2, 3, 32, 32)


def test_timestep_embedding() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 999.0]), 33)
    assert emb.shape == (3, 33) and emb.dtype == torch.float32
    assert torch.allclose(emb[0, :16], torch.zeros(16))
    assert torch.allclose(emb[0, 16:32], torch.ones(16))


def test_zero_init_output() -> None:
    model = UNet(UNetConfig.tiny())
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2))
    assert torch.count_nonzero(out) == 0


def test_tiny_forward_backward() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny(dropout=0.1)).train()
    z = torch.randn(8, 3, 32, 32)
    t = torch.randint(0, 1000, (8,))
    out = model(z, t)
    assert out.shape == z.shape
    loss = (out - z).square().mean()
    loss.backward()
    assert model.conv_out.weight.grad is not None
    assert torch.isfinite(model.conv_out.weight.grad).all()
    assert model.conv_out.weight.grad.abs().sum() > 0


def test_float_and_int_time(tiny: UNet) -> None:
    z = torch.randn(3, 3, 32, 32)
    a = tiny(z, torch.tensor([5, 10, 500]))
    b = tiny(z, torch.tensor([5.0, 10.0, 500.0]))
    torch.testing.assert_close(a, b)
    # time conditioning matters
    c = tiny(z, torch.tensor([6.0, 10.0, 500.0]))
    assert not torch.allclose(a[0], c[0])
    torch.testing.assert_close(a[1:], c[1:])
    # scalar t broadcasts
    torch.testing.assert_close(tiny(z, torch.tensor(7.0)), tiny(z, torch.full((3,), 7.0)))


def test_time_embed_scale() -> None:
    base = _randomize(UNet(UNetConfig.tiny()), seed=1).eval()
    scaled = UNet(UNetConfig.tiny(time_embed_scale=1000.0)).eval()
    scaled.load_state_dict(base.state_dict())
    z = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(scaled(z, t), base(z, t * 1000.0))


def test_out_channels_and_other_sizes() -> None:
    model = UNet(
        UNetConfig.tiny(in_channels=1, out_channels=2, image_size=16, attn_resolutions=(4,))
    )
    assert model(torch.randn(2, 1, 16, 16), torch.rand(2)).shape == (2, 2, 16, 16)
    # non-nominal (but divisible) resolution also works
    assert model(torch.randn(1, 1, 24, 24), torch.rand(1)).shape == (1, 2, 24, 24)


def test_class_conditional() -> None:
    model = _randomize(UNet(UNetConfig.tiny(num_classes=10))).eval()
    z = torch.randn(4, 3, 32, 32)
    t = torch.rand(4)
    y = torch.tensor([0, 1, 2, 3])
    out = model(z, t, y)
    assert out.shape == z.shape
    out2 = model(z, t, torch.tensor([9, 1, 2, 3]))
    assert not torch.allclose(out[0], out2[0])
    torch.testing.assert_close(out[1:], out2[1:])
    with pytest.raises(ValueError, match="y"):
        model(z, t)
    with pytest.raises(ValueError, match="y"):
        model(z, t, y[:3])
    with pytest.raises(ValueError, match="y"):
        model(z, t, y.float())


def test_unconditional_rejects_y(tiny: UNet) -> None:
    with pytest.raises(ValueError, match="y"):
        tiny(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("z_shape", "t_shape", "name"),
    [
        ((3, 32, 32), (3,), "z_t"),
        ((2, 4, 32, 32), (2,), "z_t"),
        ((2, 3, 30, 30), (2,), "z_t"),
        ((2, 3, 32, 32), (3,), "t"),
        ((2, 3, 32, 32), (2, 1), "t"),
    ],
)
def test_input_validation(tiny: UNet, z_shape: tuple, t_shape: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        tiny(torch.randn(*z_shape), torch.rand(*t_shape))


def test_eval_determinism(tiny: UNet) -> None:
    z = torch.randn(2, 3, 32, 32)
    t = torch.rand(2) * 1000
    torch.testing.assert_close(tiny(z, t), tiny(z, t), rtol=0, atol=0)
    # batch independence (GroupNorm is per-sample)
    torch.testing.assert_close(tiny(z[:1], t[:1]), tiny(z, t)[:1])


def test_dropout_only_in_train() -> None:
    model = _randomize(UNet(UNetConfig.tiny(dropout=0.5)))
    z, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    model.train()
    assert not torch.allclose(model(z, t), model(z, t))
    model.eval()
    torch.testing.assert_close(model(z, t), model(z, t), rtol=0, atol=0)


def test_bf16_autocast(tiny: UNet) -> None:
    z = torch.randn(2, 3, 32, 32)
    t = torch.rand(2) * 1000
    ref = tiny(z, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(z, t)
    assert out.shape == z.shape
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3


def test_bf16_autocast_conditional_backward() -> None:
    model = UNet(UNetConfig.tiny(num_classes=10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2]))
    out.float().square().mean().backward()


def test_channels_last(tiny: UNet) -> None:
    z = torch.randn(2, 3, 32, 32)
    t = torch.rand(2)
    ref = tiny(z, t)
    model = UNet(tiny.config).eval()
    model.load_state_dict(tiny.state_dict())
    model = model.to(memory_format=torch.channels_last)
    out = model(z.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_tiny(tiny: UNet) -> None:
    z = torch.randn(2, 3, 32, 32)
    t = torch.rand(2)
    compiled = torch.compile(tiny)
    torch.testing.assert_close(compiled(z, t), tiny(z, t), rtol=1e-3, atol=1e-3)


def _reshape_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """AttnBlock's forward written with reshape/transpose (the formulation before einops)."""
    b, c, h, w = x.shape
    qkv = block.qkv(block.norm(x))
    qkv = qkv.reshape(b, 3, block.num_heads, c // block.num_heads, h * w).transpose(-1, -2)
    q, k, v = qkv.unbind(1)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(-1, -2).reshape(b, c, h, w)
    return x.to(out.dtype) + block.proj_out(out)


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_attention_block_matches_reshape_formulation(num_heads: int) -> None:
    # Non-square maps and several heads: a swapped (h w) or (heads d) order would show.
    block = _randomize(AttnBlock(16, num_heads), seed=num_heads)
    x = torch.randn(3, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    out = block(x)
    assert torch.equal(out, _reshape_attention(block, x))
    assert not torch.equal(out, x)  # the attention branch contributes (proj_out is not zero)


def _unet_outputs(model: UNet, *, reference: bool, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, model.in_channels, model.config.image_size, model.config.image_size, generator=g)
    t = torch.tensor([3.0, 40.0])
    with monkeypatch.context() as m:
        if reference:
            m.setattr(AttnBlock, "forward", _reshape_attention)
        with torch.no_grad():
            return model(z, t)


def test_unet_forward_matches_reshape_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _randomize(UNet(UNetConfig.tiny(num_heads=2, attn_resolutions=(16, 8))), seed=3).eval()
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) >= 3
    new = _unet_outputs(model, reference=False, monkeypatch=monkeypatch)
    assert torch.equal(new, _unet_outputs(model, reference=True, monkeypatch=monkeypatch))


def test_bundled_teacher_gives_the_same_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("safetensors", reason="safetensors (kdiff[train]) reads the bundled checkpoint")
    from kdiff.recipes import load_unet

    model, _ = load_unet(ASSETS / "teacher.safetensors")
    model.eval()
    assert any(isinstance(m, AttnBlock) for m in model.modules())
    new = _unet_outputs(model, reference=False, monkeypatch=monkeypatch)
    assert torch.equal(new, _unet_outputs(model, reference=True, monkeypatch=monkeypatch))


# --------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize(
    ("name", "kwargs", "feature_dim"),
    [("resnet18", {}, 512), ("small_cnn", {}, 256), ("small_cnn", {"width": 16}, 64)],
)
def test_classifier_outputs(name: str, kwargs: dict, feature_dim: int) -> None:
    torch.manual_seed(0)
    model = build_classifier(name, num_classes=7, **kwargs).eval()
    assert model.feature_dim == feature_dim
    assert model.num_classes == 7
    for b in (1, 3):
        logits, feats = model(torch.randn(b, 3, 32, 32))
        assert logits.shape == (b, 7)
        assert feats.shape == (b, feature_dim)
    # features are the input to the linear head
    x = torch.randn(2, 3, 32, 32)
    logits, feats = model(x)
    torch.testing.assert_close(logits, model.fc(feats))
    # determinism in eval mode, no dropout modules anywhere
    torch.testing.assert_close(model(x)[0], logits, rtol=0, atol=0)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_resnet18_structure() -> None:
    model = ResNet18()
    n = sum(p.numel() for p in model.parameters())
    assert 11.0e6 < n < 11.4e6
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert isinstance(build_classifier("ResNet18"), ResNet18)


def test_small_cnn_size_and_training_step() -> None:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert 0.3e6 <= n <= 1.0e6
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    losses = []
    for _ in range(5):
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("cls", [ResNet18, SmallCNN])
def test_classifier_input_validation(cls: type[nn.Module]) -> None:
    model = cls().eval()
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(2, 1, 32, 32))


def test_build_classifier_errors() -> None:
    with pytest.raises(ValueError, match="resnet18") as exc:
        build_classifier("vgg")
    assert "small_cnn" in str(exc.value)
    with pytest.raises(TypeError):
        build_classifier("resnet18", width=3)
