"""diffusers interop: schedules from scheduler configs, the time mapping, refused configs, PD with a
diffusers teacher, and the exported DDIMPipeline reproducing kdiff's sampler."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

from kdiff import DiscreteSchedule, ProgressiveDistiller, ddim_sample  # noqa: E402
from kdiff.interop import (  # noqa: E402
    DiffusersModel,
    ddim_sample_kwargs,
    export_ddim_pipeline,
    from_diffusers,
    prediction_type_from_diffusers,
    schedule_from_diffusers,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


@pytest.fixture(autouse=True, scope="module")
def _quiet_diffusers():
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    yield
    diffusers.utils.logging.set_verbosity(level)
    diffusers.utils.logging.enable_progress_bar()


def tiny_unet(seed: int = 0, out_channels: int = 3) -> UNet2DModel:
    """google/ddpm-cifar10-32's block layout (attention at the second level, sinusoidal time
    embedding without flip and freq_shift 1) at a tiny width, randomly initialised."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=SIZE,
            in_channels=3,
            out_channels=out_channels,
            layers_per_block=2,
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            attention_head_dim=None,
            downsample_padding=0,
            flip_sin_to_cos=False,
            freq_shift=1,
            norm_eps=1e-6,
        ).eval()


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet()


@contextlib.contextmanager
def record_timesteps(module: torch.nn.Module):
    """Collects every timestep ``module`` is called with (a list per call) while the block runs."""
    seen: list = []

    def hook(_mod, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(torch.as_tensor(t).reshape(-1).tolist())

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def test_import_kdiff_does_not_import_diffusers():
    code = "import sys, kdiff, kdiff.interop, kdiff.interop.diffusers\nprint('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Schedules and prediction types from scheduler configs


@pytest.mark.parametrize(
    "config",
    [
        {},  # DDPM defaults: linear betas 1e-4..0.02 over 1000 steps (google/ddpm-cifar10-32)
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"num_train_timesteps": 4000, "beta_start": 2e-5, "beta_end": 0.01},
        {"num_train_timesteps": 50, "trained_betas": np.linspace(0.001, 0.2, 50).tolist()},
    ],
)
def test_schedule_matches_diffusers_alphas_cumprod(config):
    scheduler = DDPMScheduler(**config)
    schedule = schedule_from_diffusers(scheduler)
    T = scheduler.config.num_train_timesteps
    table = schedule.alphas_cumprod
    assert schedule.num_timesteps == T and table[0] == 1.0
    # diffusers holds the table in float32; kdiff computes the same formula in float64.
    torch.testing.assert_close(table[1:], scheduler.alphas_cumprod.double(), rtol=2e-5, atol=1e-10)
    # The same from the plain config mapping (a loaded scheduler_config.json).
    reloaded = schedule_from_diffusers(json.loads(scheduler.to_json_string()))
    assert torch.equal(reloaded.alphas_cumprod, table)
    # kdiff time t is the UNet timestep t - 1, the one diffusers' add_noise uses.
    t = torch.tensor([1.0, 37.0, float(T)])
    j = schedule.model_time(t).long()
    alpha, sigma = schedule.alpha_sigma(t, dtype=torch.float64)
    x, n = torch.ones(3, 1), torch.full((3, 1), 2.0)
    torch.testing.assert_close(
        scheduler.add_noise(x, n, j).double(), alpha[:, None] * x + sigma[:, None] * n, rtol=2e-5, atol=1e-6
    )


def test_model_passes_the_unets_own_timestep(unet):
    model, schedule, kind = from_diffusers(unet, DDPMScheduler(num_train_timesteps=1000))
    assert kind == "eps" and schedule.num_timesteps == 1000
    z = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1000.0, 1.0])
    with torch.no_grad(), record_timesteps(unet) as seen:
        out = model(z, t)
        ref = unet(z, torch.tensor([999, 0])).sample
    assert seen[0] == [999.0, 0.0]
    assert torch.equal(out, ref)


