"""GlobalDiff's x0 approximators: the small 2-D U-Net of the authors' code (default) and an MLP."""

import torch
import torch.nn.functional as F
from torch import nn

from recbole_diff.diffusion import timestep_embedding


class ConvBlock(nn.Sequential):
    def __init__(self, c_in, c_out):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class SmallUNet(nn.Module):
    """1 x 16 x 16 -> 1 x 16 x 16 as in the authors' code: ConvBlock(1->32) at 16 x 16, stride-2 down to
    8 x 8, ConvBlock(32->64), upsample back to 32 channels at 16 x 16, skip concat, ConvBlock(64->32), 3x3 conv
    to one channel, sigmoid. About 17 MFLOP per user per step."""

    def __init__(self):
        super().__init__()
        self.enc1 = ConvBlock(1, 32)
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.enc2 = ConvBlock(32, 64)
        self.up = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec = ConvBlock(32 + 32, 32)
        self.out = nn.Conv2d(32, 1, 3, padding=1)

    def forward(self, x):
        skip = self.enc1(x)
        h = self.up(self.enc2(self.down(skip)))
        return torch.sigmoid(self.out(self.dec(torch.cat([h, skip], dim=1))))


class GlobalApproximator(nn.Module):
    """f(x_t, t, c) -> x0_hat over all M items.

    The noisy item vector is normalised over items to unit root-mean-square (the authors normalise over a
    singleton axis, so their network only sees sign(x_t)), projected to D, joined with the condition and a
    sinusoidal step embedding.
    ``kind='unet'`` maps that to a 16 x 16 map through the small U-Net; ``kind='mlp'`` uses two layers.
    """

    def __init__(self, n_items, hidden, cond_dim, step_dim=64, kind="unet", dropout=0.1):
        super().__init__()
        if kind not in ("unet", "mlp"):
            raise ValueError(f"approximator must be 'unet' or 'mlp', got '{kind}'.")
        self.kind, self.step_dim = kind, step_dim
        self.w_in = nn.Linear(n_items, hidden)
        self.dropout = nn.Dropout(dropout)
        joined = hidden + cond_dim + step_dim
        if kind == "unet":
            self.to_map = nn.Linear(joined, 256)
            # channels-last convolutions run the U-Net 1.6x faster on CPU (mkldnn) and no slower on GPU
            self.unet = SmallUNet().to(memory_format=torch.channels_last)
            self.from_map = nn.Linear(256, hidden)
        else:
            self.mlp = nn.Sequential(nn.Linear(joined, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))
        self.w_out = nn.Linear(hidden, n_items)

    def forward(self, x_t, t, cond=None):
        # unit root-mean-square over items: the authors' input (sign(x_t), their normalisation bug) has entries of
        # size 1, and a unit-norm vector (entries ~1/sqrt(M)) projected to D came out ~40x smaller than the
        # condition and step embedding it is joined with
        h = self.dropout(self.w_in(F.normalize(x_t, dim=-1) * x_t.shape[-1] ** 0.5))
        parts = [h, timestep_embedding(t, self.step_dim)]
        if cond is not None:
            parts.insert(1, cond)
        z = torch.cat(parts, dim=-1)
        if self.kind == "unet":
            image = self.to_map(z).view(-1, 1, 16, 16).contiguous(memory_format=torch.channels_last)
            z = self.from_map(self.unet(image).flatten(1))
        else:
            z = self.mlp(z)
        return self.w_out(z)
