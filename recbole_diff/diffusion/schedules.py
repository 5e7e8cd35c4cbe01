"""Beta schedules. Every schedule returns a float64 tensor of T betas; callers cast after deriving
cumulative products so that long schedules keep their precision."""

import math

import torch

SCHEDULES = ("linear", "trunc_lin", "cosine", "sqrt", "sigmoid", "linear-var")


def _betas_from_alpha_bar(alpha_bar, steps, max_beta=0.999):
    # beta_t = 1 - abar(t+1)/abar(t) for a continuous abar on [0, 1]; capped so the last step stays finite.
    t = torch.arange(steps, dtype=torch.float64)
    ratio = alpha_bar((t + 1) / steps) / alpha_bar(t / steps)
    return torch.clamp(1.0 - ratio, max=max_beta)


def make_betas(
    schedule, steps, beta_start=None, beta_end=None, noise_scale=1.0, noise_min=5e-4, noise_max=5e-3, max_beta=0.999
):
    """Betas of ``schedule`` over ``steps`` steps.

    * ``linear``: DDPM's, rescaled to T (``scale = 1000 / T``, 1e-4 * scale .. 0.02 * scale) unless
      ``beta_start``/``beta_end`` are given.
    * ``trunc_lin``: DiffuRec's truncated linear, ``scale = 1000 / T``, from ``1e-4 * scale + 0.01`` to
      ``0.02 * scale + 0.01`` (``0.001 * scale + 0.01`` if that end exceeds 1).
    * ``cosine``: improved DDPM (s = 0.008). ``sqrt``: Diffusion-LM's ``abar = 1 - sqrt(t / T + 1e-4)``.
    * ``sigmoid``: betas on a sigmoid ramp over [-6, 6] between ``beta_start`` and ``beta_end``.
    * ``linear-var``: DiffRec's: ``1 - abar_t`` is linear from ``noise_scale * noise_min`` to
      ``noise_scale * noise_max``.
    """
    if steps < 1:
        raise ValueError(f"The number of diffusion steps must be >= 1, got {steps}.")
    if schedule == "linear":
        scale = 1000.0 / steps
        start = 1e-4 * scale if beta_start is None else beta_start
        end = 0.02 * scale if beta_end is None else beta_end
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if schedule == "trunc_lin":
        scale = 1000.0 / steps
        start = 1e-4 * scale + 0.01
        end = 0.02 * scale + 0.01
        if end > 1:
            end = 0.001 * scale + 0.01
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if schedule == "cosine":
        return _betas_from_alpha_bar(lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2, steps, max_beta)
    if schedule == "sqrt":
        return _betas_from_alpha_bar(lambda u: 1 - torch.sqrt(u + 1e-4), steps, max_beta)
    if schedule == "sigmoid":
        start = 1e-4 if beta_start is None else beta_start
        end = 0.02 if beta_end is None else beta_end
        ramp = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64))
        return ramp * (end - start) + start
    if schedule == "linear-var":
        if not 0 < noise_min <= noise_max < 1:
            raise ValueError(f"linear-var needs 0 < noise_min <= noise_max < 1, got {noise_min}, {noise_max}.")
        variance = noise_scale * torch.linspace(noise_min, noise_max, steps, dtype=torch.float64)
        alpha_bar = 1 - variance
        betas = torch.empty(steps, dtype=torch.float64)
        betas[0] = 1 - alpha_bar[0]
        betas[1:] = torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=max_beta)
        return betas
    raise ValueError(f"Unknown noise schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}.")
