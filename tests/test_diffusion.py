"""The diffusion core against closed forms."""

import math

import pytest
import torch

from recbole_diff.diffusion import (
    SCHEDULES,
    ClassifierGuidance,
    GaussianDiffusion,
    LossAwareSampler,
    StepEmbedding,
    StepOptions,
    UniformSampler,
    classifier_free,
    make_betas,
    make_noise,
    spaced_steps,
    timestep_embedding,
)


def test_trunc_lin_matches_diffurec_values():
    betas = make_betas("trunc_lin", 32)
    assert betas[0].item() == pytest.approx(0.013125, abs=1e-9)
    assert betas[-1].item() == pytest.approx(0.635, abs=1e-9)
    abar = torch.cumprod(1 - betas, 0)
    assert 1e-7 < abar[-1].item() < 1e-5


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_is_a_valid_noise_process(name):
    betas = make_betas(name, 50)
    assert betas.shape == (50,) and betas.dtype == torch.float64
    assert bool(((betas > 0) & (betas < 1)).all())
    abar = torch.cumprod(1 - betas, 0)
    assert bool((abar[1:] < abar[:-1]).all())


def test_linear_var_noise_is_linear_like_diffrec():
    betas = make_betas("linear-var", 20, noise_scale=1.0, noise_min=5e-4, noise_max=5e-3)
    one_minus_abar = 1 - torch.cumprod(1 - betas, 0)
    assert torch.allclose(one_minus_abar, torch.linspace(5e-4, 5e-3, 20, dtype=torch.float64), atol=1e-12)


def test_linear_rescales_to_ddpm_at_1000_steps():
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_unknown_schedule_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="trunc_lin"):
        make_betas("exponential", 10)


def test_q_sample_moments():
    torch.manual_seed(0)
    diff = GaussianDiffusion("linear", 100)
    x0 = torch.tensor([1.5, -2.0, 0.3])
    t = torch.full((200_000,), 40)
    xt = diff.q_sample(x0.expand(200_000, 3), t)
    abar = torch.cumprod(1 - make_betas("linear", 100), 0)[40].item()
    assert torch.allclose(xt.mean(0), math.sqrt(abar) * x0, atol=0.01)
    assert torch.allclose(xt.var(0), torch.full((3,), 1 - abar), atol=0.01)


def test_q_sample_from_composes_with_q_sample():
    diff = GaussianDiffusion("cosine", 50)
    x0 = torch.randn(4, 6)
    s, t = torch.full((4,), 10), torch.full((4,), 30)
    zero = torch.zeros_like(x0)
    # Without noise the mean of x_t reached through x_s equals the direct one.
    via = diff.q_sample_from(diff.q_sample(x0, s, zero), s, t, zero)
    assert torch.allclose(via, diff.q_sample(x0, t, zero), atol=1e-6)


@pytest.mark.parametrize("t_value", [1, 7, 19])
def test_posterior_of_known_x0_matches_gaussian_conditioning(t_value):
    """q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0, computed independently."""
    diff = GaussianDiffusion("trunc_lin", 20)
    betas = make_betas("trunc_lin", 20)
    abar = torch.cumprod(1 - betas, 0)
    x0, xt = torch.tensor([[0.7, -1.2]]), torch.tensor([[0.1, 0.4]])
    a_prev, s2_prev = abar[t_value - 1].sqrt(), 1 - abar[t_value - 1]
    alpha, beta = 1 - betas[t_value], betas[t_value]
    cov = alpha.sqrt() * s2_prev
    var_t = alpha * s2_prev + beta
    mean_ref = a_prev * x0.double() + cov / var_t * (xt.double() - alpha.sqrt() * a_prev * x0.double())
    var_ref = s2_prev - cov**2 / var_t
    mean, var = diff.q_posterior_mean_variance(x0, xt, torch.tensor([t_value]))
    assert torch.allclose(mean.double(), mean_ref, atol=1e-5)
    assert var.item() == pytest.approx(var_ref.item(), rel=1e-4)


def test_x0_and_eps_parameterisations_agree():
    diff = GaussianDiffusion("linear", 100, parameterization="eps")
    x0, eps = torch.randn(5, 8), torch.randn(5, 8)
    t = torch.randint(0, 100, (5,))
    xt = diff.q_sample(x0, t, eps)
    assert torch.allclose(diff.predict_x0_from_eps(xt, t, eps), x0, atol=1e-4)
    assert torch.allclose(diff.predict_eps_from_x0(xt, t, x0), eps, atol=1e-3)


