"""Sinusoidal step embeddings."""

import math

import torch
from torch import nn


def timestep_embedding(t, dim, max_period=10000):
    """[B] steps (int or float) -> [B, dim] of ``[cos(t * f_k), sin(t * f_k)]`` with geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class StepEmbedding(nn.Module):
    """Sinusoid of ``t * t_scale`` followed by Linear(dim, mult*dim) -> SiLU -> Linear(mult*dim, out_dim).

    ``t_scale = 1000 / T`` spreads a short schedule over the frequency range a 1000-step one would use
    (DiffuRec's convention)."""

    def __init__(self, dim, out_dim=None, mult=4, t_scale=1.0):
        super().__init__()
        self.dim, self.t_scale = dim, t_scale
        self.mlp = nn.Sequential(nn.Linear(dim, mult * dim), nn.SiLU(), nn.Linear(mult * dim, out_dim or dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t * self.t_scale, self.dim))
