"""Gaussian diffusion: forward process, posterior, reverse steps and samplers, written once for every method.

A model is any callable ``model_fn(x_t, t, **model_kwargs) -> tensor`` that predicts either x0
(``parameterization='x0'``, DiffuRec, GlobalDiff) or the noise (``'eps'``, DiffuASR). All schedule tensors
are buffers, so they follow ``.to(device)`` and are saved with the owning model.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from recbole_diff.diffusion.schedules import make_betas

OFFSET_MODES = ("none", "constant", "random", "iid")


def _gather(buffer, t, ndim):
    """buffer[t] shaped to broadcast against a tensor of ``ndim`` dims whose first dim is the batch."""
    return buffer[t].reshape(t.shape[0], *([1] * (ndim - 1)))


def make_noise(shape, device, mode="none", scale=0.1, constant=1.0, generator=None, dtype=torch.float32):
    """Training noise for ``q_sample``.

    * ``none``: N(0, I).
    * ``constant``: N(scale * constant, I), a fixed mean shift on every dimension (DiffuRecSys, Eq. 17).
    * ``random``: N(0, I) plus one shift ``scale * N(0, 1)`` per sample, shared by its last dimension
      (the image-diffusion offset-noise recipe).
    * ``iid``: N(0, I) plus an independent ``scale * N(0, I)``: variance ``1 + scale^2``, no offset (what the
      DiffuRecSys authors' code does).
    """
    eps = torch.randn(shape, device=device, generator=generator, dtype=dtype)
    if mode == "none":
        return eps
    if mode == "constant":
        return eps + scale * constant
    if mode == "random":
        shift = torch.randn(*shape[:-1], 1, device=device, generator=generator, dtype=dtype)
        return eps + scale * shift
    if mode == "iid":
        return eps + scale * torch.randn(shape, device=device, generator=generator, dtype=dtype)
    raise ValueError(f"Unknown offset noise mode '{mode}'; choose one of {', '.join(OFFSET_MODES)}.")


def spaced_steps(num_steps, sample_steps):
    """``sample_steps`` steps out of ``0..num_steps-1``, evenly spaced, descending, always ending at 0."""
    if not 1 <= sample_steps <= num_steps:
        raise ValueError(f"sample_steps must be in [1, {num_steps}], got {sample_steps}.")
    if sample_steps == 1:
        return [0]
    # evenly spaced in float64 from both ends, as torch.linspace computes them, rounded half to even; in Python
    # because the schedule is host data (a sampling loop must not read tensors back)
    stride, half = (num_steps - 1) / (sample_steps - 1), sample_steps // 2
    points = [
        i * stride if i < half else (num_steps - 1) - (sample_steps - 1 - i) * stride for i in range(sample_steps)
    ]
    return sorted({round(p) for p in points}, reverse=True)


@dataclass(frozen=True)
class StepOptions:
    """What a reverse step does around ``model_fn(x_t, t)``, for guided sampling (DiffuASR); the plain samplers
    need none of it.

    Args:
        model_kwargs: extra keyword inputs of the model (the condition ``c``), as ``model_fn(x_t, t, **kwargs)``.
        denoised_fn: post-processes the predicted x0 (clipping, rounding).
        guidance: hooks ``hook(diffusion, x_t, t, pred) -> pred`` that may shift ``pred_eps`` (classifier guidance).
    """

    model_kwargs: dict = field(default_factory=dict)
    denoised_fn: Optional[Callable] = None
    guidance: tuple = ()


_PLAIN = StepOptions()


class GaussianDiffusion(nn.Module):
    """DDPM/DDIM maths over ``T`` steps of a beta schedule.

    Args:
        schedule (str): see :func:`recbole_diff.diffusion.schedules.make_betas`.
        steps (int): T.
        parameterization (str): ``'x0'`` or ``'eps'``: what the model predicts.
        variance (str): reverse-step variance, ``'fixed_small'`` (the posterior's) or ``'fixed_large'`` (beta).
        schedule_kwargs: forwarded to ``make_betas`` (``beta_start``, ``noise_scale``, ``noise_min`` ...).
    """

    def __init__(
        self, schedule="linear", steps=1000, parameterization="eps", variance="fixed_small", **schedule_kwargs
    ):
        super().__init__()
        if parameterization not in ("x0", "eps"):
            raise ValueError(f"parameterization must be 'x0' or 'eps', got '{parameterization}'.")
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got '{variance}'.")
        self.num_steps, self.parameterization, self.variance = steps, parameterization, variance
        betas = make_betas(schedule, steps, **schedule_kwargs)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # abar_{-1} = 1: "step -1" is the clean data, so the last reverse step maps onto x0.
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float())

    # ---- forward process -----------------------------------------------------------------------------
    def q_sample(self, x0, t, noise=None):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; pass ``make_noise(...)`` for offset noise."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0.dim()) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * noise
        )

    def q_sample_from(self, x_s, s, t, noise=None):
        """Continue the forward process from step ``s`` to a later step ``t`` (GlobalDiff treats the backbone's
        scores as x_{T'} and noises them on to T)."""
        if noise is None:
            noise = torch.randn_like(x_s)
        ratio = _gather(self.alphas_cumprod, t, x_s.dim()) / _gather(self.alphas_cumprod, s, x_s.dim())
        return ratio.sqrt() * x_s + (1.0 - ratio).sqrt() * noise

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x0)."""
        mean = (
            _gather(self.posterior_mean_coef1, t, x_t.dim()) * x0
            + _gather(self.posterior_mean_coef2, t, x_t.dim()) * x_t
        )
        return mean, _gather(self.posterior_variance, t, x_t.dim())

    def predict_x0_from_eps(self, x_t, t, eps):
        return (
            _gather(self.sqrt_recip_alphas_cumprod, t, x_t.dim()) * x_t
            - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.dim()) * eps
        )

    def predict_eps_from_x0(self, x_t, t, x0):
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t.dim()) * x_t - x0) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.dim()
        )

    # ---- reverse process -----------------------------------------------------------------------------
    def model_predictions(self, model_fn, x_t, t, options=None):
        """Run the model once and return ``{'pred_x0', 'pred_eps', 'model_output'}``, with the
        :class:`StepOptions` applied (x0 post-processing, then the guidance hooks)."""
        options = options or _PLAIN
        denoised_fn = options.denoised_fn
        output = model_fn(x_t, t, **options.model_kwargs)
        if self.parameterization == "x0":
            x0 = output
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        else:
            eps = output
            x0 = self.predict_x0_from_eps(x_t, t, eps)
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
                eps = self.predict_eps_from_x0(x_t, t, x0)
        pred = {"pred_x0": x0, "pred_eps": eps, "model_output": output}
        for hook in options.guidance:
            pred = hook(self, x_t, t, pred)
        return pred

    def _step_coefficients(self, t, t_prev, ndim):
        """Posterior coefficients for a jump from step t to an earlier step t_prev (t_prev = -1 is x0).

        For t_prev = t - 1 these are the usual DDPM posterior; for a larger jump they are those of the
        respaced process whose abar's are the original ones at the kept steps."""
        abar_t = _gather(self.alphas_cumprod, t, ndim)
        abar_prev = torch.where(
            t_prev.reshape(abar_t.shape) >= 0,
            _gather(self.alphas_cumprod, t_prev.clamp(min=0), ndim),
            torch.ones_like(abar_t),
        )
        beta = 1.0 - abar_t / abar_prev
        coef_x0 = beta * abar_prev.sqrt() / (1.0 - abar_t)
        coef_xt = (1.0 - abar_prev) * (1.0 - beta).sqrt() / (1.0 - abar_t)
        small = beta * (1.0 - abar_prev) / (1.0 - abar_t)
        return abar_t, abar_prev, coef_x0, coef_xt, small, beta

    def p_mean_variance(self, model_fn, x_t, t, t_prev=None, options=None):
        """Mean and variance of p(x_{t_prev} | x_t) (``t_prev`` defaults to t - 1), plus the predictions."""
        t_prev = t - 1 if t_prev is None else t_prev
        pred = self.model_predictions(model_fn, x_t, t, options)
        _, _, coef_x0, coef_xt, small, beta = self._step_coefficients(t, t_prev, x_t.dim())
        pred["mean"] = coef_x0 * pred["pred_x0"] + coef_xt * x_t
        pred["variance"] = small if self.variance == "fixed_small" else beta
        return pred

    def p_sample(self, model_fn, x_t, t, t_prev=None, options=None, noise=None):
        """One ancestral step; no noise is added on the step that lands on x0."""
        t_prev = t - 1 if t_prev is None else t_prev
        out = self.p_mean_variance(model_fn, x_t, t, t_prev, options)
        if noise is None:
            noise = torch.randn_like(x_t)
        keep = (t_prev >= 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
        out["sample"] = out["mean"] + keep * out["variance"].sqrt() * noise
        return out

    def ddim_sample(self, model_fn, x_t, t, t_prev, eta=0.0, options=None, noise=None):
        """One DDIM step from t to t_prev (eta = 0: deterministic; eta = 1: the ancestral step in law)."""
        pred = self.model_predictions(model_fn, x_t, t, options)
        abar_t, abar_prev, *_ = self._step_coefficients(t, t_prev, x_t.dim())
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
        mean = abar_prev.sqrt() * pred["pred_x0"] + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * pred["pred_eps"]
        if noise is None:
            noise = torch.randn_like(x_t)
        pred["mean"], pred["variance"] = mean, sigma**2
        pred["sample"] = mean + sigma * noise
        return pred

    def reverse_schedule(self, steps=None):
        """The descending step indices a reverse run visits: every step (``None``), a number of evenly spaced
        steps (int), or an explicit list (a run from an earlier step than T - 1 lists its steps)."""
        if steps is None:
            return list(range(self.num_steps - 1, -1, -1))
        if isinstance(steps, int):
            return spaced_steps(self.num_steps, steps)
        return sorted((int(s) for s in steps), reverse=True)

    def sample(
        self, model_fn, x_T, steps=None, sampler="ancestral", eta=0.0, generator=None, stochastic=True, options=None
    ):
        """Run the reverse process from ``x_T`` and return the final x0 prediction (the last step lands on x0,
        so it is also the chain's last state).

        Args:
            x_T: the start state, at the first step of the schedule (noise: ``torch.randn(shape, generator=g)``).
            steps (int or list, optional): see :meth:`reverse_schedule`.
            sampler: ``'ancestral'`` or ``'ddim'`` (with ``eta``).
            generator: a ``torch.Generator`` for reproducible noise.
            stochastic: ``False`` follows the mean of every step (DiffRec's noise-free inference).
            options (StepOptions, optional): model inputs, x0 post-processing and guidance of every step.
        """
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"Unknown sampler '{sampler}'; choose 'ancestral' or 'ddim'.")
        schedule = self.reverse_schedule(steps)
        x, batch, device = x_T, x_T.shape[0], x_T.device
        out = None
        for step, prev in zip(schedule, schedule[1:] + [-1]):
            t = torch.full((batch,), step, device=device, dtype=torch.long)
            t_prev = torch.full((batch,), prev, device=device, dtype=torch.long)
            noise = torch.randn(x.shape, device=device, generator=generator) if stochastic else torch.zeros_like(x)
            if sampler == "ancestral":
                out = self.p_sample(model_fn, x, t, t_prev, options, noise)
            else:
                out = self.ddim_sample(model_fn, x, t, t_prev, eta, options, noise)
            x = out["sample"]
        return out["pred_x0"]