def test_reverse_step_with_oracle_x0_is_the_posterior():
    diff = GaussianDiffusion("trunc_lin", 32, parameterization="x0", variance="fixed_small")
    x0, xt = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([5, 6, 31])
    out = diff.p_mean_variance(lambda x, tt: x0, xt, t)
    mean, var = diff.q_posterior_mean_variance(x0, xt, t)
    assert torch.allclose(out["mean"], mean, atol=1e-6) and torch.allclose(out["variance"], var, atol=1e-7)
    large = GaussianDiffusion("trunc_lin", 32, parameterization="x0", variance="fixed_large")
    assert torch.allclose(large.p_mean_variance(lambda x, tt: x0, xt, t)["variance"].flatten(), large.betas[t])


def test_last_reverse_step_adds_no_noise():
    diff = GaussianDiffusion("trunc_lin", 32, parameterization="x0")
    x0 = torch.randn(2, 3)
    t, last = torch.full((2,), 5), torch.full((2,), -1)
    for step in (
        diff.p_sample(lambda x, t: x0, torch.randn(2, 3), torch.zeros(2, dtype=torch.long)),
        diff.p_sample(lambda x, t: x0, torch.randn(2, 3), t, last),
        diff.ddim_sample(lambda x, t: x0, torch.randn(2, 3), t, last, eta=1.0),
    ):
        # so a chain's last state is its last x0 prediction, which `sample` returns
        assert torch.equal(step["sample"], step["pred_x0"]) and torch.allclose(step["sample"], x0, atol=1e-6)


def test_ddim_eta1_equals_ancestral_step_by_step_and_in_distribution():
    diff = GaussianDiffusion("linear", 50, parameterization="eps", variance="fixed_small")
    m, s = 1.5, 0.5  # data ~ N(m, s^2); the exact noise predictor of that data below

    def model(x, t):
        a = diff.alphas_cumprod[t].sqrt()[:, None]
        b2 = 1 - diff.alphas_cumprod[t][:, None]
        return b2.sqrt() * (x - a * m) / (a**2 * s**2 + b2)

    # Same noise -> same step, for consecutive steps and for a respaced jump.
    x, z = torch.randn(6, 5), torch.randn(6, 5)
    for t_val, prev in [(30, 29), (30, 10), (0, -1)]:
        t, tp = torch.full((6,), t_val), torch.full((6,), prev)
        a = diff.p_sample(model, x, t, tp, noise=z)["sample"]
        d = diff.ddim_sample(model, x, t, tp, eta=1.0, noise=z)["sample"]
        assert torch.allclose(a, d, atol=1e-5)
    # Whole chains with independent noise: the same law (mean exact by the tower property; the spread of
    # fixed-small sampling is below the data's, identically for both).
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    anc = diff.sample(model, torch.randn(40_000, 2, generator=g1), generator=g1)
    ddim = diff.sample(model, torch.randn(40_000, 2, generator=g2), sampler="ddim", eta=1.0, generator=g2)
    for chain in (anc, ddim):
        assert torch.allclose(chain.mean(0), torch.full((2,), m), atol=0.015)
    assert torch.allclose(anc.std(0), ddim.std(0), atol=0.01)


def test_ddim_eta0_is_deterministic_and_recovers_an_oracle_x0():
    diff = GaussianDiffusion("linear", 1000, parameterization="x0")
    x0 = torch.randn(4, 3)
    out = diff.sample(lambda x, t: x0, torch.randn(4, 3), steps=10, sampler="ddim", eta=0.0)
    assert torch.allclose(out, x0, atol=1e-5)
    a = diff.sample(lambda x, t: 0.5 * x, torch.ones(2, 3), steps=10, sampler="ddim")
    b = diff.sample(lambda x, t: 0.5 * x, torch.ones(2, 3), steps=10, sampler="ddim")
    assert torch.equal(a, b)


def test_spaced_steps_cover_the_range_in_descending_order():
    steps = spaced_steps(1000, 50)
    assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 0 and steps == sorted(steps, reverse=True)
    with pytest.raises(ValueError):
        spaced_steps(10, 20)


def test_sampling_from_a_start_step_visits_only_earlier_steps():
    diff = GaussianDiffusion("linear-var", 20, parameterization="x0")
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return x

    diff.sample(model, torch.randn(2, 7), steps=range(5, -1, -1))
    assert seen == [5, 4, 3, 2, 1, 0]
    assert diff.reverse_schedule(4) == [19, 13, 6, 0] and diff.reverse_schedule() == list(range(19, -1, -1))
    with pytest.raises(ValueError, match="Unknown sampler 'ddpm'"):
        diff.sample(model, torch.randn(2, 7), sampler="ddpm")


