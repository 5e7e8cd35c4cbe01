"""DiffuASR's SU-Net: a small U-Net whose channels are the M positions of the generated prefix and whose
images are the d-dim item embeddings folded into sqrt(d) x sqrt(d) maps.

Layout (the authors' code's defaults): an input conv, per level ``res_blocks`` ResNet blocks then a stride-2
down-sampling conv (8 -> 4 -> 2 -> 1 for d = 64 with 4 levels), a middle ResNet + self-attention + ResNet
block, per level ``res_blocks + 1`` ResNet blocks on the up path joined with the down path's activations by
concatenation, nearest-neighbour up-sampling, and an output conv back to M channels. GroupNorm, SiLU,
dropout; the vector z = MLP(step embedding) + MLP(condition) is projected into every ResNet block.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_diff.diffusion import timestep_embedding


def _norm(channels):
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, z_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.z_proj = nn.Linear(z_dim, c_out)
        self.norm2, self.drop = _norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, z):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.z_proj(F.silu(z))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions of a map."""

    def __init__(self, channels):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # [b, hw, hw]
        return x + self.out((v @ attn.transpose(1, 2)).reshape(b, c, h, w))


def square_side(d):
    """sqrt(d) for a perfect square d, else a clear error."""
    side = math.isqrt(int(d))
    if side * side != int(d):
        squares = ", ".join(str(s * s) for s in (4, 6, 8, 10, 12, 16))
        raise ValueError(
            f"SU-Net folds each d-dim embedding into a sqrt(d) x sqrt(d) map, so d must be a perfect "
            f"square; got d = {d}. Use e.g. {squares} (diffusion_embedding_size)."
        )
    return side


class SUNet(nn.Module):
    """eps_theta(x_t [B, M, d], t [B], c [B, d]) -> [B, M, d]."""

    def __init__(self, positions, d, channels=(8, 16, 16, 16), res_blocks=2, step_dim=8, z_dim=32, dropout=0.1):
        super().__init__()
        self.positions, self.d, self.side = positions, d, square_side(d)
        levels = len(channels)
        if self.side % (2 ** (levels - 1)):
            raise ValueError(
                f"SU-Net with {levels} levels halves the {self.side} x {self.side} map {levels - 1} "
                f"times; use fewer unet_channels or a d whose side is divisible by {2 ** (levels - 1)}."
            )
        self.step_dim = step_dim
        self.step_mlp = nn.Sequential(nn.Linear(step_dim, z_dim), nn.SiLU(), nn.Linear(z_dim, z_dim))
        self.cond_mlp = nn.Sequential(nn.Linear(d, z_dim), nn.SiLU(), nn.Linear(z_dim, z_dim))
        self.inp = nn.Conv2d(positions, channels[0], 3, padding=1)
        self.down, skips, cur = nn.ModuleList(), [channels[0]], channels[0]
        for i, ch in enumerate(channels):
            for _ in range(res_blocks):
                self.down.append(ResBlock(cur, ch, z_dim, dropout))
                cur = ch
                skips.append(cur)
            if i < levels - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid = nn.ModuleList(
            [ResBlock(cur, cur, z_dim, dropout), AttnBlock(cur), ResBlock(cur, cur, z_dim, dropout)]
        )
        self.up = nn.ModuleList()
        for i, ch in reversed(list(enumerate(channels))):
            for _ in range(res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch, z_dim, dropout))
                cur = ch
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), nn.Conv2d(cur, positions, 3, padding=1))

    def forward(self, x, t, c):
        b = x.shape[0]
        if x.shape[1:] != (self.positions, self.d):
            raise ValueError(f"SU-Net expects [B, {self.positions}, {self.d}], got {list(x.shape)}.")
        z = self.step_mlp(timestep_embedding(t, self.step_dim)) + self.cond_mlp(c)
        h = self.inp(x.reshape(b, self.positions, self.side, self.side))
        saved = [h]
        for layer in self.down:
            h = layer(h, z) if isinstance(layer, ResBlock) else layer(h)
            saved.append(h)
        for layer in self.mid:
            h = layer(h, z) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            h = layer(torch.cat([h, saved.pop()], dim=1), z) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h).reshape(b, self.positions, self.d)
