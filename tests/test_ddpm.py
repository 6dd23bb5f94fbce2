"""axf.DDPM: the schedules and samplers of §4.3 (Eq. 6-12, 15) against diffusers and against exact math.

The diffusers numbers come from tests/fixtures/ddpm_reference.pt (written by make_ddpm_fixtures.py);
diffusers is not needed to run these tests.
"""
from pathlib import Path

import pytest
import torch

import axf

REF = torch.load(Path(__file__).parent / "fixtures" / "ddpm_reference.pt")
SCHEDULES = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (0.0001, 0.02)}


def make(name):
    return axf.DDPM(1000, name, *SCHEDULES[name])


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_diffusers(name):
    """Checkpoints trained with the reference schedulers must see the same betas and ᾱ here."""
    ddpm, ref = make(name), REF["schedules"][name]
    assert ddpm.betas.dtype == ddpm.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(ddpm.betas, ref["betas"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ddpm.alphas_cumprod, ref["alphas_cumprod"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULES)
def test_ddpm_step_matches_diffusers(name):
    """The ancestral step with the posterior variance is DDPMScheduler's (fixed_small, unclipped), noise given."""
    ddpm, ref = make(name), REF["schedules"][name]
    eps, x_t = REF["eps"].float(), REF["x_t"].float()
    for case in ref["ddpm_steps"]:
        t = torch.full((x_t.shape[0],), case["t"])
        out = ddpm.step(eps, t, x_t, noise=case["noise"].float())
        torch.testing.assert_close(out, case["prev"].float(), rtol=1e-5, atol=1e-5, msg=f"t={case['t']}")


@pytest.mark.parametrize("name", SCHEDULES)
def test_ddim_step_matches_diffusers(name):
    """The DDIM step is DDIMScheduler's (set_alpha_to_one) for eta 0 and 0.5; its timesteps are diffusers' too."""
    ddpm, ref = make(name), REF["schedules"][name]
    eps, x_t = REF["eps"].float(), REF["x_t"].float()
    for case in ref["ddim_steps"]:
        t = torch.full((x_t.shape[0],), case["t"])
        t_prev = torch.full((x_t.shape[0],), case["t_prev"])
        out = ddpm.ddim_step(eps, t, t_prev, x_t, eta=case["eta"], noise=case["noise"].float())
        torch.testing.assert_close(out, case["prev"].float(), rtol=1e-5, atol=1e-5, msg=f"t={case['t']} eta={case['eta']}")
    assert torch.equal(ddpm.ddim_timesteps(50), ref["ddim_timesteps_50"].long())


def test_unknown_schedule_is_an_error():
    """A typo in the config must fail loudly, not fall back to some schedule."""
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        axf.DDPM(schedule="cosin")


def test_q_sample_uses_one_timestep_per_sample():
    """Eq. (10) per sample: each row of the batch is noised with its own ᾱ_t (never one t for the batch)."""
    ddpm = axf.DDPM()
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    out = ddpm.q_sample(x0, t, noise)
    for i in range(3):
        a = ddpm.alphas_cumprod[t[i]]
        torch.testing.assert_close(out[i], a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i])
    with pytest.raises(ValueError, match="shape"):
        ddpm.q_sample(x0, torch.tensor(5), noise)  # a shared scalar t is refused


def test_step_adds_no_noise_at_t0_and_inverts_q_sample_exactly():
    """At t = 0 the step returns x̂_0 deterministically; with the true ε, DDIM to t_prev = -1 recovers x_0."""
    ddpm = axf.DDPM(schedule="cosine")
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t0 = torch.zeros(2, dtype=torch.long)
    x1 = ddpm.q_sample(x0, t0, eps)
    assert torch.equal(ddpm.step(eps, t0, x1, noise=torch.randn_like(x1)), ddpm.step(eps, t0, x1))
    torch.testing.assert_close(ddpm.step(eps, t0, x1), x0, rtol=1e-5, atol=1e-5)
    t = torch.tensor([700, 300])
    torch.testing.assert_close(ddpm.ddim_step(eps, t, torch.full((2,), -1), ddpm.q_sample(x0, t, eps)), x0,
                               rtol=1e-4, atol=1e-4)


def gaussian_eps(ddpm, x, t, mu, sigma):
    """The exact ε-predictor for data x_0 ~ N(mu, sigma²): E[ε | x_t] under x_t ~ N(√ᾱ mu, ᾱ sigma² + 1 - ᾱ)."""
    a = ddpm.alphas_cumprod[t].view(-1, 1)
    return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sigma ** 2 + 1 - a)