def test_classifier_free_with_gamma_zero_equals_unguided():
    diff = GaussianDiffusion("linear", 100, parameterization="eps")
    w = torch.randn(3, 3)

    def model(x, t, c):
        return x @ w + c

    cond, null = torch.randn(4, 3), torch.zeros(1, 3)
    kw = dict(steps=5, sampler="ddim", options=StepOptions(model_kwargs={"c": cond}))
    x_T = torch.randn(4, 3)
    plain = diff.sample(model, x_T, generator=torch.Generator().manual_seed(0), **kw)
    guided = diff.sample(
        classifier_free(model, 0.0, {"c": null}), x_T, generator=torch.Generator().manual_seed(0), **kw
    )
    assert torch.equal(plain, guided)
    x, t = torch.randn(4, 3), torch.full((4,), 3)
    g = classifier_free(model, 2.0, {"c": null})(x, t, c=cond)
    assert torch.allclose(g, 3.0 * model(x, t, cond) - 2.0 * model(x, t, null.expand(4, 3)), atol=1e-5)


def test_classifier_guidance_pulls_towards_the_label():
    diff = GaussianDiffusion("linear", 100, parameterization="eps")
    target = torch.tensor([2.0, -1.0])
    log_p = lambda x, t: -((x - target) ** 2).sum(-1)  # noqa: E731
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x, t = torch.zeros(8, 2), torch.full((8,), 50)
    plain = diff.model_predictions(model, x, t)
    zero = diff.model_predictions(model, x, t, StepOptions(guidance=(ClassifierGuidance(log_p, 0.0),)))
    assert torch.equal(plain["pred_x0"], zero["pred_x0"])
    guided = diff.model_predictions(model, x, t, StepOptions(guidance=(ClassifierGuidance(log_p, 1.0),)))
    step = guided["pred_x0"] - plain["pred_x0"]
    assert bool(((step * (target - plain["pred_x0"])).sum(-1) > 0).all())
    assert torch.allclose(step / step.norm(dim=-1, keepdim=True), (target / target.norm()).expand(8, 2), atol=1e-5)


@pytest.mark.parametrize(
    "mode,mean,var,dim_corr",
    [
        ("none", 0.0, 1.0, 0.0),
        ("constant", 0.1, 1.0, 0.0),
        ("random", 0.0, 1.01, 0.01 / 1.01),
        ("iid", 0.0, 1.01, 0.0),
    ],
)
def test_offset_noise_modes_have_their_intended_moments(mode, mean, var, dim_corr):
    g = torch.Generator().manual_seed(0)
    eps = make_noise((200_000, 2), "cpu", mode=mode, scale=0.1, constant=1.0, generator=g)
    assert eps.mean().item() == pytest.approx(mean, abs=0.006)
    assert eps.var().item() == pytest.approx(var, abs=0.012)
    corr = torch.corrcoef(eps.T)[0, 1].item()
    assert corr == pytest.approx(dim_corr, abs=0.006)


def test_uniform_sampler_weights_are_one():
    t, w = UniformSampler(10).sample(1000, "cpu")
    assert t.min() >= 0 and t.max() <= 9 and torch.equal(w, torch.ones(1000))


def test_loss_aware_sampler_ring_buffer_matches_a_naive_history():
    torch.manual_seed(0)
    sampler = LossAwareSampler(5, history=3)
    naive = {k: [] for k in range(5)}
    for _ in range(7):
        t = torch.randint(0, 5, (11,))
        losses = torch.rand(11)
        sampler.update(t, losses)
        for tt, loss in zip(t.tolist(), losses.tolist()):
            naive[tt].append(loss)
    for k in range(5):
        expected = sorted(naive[k][-3:])
        assert sorted(sampler.loss_history[k].tolist()) == pytest.approx(expected)
        assert sampler.loss_count[k].item() == len(naive[k])


def test_loss_aware_sampler_prefers_high_loss_steps_and_stays_unbiased():
    sampler = LossAwareSampler(4, history=2, uniform_prob=0.0)
    t, w = sampler.sample(100, "cpu")
    assert torch.equal(w, torch.ones(100))  # uniform until warmed up
    sampler.update(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0, 9.0]))
    assert sampler.warmed_up()
    p = sampler.probabilities()
    assert p[3] == pytest.approx(0.75) and p.sum().item() == pytest.approx(1.0)
    t, w = sampler.sample(50_000, "cpu", generator=torch.Generator().manual_seed(0))
    # E[w * f(t)] over p equals the uniform mean of f.
    f = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert (w * f[t]).mean().item() == pytest.approx(f.mean().item(), rel=0.03)


def test_timestep_embedding_and_step_mlp():
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0, :4], torch.ones(4)) and torch.allclose(emb[0, 4:], torch.zeros(4))
    assert timestep_embedding(torch.tensor([1, 2]), 7).shape == (2, 7)
    mlp = StepEmbedding(8, t_scale=1000 / 32)
    assert mlp(torch.tensor([0, 31])).shape == (2, 8)


def test_schedule_buffers_are_saved_and_follow_the_module():
    diff = GaussianDiffusion("trunc_lin", 32, parameterization="x0")
    state = diff.state_dict()
    assert "alphas_cumprod" in state and state["betas"].dtype == torch.float32
    diff = diff.to(torch.float64)
    assert diff.posterior_mean_coef1.dtype == torch.float64