def test_prediction_type_is_read_from_the_config_never_assumed(unet):
    assert from_diffusers(unet, DDPMScheduler(prediction_type="v_prediction")).prediction_type == "v"
    assert from_diffusers(unet, DDPMScheduler(prediction_type="sample")).prediction_type == "x"
    legacy = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    assert prediction_type_from_diffusers({**legacy, "predict_epsilon": False}) == "x"
    with pytest.raises(ValueError, match=r"has no 'prediction_type'; pass prediction_type="):
        from_diffusers(unet, legacy)
    assert from_diffusers(unet, legacy, prediction_type="epsilon").prediction_type == "eps"


@pytest.mark.parametrize(
    "update,match",
    [
        ({"thresholding": True}, "thresholding=True"),
        ({"beta_schedule": "sigmoid"}, r"beta_schedule in the DDPMScheduler config must be one of 'linear'"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
        ({"prediction_type": "flow_prediction"}, r"prediction_type in the DDPMScheduler config must be one of"),
        ({"timestep_type": "continuous"}, "timestep_type='continuous'"),
        ({"trained_betas": [0.1, 0.2]}, r"trained_betas .* must hold num_train_timesteps=1000 values"),
        ({"beta_start": None}, r"has no 'beta_start'"),
        ({"num_train_timesteps": None}, r"has no 'num_train_timesteps'"),
        ({"beta_schedule": None}, r"neither 'trained_betas' nor 'beta_schedule'.*LogSNRSchedule"),
    ],
)
def test_configs_kdiff_cannot_represent_are_refused_by_key(unet, update, match):
    config = {**json.loads(DDPMScheduler().to_json_string()), **update}  # a scheduler_config.json
    with pytest.raises(ValueError, match=match):
        from_diffusers(unet, config)


def test_learned_variance_returns_the_mean_channels():
    unet6 = tiny_unet(out_channels=6)
    model = from_diffusers(unet6, DDPMScheduler(variance_type="learned_range")).model
    z = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(z, torch.tensor([10.0])), unet6(z, torch.tensor([9])).sample[:, :3])
    with pytest.raises(ValueError, match=r"out_channels=6 for in_channels=3.*variance_type='fixed_small'"):
        from_diffusers(unet6, DDPMScheduler(variance_type="fixed_small"))


# ---------------------------------------------------------------------------------------------
# Distilling a diffusers teacher


def test_pd_with_a_diffusers_eps_teacher_on_a_non_dividing_grid(unet):
    teacher, schedule, kind = from_diffusers(unet, DDPMScheduler(num_train_timesteps=1000))
    student = DiffusersModel(copy.deepcopy(unet).train(), schedule)
    # N = 6: 2N = 12 does not divide T = 1000, so the grids are round(k T / N), not uniform.
    pd = ProgressiveDistiller(teacher, student, schedule, 6, teacher_prediction=kind, student_prediction="x")
    k = torch.tensor([1, 4, 6])
    t, t_mid, t_next = schedule.pd_times(k, 6)
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with record_timesteps(unet) as seen:
        out = pd(x, t=t.float(), noise=torch.randn_like(x))
    assert out.t_mid.tolist() == t_mid.tolist() and out.t_next.tolist() == t_next.tolist()
    assert t.tolist() == [167.0, 667.0, 1000.0] and t_mid.tolist() == [83.0, 583.0, 917.0]
    # The teacher UNet ran at t - 1 and t' - 1: its own integer timesteps.
    assert seen == [(t - 1).tolist(), (t_mid - 1).tolist()]
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in student.unet.parameters() if p.requires_grad)
    assert pd.next_round().num_student_steps == 3


# ---------------------------------------------------------------------------------------------
# Exporting a student as a DDIMPipeline


