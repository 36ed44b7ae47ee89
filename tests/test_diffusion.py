"""Objectives match diffusers' scheduler math; timestep sampling; CFG dropout; sampler schedulers."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from lvd.diffusion import (
    SAMPLERS,
    DiffusionConfig,
    DiffusionObjective,
    ddpm_scheduler,
    diffusion_config_from_scheduler,
    flow_scheduler,
    flow_shift_mu,
    make_sampling_scheduler,
    sample_flow_sigmas,
    scheduler_config,
    training_loss,
)
from lvd.text_embeddings import TextEmbeddings


class Recorder(torch.nn.Module):
    """A stand-in denoiser that records its inputs and returns a learnable constant."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, timestep, text_states, text_mask, text_pooled):
        self.calls.append(dict(x=x, timestep=timestep, states=text_states, mask=text_mask, pooled=text_pooled))
        return torch.zeros_like(x) + self.bias


def _text(b, L=6, d=8):
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[:, 4:] = False
    return TextEmbeddings(torch.randn(b, L, d), mask, torch.randn(b, d))


def _uncond(L=6, d=8):
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[:, :2] = True
    return TextEmbeddings(torch.full((1, L, d), 7.0), mask, torch.full((1, d), 7.0))


def test_flow_noising_and_target_match_flow_match_scheduler():
    """x_t = scale_noise(x0, 1000σ, ε) and an Euler step with the target velocity lands on x0 at σ = 0."""
    cfg = DiffusionConfig(objective="flow", cfg_dropout=0.0)
    model = Recorder()
    x0 = torch.randn(3, 4, 2, 4, 4)
    g = torch.Generator().manual_seed(1)
    loss, metrics = training_loss(model, x0, _text(3), cfg, generator=g)
    call = model.calls[0]
    sigma = call["timestep"] / 1000
    g = torch.Generator().manual_seed(1)
    # same draws: noise first, then σ (the order training_loss uses)
    noise = torch.randn(x0.shape, generator=g)
    sched = flow_scheduler(cfg)
    sched.set_timesteps(sigmas=sigma.tolist())  # a schedule through exactly our σ (shift 1)
    for i in range(3):
        expected = sched.scale_noise(x0[i : i + 1], sched.timesteps[i : i + 1], noise[i : i + 1])
        torch.testing.assert_close(call["x"][i : i + 1], expected)
    torch.testing.assert_close(sched.timesteps, call["timestep"])
    # target = ε − x0: one Euler step from σ to 0 with that velocity recovers x0
    velocity = noise - x0
    torch.testing.assert_close(call["x"] + (0 - sigma.view(-1, 1, 1, 1, 1)) * velocity, x0)
    torch.testing.assert_close(loss, (velocity**2).mean())
    assert set(metrics) == {"loss", "sigma", "cfg_dropped"}


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_eps_and_v_targets_match_ddpm_scheduler(objective):
    cfg = DiffusionConfig(objective=objective, cfg_dropout=0.0)
    sched = ddpm_scheduler(cfg)
    assert sched.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[objective]
    x0 = torch.randn(4, 4, 2, 4, 4)
    model = Recorder()
    g = torch.Generator().manual_seed(3)
    loss, _ = training_loss(model, x0, _text(4), cfg, generator=g)
    call = model.calls[0]
    t = call["timestep"].long()
    assert torch.equal(call["timestep"], t.float()) and (t >= 0).all() and (t < 1000).all()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(call["x"], ab.sqrt() * x0 + (1 - ab).sqrt() * noise)  # q(x_t | x0)
    target = noise if objective == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0  # v = αε − σx0
    torch.testing.assert_close(loss, (target**2).mean())


def test_zero_terminal_snr_reaches_zero_and_needs_v():
    sched = ddpm_scheduler(DiffusionConfig(objective="v", zero_terminal_snr=True))
    assert sched.alphas_cumprod[-1] < 1e-6
    with pytest.raises(ValueError, match="zero_terminal_snr needs objective 'v'"):
        DiffusionConfig(objective="eps", zero_terminal_snr=True)


def test_logit_normal_sigmas_in_range_and_shift_moves_them_up():
    cfg = DiffusionConfig()
    g = torch.Generator().manual_seed(0)
    s = sample_flow_sigmas(cfg, 20000, generator=g)
    assert ((s > 0) & (s < 1)).all()
    assert abs(s.median().item() - 0.5) < 0.02  # logit-normal(0, 1) is symmetric about 1/2
    assert s.std() < 0.25  # more mass in the middle than U(0, 1) (std 0.289)
    shifted = sample_flow_sigmas(DiffusionConfig(shift=3.0), 20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))  # SD3's shift, same draws
    # the shift equals the scheduler's own time_shift at μ = ln(shift)
    torch.testing.assert_close(shifted, flow_scheduler(cfg).time_shift(math.log(3.0), 1.0, s))


def test_dynamic_shift_grows_with_token_count():
    cfg = DiffusionConfig(dynamic_shift=True)
    assert flow_shift_mu(cfg, 256) == pytest.approx(0.5) and flow_shift_mu(cfg, 4096) == pytest.approx(1.15)
    small = sample_flow_sigmas(cfg, 1000, seq_len=256, generator=torch.Generator().manual_seed(0))
    large = sample_flow_sigmas(cfg, 1000, seq_len=13 * 32 * 32, generator=torch.Generator().manual_seed(0))
    assert (large > small).all()
    with pytest.raises(ValueError, match="seq_len"):
        flow_shift_mu(cfg)