MU, SIGMA, N = 0.7, 0.3, 20_000
# standard errors at N = 20,000: 0.002 for the mean, 0.0015 for the std; the tolerances allow ~4 of them
TOL = 0.008


def test_ddpm_sampling_recovers_a_gaussian():
    """1000 ancestral steps with the exact ε must turn N(0, 1) noise into the data distribution N(mu, sigma²)."""
    torch.manual_seed(0)
    ddpm = axf.DDPM()
    x = torch.randn(N, 1)
    for step in reversed(range(ddpm.num_steps)):
        t = torch.full((N,), step)
        x = ddpm.step(gaussian_eps(ddpm, x, t, MU, SIGMA), t, x)
    assert abs(x.mean().item() - MU) < TOL and abs(x.std().item() - SIGMA) < TOL, (x.mean(), x.std())


def test_ddim_with_eta_1_on_every_step_is_the_ddpm_step():
    """DDIM's σ_t at eta = 1 and t_prev = t - 1 is the posterior std β̃_t: the two samplers must coincide."""
    ddpm = axf.DDPM(schedule="cosine")
    eps, x_t, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([999, 400, 1])
    torch.testing.assert_close(ddpm.ddim_step(eps, t, t - 1, x_t, eta=1.0, noise=z), ddpm.step(eps, t, x_t, noise=z),
                               rtol=1e-4, atol=1e-4)


def ddim_chain_moments(alphas_cumprod, steps, eta, mu, sigma):
    """Mean and std that DDIM with the exact ε gives for N(mu, sigma²) data, computed in closed form (float64).

    Each step is affine in x_t: x_prev = √ᾱ' mu + c (x_t - √ᾱ mu) + s z, so the moments follow a recursion.
    With few steps c is a little too small (Cauchy-Schwarz), so 50-step DDIM shrinks the std: a property of
    the discretisation, not a bug, which is why the test compares to this and not to sigma itself.
    """
    m, var = 0.0, 1.0  # the sampler starts from N(0, 1)
    for i, t in enumerate(steps):
        a = alphas_cumprod[t].item()
        ap = alphas_cumprod[steps[i + 1]].item() if i + 1 < len(steps) else 1.0
        s2 = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
        v = a * sigma ** 2 + 1 - a  # the variance of the true x_t
        c = ((ap * a) ** 0.5 * sigma ** 2 + ((1 - ap - s2) * (1 - a)) ** 0.5) / v
        m, var = ap ** 0.5 * mu + c * (m - a ** 0.5 * mu), c ** 2 * var + s2
    return m, var ** 0.5


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampling_has_the_moments_of_the_exact_chain(eta):
    """50 DDIM steps (deterministic at eta 0, stochastic at eta 1) from N(0, 1) must land on the moments
    the closed-form chain predicts, and those are close to N(mu, sigma²)."""
    torch.manual_seed(1)
    ddpm = axf.DDPM(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    steps = ddpm.ddim_timesteps(50)
    assert steps[0] == 980 and steps[-1] == 0 and bool((steps[:-1] > steps[1:]).all())
    x = torch.randn(N, 1)
    for i, step in enumerate(steps.tolist()):
        t = torch.full((N,), step)
        t_prev = torch.full((N,), steps[i + 1].item() if i + 1 < len(steps) else -1)
        x = ddpm.ddim_step(gaussian_eps(ddpm, x, t, MU, SIGMA), t, t_prev, x, eta=eta)
    mean, std = ddim_chain_moments(ddpm.alphas_cumprod.double(), steps.tolist(), eta, MU, SIGMA)
    assert abs(x.mean().item() - mean) < TOL and abs(x.std().item() - std) < TOL, (x.mean(), x.std(), mean, std)
    assert abs(mean - MU) < 0.02 and abs(std - SIGMA) < 0.06  # 50 steps: std 0.275 (eta 0), 0.25 (eta 1)