def export_and_load(model, tmp_path: Path, n: int, kind: str, clip: bool) -> DDIMPipeline:
    folder = export_ddim_pipeline(model, tmp_path / f"student-{kind}-{n}-{clip}", num_steps=n,
                                  prediction_type=kind, clip_sample=clip)
    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(pipe: DDIMPipeline, n: int, *, seed: int = 0, use_clipped_model_output: bool = True):
    """Pipeline output mapped back to [-1, 1], kdiff's (with the pipeline's final clamp), the
    UNet timesteps of both runs (pipeline's first), the noise and kdiff's sampler arguments."""
    # The pipeline draws its noise with torch.randn on this generator: the same z_T for kdiff.
    noise = torch.randn((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))
    model, _, _ = from_diffusers(pipe.unet, pipe.scheduler)
    kwargs = ddim_sample_kwargs(pipe.scheduler, n, use_clipped_model_output=True)
    with record_timesteps(pipe.unet) as seen:
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=n,
                      output_type="pt", use_clipped_model_output=use_clipped_model_output).images
        out = ddim_sample(model, noise, **kwargs, clip_output=True)
    return 2 * images - 1, out, seen, noise, kwargs


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_exported_pipeline_reproduces_kdiffs_sampler(unet, tmp_path, n, clip):
    student = DiffusersModel(unet, DiscreteSchedule.linear(1000))
    pipe = export_and_load(student, tmp_path, n, "x", clip)
    pipe_images, kdiff_images, seen, noise, kwargs = run_both(pipe, n)
    # The pipeline visited exactly kdiff's timesteps (grid(N) - 1), then kdiff visited the same.
    grid = DiscreteSchedule.linear(1000).grid(n)
    expected = (grid[1:].flip(0) - 1).tolist()
    assert [s[0] for s in seen[:n]] == expected and [s[0] for s in seen[n:]] == expected
    assert kwargs["clip_x"] is clip and kwargs["prediction_type"] == "x"
    torch.testing.assert_close(kdiff_images, pipe_images, rtol=0, atol=1e-5)
    # Before the pipeline's final clamp (raw output of the scheduler loop), clipping off too.
    scheduler = pipe.scheduler
    scheduler.set_timesteps(n)
    z = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = scheduler.step(pipe.unet(z, t).sample, t, z, use_clipped_model_output=True).prev_sample
    raw = ddim_sample(student, noise, **kwargs, clip_output=False)
    torch.testing.assert_close(raw, z, rtol=1e-5, atol=1e-5)
    assert clip or float(raw.abs().max()) > 1.0  # unclipped runs leave [-1, 1]: a real test of clip off


@pytest.mark.parametrize("kind,atol", [("eps", 5e-4), ("v", 1e-5)])
@pytest.mark.parametrize("clip", [True, False])
def test_exported_eps_and_v_students(unet, tmp_path, kind, atol, clip):
    student = DiffusersModel(unet, DiscreteSchedule.linear(1000))
    pipe = export_and_load(student, tmp_path, 4, kind, clip)
    pipe_images, kdiff_images, _, _, kwargs = run_both(pipe, 4)
    assert kwargs["prediction_type"] == kind
    # eps: x_hat = (z - sigma eps_hat) / alpha with alpha_T = 0.0064 amplifies float32 rounding 200-fold.
    torch.testing.assert_close(kdiff_images, pipe_images, rtol=0, atol=atol)


def test_diffusers_default_clipping_differs_from_kdiff(unet, tmp_path):
    # diffusers' DDIM clips x_hat but, by default, keeps the network's eps_hat; kdiff recomputes
    # eps_hat from the clipped x_hat, which is use_clipped_model_output=True.
    pipe = export_and_load(DiffusersModel(unet, DiscreteSchedule.linear(1000)), tmp_path, 4, "eps", True)
    same, kdiff_images, *_ = run_both(pipe, 4, use_clipped_model_output=True)
    default, *_ = run_both(pipe, 4, use_clipped_model_output=False)
    assert float((default - kdiff_images).abs().max()) > 1e-2 > float((same - kdiff_images).abs().max())
    with pytest.raises(ValueError, match="clip_sample=True needs use_clipped_model_output=True"):
        ddim_sample_kwargs(pipe.scheduler, 4)