def test_cfg_dropout_substitutes_the_empty_prompt_embedding():
    cfg = DiffusionConfig(cfg_dropout=0.5)
    model = Recorder()
    text = _text(64)
    _, metrics = training_loss(model, torch.randn(64, 4, 1, 2, 2), text, cfg, uncond=_uncond(),
                               generator=torch.Generator().manual_seed(0))
    call = model.calls[0]
    dropped = (call["pooled"] == 7.0).all(-1)
    assert 10 < dropped.sum() < 54 and metrics["cfg_dropped"] == dropped.float().mean()
    assert (call["states"][dropped] == 7.0).all() and (call["mask"][dropped].sum(-1) == 2).all()
    torch.testing.assert_close(call["states"][~dropped], text.states[~dropped])
    torch.testing.assert_close(call["mask"][~dropped], text.mask[~dropped])
    with pytest.raises(ValueError, match="uncond="):
        training_loss(model, torch.randn(2, 4, 1, 2, 2), text, cfg)


def test_training_loss_is_reproducible_and_differentiable():
    cfg = DiffusionConfig(cfg_dropout=0.2)
    model = Recorder()
    x0, text = torch.randn(2, 4, 1, 2, 2), _text(2)
    a, _ = training_loss(model, x0, text, cfg, uncond=_uncond(), generator=torch.Generator().manual_seed(5))
    b, _ = training_loss(model, x0, text, cfg, uncond=_uncond(), generator=torch.Generator().manual_seed(5))
    assert a == b
    a.backward()
    assert model.bias.grad is not None


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_scheduler_builds_or_is_refused(objective, sampler):
    cfg = DiffusionConfig(objective=objective)
    if objective == "flow" and sampler == "ddim":
        with pytest.raises(ValueError, match="does not fit objective 'flow'"):
            make_sampling_scheduler(sampler, cfg)
        return
    sched = make_sampling_scheduler(sampler, cfg)
    expected = {
        "euler": FlowMatchEulerDiscreteScheduler if objective == "flow" else EulerDiscreteScheduler,
        "ddim": DDIMScheduler,
        "dpm++": DPMSolverMultistepScheduler,
        "unipc": UniPCMultistepScheduler,
    }[sampler]
    assert type(sched) is expected
    if sampler != "euler" or objective != "flow":
        want = {"flow": "flow_prediction", "eps": "epsilon", "v": "v_prediction"}[objective]
        assert sched.config.prediction_type == want
    sched.set_timesteps(4)
    assert len(sched.timesteps) == 4 and float(sched.timesteps.max()) > 500  # starts at high noise
    x = torch.randn(1, 4, 1, 2, 2)
    for t in sched.timesteps:
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampling_scheduler("heun", cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        DiffusionConfig(shift=3.0),
        DiffusionConfig(dynamic_shift=True),
        DiffusionConfig(objective="eps"),
        DiffusionConfig(objective="v", zero_terminal_snr=True, beta_schedule="linear"),
    ],
)
def test_scheduler_config_records_the_objective(cfg, tmp_path):
    config = scheduler_config(cfg)
    cls = FlowMatchEulerDiscreteScheduler if cfg.objective == "flow" else DDIMScheduler
    assert config["_class_name"] == cls.__name__
    sched = cls.from_config(config)
    sched.save_config(tmp_path)
    back = diffusion_config_from_scheduler(cls.from_pretrained(tmp_path).config)
    assert back.objective == cfg.objective
    for key in ("shift", "dynamic_shift", "beta_schedule", "zero_terminal_snr"):
        assert getattr(back, key) == getattr(cfg, key)


def test_dynamic_shift_resolved_at_the_training_token_count():
    cfg = DiffusionConfig(dynamic_shift=True)
    config = scheduler_config(cfg, seq_len=4096)
    assert not config["use_dynamic_shifting"] and config["shift"] == pytest.approx(math.exp(1.15))


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
def test_objective_built_once_gives_the_losses_of_one_off_calls(objective):
    cfg = DiffusionConfig(objective=objective, cfg_dropout=0.3)
    loss_of = DiffusionObjective(cfg)
    model, x0, text = Recorder(), torch.randn(3, 4, 2, 4, 4), _text(3)
    for seed in range(3):  # the same object serves every step
        a, ma = loss_of(model, x0, text, uncond=_uncond(), generator=torch.Generator().manual_seed(seed))
        b, mb = training_loss(model, x0, text, cfg, uncond=_uncond(), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a, b) and ma.keys() == mb.keys()


def test_dynamic_shift_uses_each_batch_token_count():
    cfg = DiffusionConfig(dynamic_shift=True, cfg_dropout=0.0)
    with pytest.raises(ValueError, match="patch_size"):
        DiffusionObjective(cfg)
    loss_of = DiffusionObjective(cfg, patch_size=(1, 2, 2))
    sigmas = {}
    for shape in ((2, 4, 1, 4, 4), (2, 4, 5, 32, 32)):  # 4 and 1,280 tokens: two buckets of one run
        model = Recorder()
        loss_of(model, torch.zeros(shape), _text(2), generator=torch.Generator().manual_seed(0))
        sigmas[shape] = model.calls[0]["timestep"] / 1000
        g = torch.Generator().manual_seed(0)
        torch.randn(shape, generator=g)  # the noise is drawn first
        expected = sample_flow_sigmas(cfg, 2, seq_len=shape[2] * shape[3] * shape[4] // 4, generator=g)
        torch.testing.assert_close(sigmas[shape], expected)
    assert (sigmas[(2, 4, 5, 32, 32)] > sigmas[(2, 4, 1, 4, 4)]).all()
