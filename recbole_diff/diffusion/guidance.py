"""Guidance as composable pieces.

* Classifier-free guidance wraps the model: ``classifier_free(model_fn, gamma, null_kwargs)`` returns a new
  ``model_fn`` computing ``(1 + gamma) * f(x, t, c) - gamma * f(x, t, null)``. gamma = 0 is the unguided
  conditional model.
* Classifier guidance is a hook for ``GaussianDiffusion`` (``StepOptions(guidance=(ClassifierGuidance(...),))``):
  it shifts the predicted noise by ``-gamma * sqrt(1 - abar_t) * grad_x log p(y | x_t)`` and recomputes x0,
  which works for ancestral and DDIM sampling alike (Dhariwal & Nichol's score conditioning).
"""

import torch

from recbole_diff.diffusion.gaussian import _gather


def classifier_free(model_fn, gamma, null_kwargs):
    """Both branches run in one batched call (the batch is doubled), not two sequential calls."""
    if gamma == 0:
        return model_fn

    def guided(x_t, t, **cond_kwargs):
        keys = set(cond_kwargs) | set(null_kwargs)
        both = {}
        for key in keys:
            c, u = cond_kwargs.get(key), null_kwargs.get(key)
            if c is None or u is None:
                raise KeyError(f"classifier-free guidance needs '{key}' in both the condition and the null condition.")
            both[key] = torch.cat([c, u.expand_as(c) if u.shape != c.shape else u], dim=0)
        out = model_fn(torch.cat([x_t, x_t], dim=0), torch.cat([t, t], dim=0), **both)
        cond, uncond = out.chunk(2, dim=0)
        return (1 + gamma) * cond - gamma * uncond

    return guided


class ClassifierGuidance:
    """``log_prob_fn(x_t, t) -> [B]`` log p(y | x_t) per sample; its gradient steers sampling towards y."""

    def __init__(self, log_prob_fn, gamma):
        self.log_prob_fn, self.gamma = log_prob_fn, gamma

    def gradient(self, x_t, t):
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            return torch.autograd.grad(self.log_prob_fn(x, t).sum(), x)[0]

    def __call__(self, diffusion, x_t, t, pred):
        if self.gamma == 0:
            return pred
        grad = self.gradient(x_t, t)
        eps = pred["pred_eps"] - self.gamma * _gather(diffusion.sqrt_one_minus_alphas_cumprod, t, x_t.dim()) * grad
        return dict(pred, pred_eps=eps, pred_x0=diffusion.predict_x0_from_eps(x_t, t, eps))
