"""DiffSynth-Studio 1.1.9's `EnhancedDDIMScheduler` (the challenge baseline's sampler) as a diffusers
scheduler, so `generate.sampler: ddim` in a stock KolorsPipeline renders what the baseline rendered.

diffusers' DDIMScheduler cannot do this by configuration: DiffSynth spaces its timesteps as
round(max_t - i * max_t / (n - 1)), from 1099 down to 0 on Kolors' 1100 steps (no spacing mode of
diffusers gives these), takes the previous timestep from that list (not t - 1100 // n), steps to
alpha = 1 after t = 0, and never clips. The arithmetic below mirrors its `step` line for line
(Python-float weights times the tensors), so the latents agree bit for bit on the same inputs.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput


class DiffSynthDDIMScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic DDIM (eta 0) with DiffSynth's timesteps; defaults are Kolors' schedule."""

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1100, beta_start: float = 0.00085, beta_end: float = 0.014,
                 beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon"):
        if beta_schedule == "scaled_linear":
            betas = torch.square(torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps,
                                                dtype=torch.float32))
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        else:
            raise ValueError(f"beta_schedule {beta_schedule!r}: DiffSynth's DDIM has scaled_linear and linear")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r}: use epsilon or v_prediction")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._alphas = self.alphas_cumprod.tolist()  # DiffSynth reads Python floats (fp32 values)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "DiffSynthDDIMScheduler":
        """From a Kolors scheduler config (Euler's, with keys DDIM has no use for): only the noise
        schedule is taken, so from_config's warning about the other keys stays out of the logs."""
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
        return cls(**{k: config[k] for k in keys if k in config})

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      denoising_strength: float = 1.0) -> None:
        """round(max_t - i * max_t / (n - 1)) for i < n: both ends included, no offset."""
        max_t = max(round(self.config.num_train_timesteps * denoising_strength) - 1, 0)
        n = min(num_inference_steps, max_t + 1)
        values = [max_t] if n == 1 else [round(max_t - i * max_t / (n - 1)) for i in range(n)]
        self.num_inference_steps = n
        self.timesteps = torch.tensor(values, dtype=torch.long, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        return sample

    def _alpha_prev(self, t: int) -> float:
        """Alpha-bar of the next timestep in the list; 1.0 after the last (DiffSynth's lookup: the
        list entry nearest to t)."""
        i = int(torch.argmin((self.timesteps.cpu() - t).abs()))
        return 1.0 if i + 1 >= len(self.timesteps) else self._alphas[int(self.timesteps[i + 1])]

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor]:
        t = int(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else int(timestep)
        a_t, a_prev = self._alphas[t], self._alpha_prev(t)
        if self.config.prediction_type == "epsilon":
            weight_e = math.sqrt(1 - a_prev) - math.sqrt(a_prev * (1 - a_t) / a_t)
            weight_x = math.sqrt(a_prev / a_t)
        else:  # v_prediction
            weight_e = -math.sqrt(a_prev * (1 - a_t)) + math.sqrt(a_t * (1 - a_prev))
            weight_x = math.sqrt(a_t * a_prev) + math.sqrt((1 - a_t) * (1 - a_prev))
        prev = sample * weight_x + model_output * weight_e
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


__all__ = ["DiffSynthDDIMScheduler"]
