"""The DDPM noise process of paper §4.3: the schedule of betas and the samplers (Eq. (6)-(12), (15)).

The forward process (Eq. (6)-(10)) is fixed by a schedule of betas; the reverse process (Eq. (11), (12), (15))
is the network's ε turned into a step from x_t to x_{t-1}: the ancestral DDPM step, or the DDIM step
that skips timesteps. The schedule is buffers of one nn.Module so it follows the model to the GPU;
every method takes one timestep per sample. Used by axf.py (the model's loss and sampler); the
schedules equal diffusers' schedulers to 1e-6 (tests/test_ddpm.py).
"""
import math

import torch


def randn(shape, generator=None, device=None):
    """Gaussian noise [B, ...] from one generator, or from a list of B generators, one per sample: then a
    sample's noise depends on its own generator only, not on which batch it was drawn in (sample.py)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


# the β range each schedule was published with (DDPM; LDM and Stable Diffusion); cosine needs none
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (None, None)}


def make_betas(schedule, num_steps, beta_start=None, beta_end=None):
    """β_1..β_T as float64, the way the reference schedulers (DDPM, LDM, improved DDPM) define them.

    Eq. (6): the forward process is a Markov chain; Eq. (7): its step t adds noise of variance β_t,
    q(x_t | x_{t-1}) = N(sqrt(1 - β_t) x_{t-1}, β_t I). The betas are all that defines it.
    """
    if schedule not in BETA_RANGES:
        raise ValueError(f"unknown schedule {schedule!r}; choose 'linear', 'scaled_linear' or 'cosine'")
    if beta_start is None:
        beta_start, beta_end = BETA_RANGES[schedule]
    if schedule == "linear":  # DDPM (Ho et al. 2020): β from 1e-4 to 0.02 in a straight line
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if schedule == "scaled_linear":  # LDM / Stable Diffusion: straight line in sqrt(β), then squared
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    if schedule == "cosine":  # improved DDPM (Nichol & Dhariwal 2021): ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2)
        s = 0.008
        alpha_bar = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = [1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps) for i in range(num_steps)]
        # clipped at 0.999 so the last steps do not divide by ~0 (diffusers' "squaredcos_cap_v2")
        return torch.tensor(betas, dtype=torch.float64).clamp(max=0.999)


class DDPM(torch.nn.Module):
    """The noise schedule with q_sample (Eq. (10)), the ancestral DDPM step (Eq. (12), (15)) and the DDIM step.

    Timesteps are 0-based: t = 0 is the first noising step, t = num_steps - 1 the last. All the math
    is done in float32 whatever the dtype of the inputs, and the result is cast back to x_t's dtype.
    """

    def __init__(self, num_steps=1000, schedule="linear", beta_start=None, beta_end=None):
        super().__init__()
        self.num_steps = num_steps
        betas = make_betas(schedule, num_steps, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # Eq. (9): ᾱ_t = Π_{s≤t} (1 - β_s)
        # float64 for the products, float32 to store; not persistent: the config rebuilds them
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def _at(self, values, t, x):
        """values[t] per sample, shaped [B, 1, 1, ...] to broadcast over x; ᾱ = 1 where t < 0."""
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be a LongTensor of shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")
        t = t.to(values.device)
        out = torch.where(t >= 0, values[t.clamp(min=0)], torch.ones_like(values[0]))
        return out.float().view(-1, *([1] * (x.dim() - 1))).to(x.device)

    def q_sample(self, x0, t, noise):
        """Noise clean x0 to step t in one jump, with the noise given so the training target exists."""
        alpha_bar_t = self._at(self.alphas_cumprod, t, x0)
        # Eq. (10): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (Eq. (8) as a reparameterised sample)
        return (alpha_bar_t.sqrt() * x0.float() + (1 - alpha_bar_t).sqrt() * noise.float()).to(x0.dtype)

    def step(self, eps, t, x_t, noise=None):
        """One ancestral DDPM step x_t -> x_{t-1} from the predicted ε, with the posterior variance."""
        beta_t = self._at(self.betas, t, x_t)
        alpha_bar_t = self._at(self.alphas_cumprod, t, x_t)
        alpha_bar_prev = self._at(self.alphas_cumprod, t - 1, x_t)  # ᾱ_{-1} = 1: the step into x_0
        # Eq. (12): μ(x_t) = (x_t - β_t / sqrt(1 - ᾱ_t) ε) / sqrt(α_t). This is the mean of the posterior
        # q(x_{t-1} | x_t, x̂_0) with x̂_0 from Eq. (10) unclipped, but written without x̂_0: dividing by
        # sqrt(ᾱ_t) ~ 0 at large t would amplify float32 rounding (equation 11 of Ho et al. 2020)
        mean = (x_t.float() - beta_t / (1 - alpha_bar_t).sqrt() * eps.float()) / (1 - beta_t).sqrt()
        # Deviation: Eq. (12) lets the network predict Σ too; here Σ = β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t,
        # DDPM's fixed "fixed_small" variance, as LDM and Stable Diffusion sample
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
        if noise is None:
            noise = torch.randn_like(mean)
        nonzero = (t > 0).float().view_as(alpha_bar_t).to(x_t.device)  # no noise on the last step, t = 0
        # Eq. (15): x_{t-1} = μ + sqrt(Σ) ε
        return (mean + nonzero * variance.sqrt() * noise.float()).to(x_t.dtype)

    def ddim_step(self, eps, t, t_prev, x_t, eta=0.0, noise=None):
        """One DDIM step x_t -> x_{t_prev} (equation 12 of Song et al. 2021); eta = 1 is ancestral-like."""
        alpha_bar_t = self._at(self.alphas_cumprod, t, x_t)
        alpha_bar_prev = self._at(self.alphas_cumprod, t_prev, x_t)  # t_prev = -1: ᾱ = 1, the clean image
        x_t32, eps = x_t.float(), eps.float()
        x0 = (x_t32 - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
        # x_{t_prev} = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ²) ε + σ z: the same marginals as Eq. (8)
        x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma ** 2).sqrt() * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn_like(x_t32)
            x_prev = x_prev + sigma * noise.float()
        return x_prev.to(x_t.dtype)

    def reverse_step(self, eps, t, t_prev, x_t, sampler="ddim", eta=0.0, generator=None):
        """x_t -> x_{t_prev} by the chosen sampler: Eq. (15)'s ancestral step (t_prev = t - 1) or a DDIM step.
        generator: one, or one per sample (randn)."""
        if sampler == "ddpm":
            return self.step(eps, t, x_t, noise=randn(x_t.shape, generator, x_t.device))
        noise = randn(x_t.shape, generator, x_t.device) if eta > 0 else None
        return self.ddim_step(eps, t, t_prev, x_t, eta=eta, noise=noise)

    def sampling_timesteps(self, sampler="ddim", steps=50):
        """The (t, t_prev) pairs a sampler visits, from T - 1 down to t_prev = -1 (the clean image).
        ddpm: every timestep (Eq. (11)'s chain); ddim: `steps` of them."""
        if sampler == "ddim":
            ts = self.ddim_timesteps(steps).tolist()
        elif sampler == "ddpm":
            ts = list(range(self.num_steps - 1, -1, -1))
        else:
            raise ValueError(f"unknown sampler {sampler!r}; use 'ddim' or 'ddpm'")
        return list(zip(ts, ts[1:] + [-1]))

    def ddim_timesteps(self, num_sample_steps):
        """The descending timesteps DDIM visits: every (T // n)-th, from 0 ("leading" spacing)."""
        if not 0 < num_sample_steps <= self.num_steps:
            raise ValueError(f"num_sample_steps must be in 1..{self.num_steps}, got {num_sample_steps}")
        ratio = self.num_steps // num_sample_steps
        return (torch.arange(num_sample_steps) * ratio).flip(0)  # e.g. [980, 960, ..., 20, 0]


def guided_eps(unet, x, t, context, null_context, scale):
    """Classifier-free guidance (Ho & Salimans 2022): ε = ε(∅) + s (ε(c) − ε(∅)), both branches in one UNet
    call. The model learnt both because a share of its training conditions was dropped to the null one.
    s = 1 is the conditional model alone, so the unconditional branch is skipped."""
    if scale == 1:
        return unet(x, t, context)
    eps_cond, eps_null = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null_context])).chunk(2)
    return eps_null + scale * (eps_cond - eps_null)