def test_exported_folder_layout_and_config(unet, tmp_path):
    folder = export_ddim_pipeline(DiffusersModel(unet, DiscreteSchedule.linear(1000)), tmp_path / "s",
                                  num_steps=8, prediction_type="v", clip_sample=False)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    assert (folder / "unet" / "config.json").is_file()
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler"
    assert {k: config[k] for k in ("timestep_spacing", "set_alpha_to_one", "steps_offset", "clip_sample",
                                   "prediction_type", "beta_schedule", "num_train_timesteps")} == {
        "timestep_spacing": "trailing", "set_alpha_to_one": True, "steps_offset": 0, "clip_sample": False,
        "prediction_type": "v_prediction", "beta_schedule": "linear", "num_train_timesteps": 1000,
    }
    info = json.loads((folder / "kdiff_export.json").read_text())
    assert info["num_inference_steps"] == 8 and info["use_clipped_model_output"] is True
    # Re-wrapping the export gives the student's schedule back.
    pipe = DDIMPipeline.from_pretrained(folder)
    _, schedule, kind = from_diffusers(pipe.unet, pipe.scheduler)
    assert kind == "v" and schedule.to_dict() == DiscreteSchedule.linear(1000).to_dict()


def test_trained_betas_tables_export_exactly(unet, tmp_path):
    schedule = DiscreteSchedule.from_betas(np.linspace(1e-3, 0.3, 40))
    pipe = export_and_load(DiffusersModel(unet, schedule), tmp_path, 5, "x", True)
    assert pipe.scheduler.config.trained_betas is not None
    torch.testing.assert_close(schedule_from_diffusers(pipe.scheduler).alphas_cumprod, schedule.alphas_cumprod,
                               rtol=1e-12, atol=0)
    pipe_images, kdiff_images, seen, *_ = run_both(pipe, 5)
    assert [s[0] for s in seen[:5]] == [39.0, 31.0, 23.0, 15.0, 7.0]
    torch.testing.assert_close(kdiff_images, pipe_images, rtol=0, atol=1e-5)


def test_export_refusals(unet, tmp_path):
    student = DiffusersModel(unet, DiscreteSchedule.linear(1000))
    with pytest.raises(ValueError, match=re.escape("num_inference_steps=3 must divide num_train_timesteps=1000")
                       + r".*allowed: 1, 2, 4, 5, 8, 10"):
        export_ddim_pipeline(student, tmp_path / "a", num_steps=3, prediction_type="x")
    with pytest.raises(ValueError, match="schedule must be a DDPM/diffusers table"):
        export_ddim_pipeline(unet, tmp_path / "b", num_steps=4, prediction_type="x",
                             schedule=DiscreteSchedule.cosine(1024))
    with pytest.raises(ValueError, match="schedule is required"):
        export_ddim_pipeline(unet, tmp_path / "c", num_steps=4, prediction_type="x")
    with pytest.raises(ValueError, match="DDIMPipeline needs a UNet without a learned variance"):
        export_ddim_pipeline(tiny_unet(out_channels=6), tmp_path / "d", num_steps=4, prediction_type="x",
                             schedule=DiscreteSchedule.linear(1000))
    with pytest.raises(TypeError, match="model must be a DiffusersModel or a diffusers model"):
        export_ddim_pipeline(torch.nn.Conv2d(3, 3, 1), tmp_path / "e", num_steps=4, prediction_type="x",
                             schedule=DiscreteSchedule.linear(1000))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        export_ddim_pipeline(student, tmp_path / "f", num_steps=4, prediction_type="noise")
    assert not any(tmp_path.iterdir())  # nothing was written by a refused export


@pytest.mark.parametrize(
    "update,match",
    [
        ({"timestep_spacing": "leading"}, "timestep_spacing must be 'trailing'"),
        ({"set_alpha_to_one": False}, "set_alpha_to_one must be True"),
        ({"clip_sample_range": 2.0}, "clip_sample_range must be 1.0"),
        ({"thresholding": True}, "thresholding=True"),
    ],
)
def test_ddim_sample_kwargs_refuses_other_ddim_settings(update, match):
    config = {**DDIMScheduler(timestep_spacing="trailing").config, **update}
    with pytest.raises(ValueError, match=match):
        ddim_sample_kwargs(config, 4, use_clipped_model_output=True)
    with pytest.raises(ValueError, match="must describe a DDIMScheduler; got DDPMScheduler"):
        ddim_sample_kwargs(DDPMScheduler(), 4, use_clipped_model_output=True)


def test_interop_docs_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the page's examples write their export here
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "interop.md").read_text(), re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/interop.md:block{i}", "exec"), namespace)
