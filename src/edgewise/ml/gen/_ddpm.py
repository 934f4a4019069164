"""A small class-conditional DDPM for 28x28 grayscale images, and the graphs the device runs:
the anomaly score, the sampler and the denoiser.

Continuous time t in [0, 1] with the cosine schedule (Nichol & Dhariwal 2021), epsilon
prediction, and the class as a one-hot vector whose all-zero value means "no class" (labels are
dropped to zero during training, so one network is both conditional and unconditional, and
sampling can use classifier-free guidance).

Invariant: like the VAE's, every graph takes what the device feeds it: the score graph takes
contract-normalised images, the sampler takes the same (z [N, H*W], one-hot label) pair as a VAE
decoder (z is the starting noise), the denoiser takes pixels in [0, 1] and a noise level. So the
agent, `gen augment` and the health check run a DDPM bundle with no DDPM-specific code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DDPM_SCORE_METHODS", "DenoiseGraph", "SamplerGraph", "TinyUNet", "DiffusionScoreGraph",
           "alpha_bar", "ddpm_loss"]

SIDE = 28
_S = 0.008  # cosine-schedule offset
_ALPHA_BAR_MIN, _ALPHA_BAR_MAX = 1e-4, 0.9999
# The anomaly score: noise-prediction error at fixed times with fixed noise (deterministic), an
# estimate of terms of the model's variational bound. "fine" sums the low-noise times (texture),
# "coarse" the high-noise ones (shape); "combined" both, standardised on validation images.
DDPM_SCORE_METHODS = ("fine", "coarse", "combined")
_FINE_T = (0.05, 0.1, 0.2)
_COARSE_T = (0.35, 0.5, 0.65)


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Share of the signal's variance left at time t in [0, 1] (cosine schedule)."""
    f = torch.cos((t + _S) / (1 + _S) * (math.pi / 2)) ** 2
    f0 = math.cos(_S / (1 + _S) * math.pi / 2) ** 2
    return (f / f0).clamp(_ALPHA_BAR_MIN, _ALPHA_BAR_MAX)


def time_of(abar: torch.Tensor) -> torch.Tensor:
    """Inverse of `alpha_bar`: the time at which that much signal is left."""
    f0 = math.cos(_S / (1 + _S) * math.pi / 2) ** 2
    u = torch.acos(torch.sqrt((abar * f0).clamp(0.0, 1.0)))
    return (u * (2 / math.pi) * (1 + _S) - _S).clamp(0.0, 1.0)


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * 1000.0).unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class TinyUNet(nn.Module):
    """Epsilon-predicting UNet sized for a CPU: 28 -> 14 -> 7 and back, widths (w, 2w, 4w).

    `label` is one-hot [N, K] (all zeros: unconditional); it enters through a bias-free linear
    map added to the time embedding, so zeros contribute nothing.
    """

    def __init__(self, *, num_classes: int = 0, width: int = 16) -> None:
        super().__init__()
        w, emb = width, 4 * width
        self.num_classes = num_classes
        self.width = width
        self.emb_dim = emb
        self.time = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Linear(num_classes, emb, bias=False) if num_classes else None
        self.inp = nn.Conv2d(1, w, 3, padding=1)
        self.d1 = _ResBlock(w, w, emb)
        self.down1 = nn.Conv2d(w, w, 4, 2, 1)                # 14
        self.d2 = _ResBlock(w, 2 * w, emb)
        self.down2 = nn.Conv2d(2 * w, 2 * w, 4, 2, 1)        # 7
        self.mid1 = _ResBlock(2 * w, 4 * w, emb)
        self.mid2 = _ResBlock(4 * w, 4 * w, emb)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1)  # 14
        self.u2 = _ResBlock(4 * w, 2 * w, emb)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 4, 2, 1)      # 28
        self.u1 = _ResBlock(2 * w, w, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None
                ) -> torch.Tensor:
        e = self.time(_timestep_embedding(t, self.emb_dim))
        if self.label is not None and label is not None:
            e = e + self.label(label)
        h0 = self.d1(self.inp(x), e)
        h1 = self.d2(self.down1(h0), e)
        h = self.mid2(self.mid1(self.down2(h1), e), e)
        h = self.u2(torch.cat([self.up2(h), h1], 1), e)
        h = self.u1(torch.cat([self.up1(h), h0], 1), e)
        return self.out(h)


