"""Timestep samplers for training: uniform, and DiffRec's loss-aware importance sampling."""

import torch
from torch import nn


class UniformSampler(nn.Module):
    def __init__(self, num_steps):
        super().__init__()
        self.num_steps = num_steps

    def sample(self, batch_size, device, generator=None):
        """Steps [B] and importance weights [B] (all ones)."""
        t = torch.randint(0, self.num_steps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

    def update(self, t, losses):
        """Uniform sampling learns nothing from the losses."""


class LossAwareSampler(UniformSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over each step's last ``history`` losses, mixed with
    ``uniform_prob`` of uniform mass; uniform until every step has a full history. Weights
    ``1 / (T p(t))`` keep the loss an unbiased estimate of the uniform-t objective.

    The history is a [T, history] ring buffer on the device, updated for a whole batch without a Python loop.
    """

    def __init__(self, num_steps, history=10, uniform_prob=0.001):
        super().__init__(num_steps)
        self.history, self.uniform_prob = history, uniform_prob
        self.register_buffer("loss_history", torch.zeros(num_steps, history))
        self.register_buffer("loss_count", torch.zeros(num_steps, dtype=torch.long))

    def warmed_up(self):
        return bool((self.loss_count >= self.history).all())

    def probabilities(self):
        root_mean_sq = self.loss_history.pow(2).mean(dim=1).sqrt()
        p = root_mean_sq / root_mean_sq.sum().clamp(min=1e-12)
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_steps

    def sample(self, batch_size, device, generator=None):
        if not self.warmed_up():
            return super().sample(batch_size, device, generator)
        p = self.probabilities().to(device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, 1.0 / (self.num_steps * p[t])

    @torch.no_grad()
    def update(self, t, losses):
        t = t.to(self.loss_count.device)
        losses = losses.detach().float().to(self.loss_history.device)
        order = torch.argsort(t, stable=True)
        t, losses = t[order], losses[order]
        counts = torch.bincount(t, minlength=self.num_steps)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(t.numel(), device=t.device) - first[t]
        # Only the last `history` losses of each step in this batch survive a ring buffer anyway; dropping
        # the others avoids duplicate writes to one slot.
        keep = rank >= counts[t] - self.history
        t, losses, rank = t[keep], losses[keep], rank[keep]
        slot = (self.loss_count[t] + rank) % self.history
        self.loss_history[t, slot] = losses
        self.loss_count += counts


def make_step_sampler(name, num_steps, **kwargs):
    if name == "uniform":
        return UniformSampler(num_steps)
    if name in ("lossaware", "loss_aware", "importance"):
        return LossAwareSampler(num_steps, **kwargs)
    raise ValueError(f"Unknown step sampler '{name}'; choose 'uniform' or 'lossaware'.")
