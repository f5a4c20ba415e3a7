"""The training objective: Kolors' noise schedule, noise offset and min-SNR weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(shape: torch.Size, offset: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise, plus a per-channel constant (noise offset) that lets the model learn
    overall brightness shifts. Drawn on CPU from the run's generator: same on any device."""
    noise = torch.randn(shape, generator=gen)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
    return noise


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    alpha = alphas_cumprod.to(timesteps.device)[timesteps]
    return alpha / (1.0 - alpha)


def diffusion_loss(
    pred: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """Epsilon-prediction MSE; with min-SNR-gamma each sample is weighted min(SNR, gamma)/SNR
    (Hang et al. 2023), which damps the easy low-noise timesteps."""
    per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        s = snr(alphas_cumprod, timesteps)
        per_sample = per_sample * torch.clamp(s, max=min_snr_gamma) / s
    return per_sample.mean()