def ddpm_loss(model: TinyUNet, x01: torch.Tensor, y: torch.Tensor | None, *,
              drop_label: float = 0.1) -> torch.Tensor:
    """Mean squared noise-prediction error at a random time per image (x01: pixels in [0, 1])."""
    x0 = x01 * 2 - 1
    n = x0.shape[0]
    t = torch.rand(n)
    ab = alpha_bar(t)[:, None, None, None]
    eps = torch.randn_like(x0)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    onehot = None
    if model.num_classes and y is not None:
        keep = (torch.rand(n) >= drop_label).float()[:, None]
        onehot = F.one_hot(y, model.num_classes).float() * keep
    return F.mse_loss(model(xt, t, onehot), eps)


class DiffusionScoreGraph(nn.Module):
    """Contract-normalised image -> (score, fine error, coarse error), one row per image.

    Fixed times and fixed noise (buffers drawn from `seed`), so the score is deterministic and
    the device's health check can compare it with the golden outputs.
    """

    def __init__(self, unet: TinyUNet, *, input_mean: float, input_std: float,
                 norm: tuple[float, float, float, float], method: str, seed: int = 0) -> None:
        super().__init__()
        if method not in DDPM_SCORE_METHODS:
            raise ValueError(f"unknown score method {method!r}")
        self.unet = unet
        self.method = method
        self.input_mean, self.input_std = float(input_mean), float(input_std)
        g = torch.Generator().manual_seed(seed)
        times = _FINE_T + _COARSE_T
        self.register_buffer("noise", torch.randn(len(times), 1, SIDE, SIDE, generator=g))
        self.times = times
        self.register_buffer("norm", torch.tensor(norm, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x0 = (x * self.input_std + self.input_mean).clamp(0, 1) * 2 - 1
        n = x0.shape[0]
        errs = []
        for i, t in enumerate(self.times):
            ab = float(alpha_bar(torch.tensor(t)))
            eps = self.noise[i:i + 1]
            xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
            pred = self.unet(xt, torch.full((n,), t), None)
            errs.append((pred - eps).pow(2).mean((1, 2, 3)))
        k = len(_FINE_T)
        fine = torch.stack(errs[:k], 1).sum(1)
        coarse = torch.stack(errs[k:], 1).sum(1)
        if self.method == "fine":
            score = fine
        elif self.method == "coarse":
            score = coarse
        else:
            score = (fine - self.norm[0]) / self.norm[1] + (coarse - self.norm[2]) / self.norm[3]
        return score, fine, coarse


class SamplerGraph(nn.Module):
    """(z [N, H*W] starting noise[, one-hot label]) -> image [N, 1, H, W] in [0, 1].

    Deterministic DDIM (eta = 0) over `steps` evenly spaced times, unrolled, so the schedule is
    part of the graph. With a label, classifier-free guidance: eps = (1 + g) eps(label) -
    g eps(none).
    """

    def __init__(self, unet: TinyUNet, *, steps: int = 25, guidance: float = 1.0) -> None:
        super().__init__()
        self.unet = unet
        self.steps = steps
        self.guidance = guidance
        ts = torch.linspace(1.0, 0.0, steps + 1)
        ab = alpha_bar(ts)
        ab[-1] = 1.0
        self.schedule = [(float(ts[i]), float(ab[i]), float(ab[i + 1])) for i in range(steps)]

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        x = z.view(-1, 1, SIDE, SIDE)
        n = x.shape[0]
        for t, ab, ab_next in self.schedule:
            tt = torch.full((n,), t)
            if label is None:
                eps = self.unet(x, tt, None)
            else:
                both = self.unet(torch.cat([x, x]), torch.cat([tt, tt]),
                                 torch.cat([label, torch.zeros_like(label)]))
                cond, uncond = both[:n], both[n:]
                eps = (1 + self.guidance) * cond - self.guidance * uncond
            x0 = ((x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1)
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
            x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
        return ((x + 1) / 2).clamp(0, 1)


class DenoiseGraph(nn.Module):
    """(noisy image in [0, 1] [N, 1, H, W], noise std in pixel units [N]) -> estimate in [0, 1].

    A noisy image y = x + sigma n is, scaled by sqrt(abar), exactly a diffusion state at the
    time where (1 - abar) / abar = (2 sigma)^2 (pixels map to [-1, 1], doubling sigma), so one
    network evaluation gives the model's posterior-mean estimate of the clean image.
    """

    def __init__(self, unet: TinyUNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = (2 * sigma).clamp(min=1e-3)[:, None, None, None]
        ab = 1 / (1 + s * s)
        xt = ab.sqrt() * (noisy * 2 - 1)
        eps = self.unet(xt, time_of(ab.flatten()), None)
        x0 = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
        return ((x0.clamp(-1, 1) + 1) / 2)
