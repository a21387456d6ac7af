"""The DDPM noise schedule of Stable Diffusion: betas, alphas_cumprod, forward noising and the eps / x0 / v conversions."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD's "scaled linear" betas: linear in sqrt(beta), squared. Computed in float64 as the original does."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last ᾱ_T is exactly 0, so that the last timestep is pure noise (Lin et al. 2024, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed", Algorithm 1). SD's schedule ends at ᾱ_T = 0.0047: training never
    sees pure noise, sampling starts from it. The fix shifts sqrt(ᾱ_t) down by sqrt(ᾱ_T) and stretches it back so
    that sqrt(ᾱ_0) is unchanged:

        sqrt(ᾱ_t) <- (sqrt(ᾱ_t) - sqrt(ᾱ_T)) · sqrt(ᾱ_0) / (sqrt(ᾱ_0) - sqrt(ᾱ_T))

    then β_t = 1 - ᾱ_t / ᾱ_{t-1} (β_0 = 1 - ᾱ_0). SNR(T) = 0, so an eps-prediction model can't recover x0 there:
    use it with v-prediction. float64."""
    root = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    alphas_cumprod = ((root - last) * first / (first - last)) ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] in float64, reshaped to broadcast over a batch shaped like `like`, then moved to its device and dtype
    (t may live on the CPU while the batch is on a GPU)."""
    out = values.to(t.device)[t.long()]
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


@dataclass
class DDPMSchedule:
    """alphas_cumprod (written ᾱ_t) and everything derived from it.

    x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·eps, and v = sqrt(ᾱ_t)·eps - sqrt(1-ᾱ_t)·x0 (Salimans & Ho, 2022).
    """

    betas: torch.Tensor = field(default_factory=scaled_linear_betas)
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.betas = self.betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t), in float32 for loss weighting."""
        a = self.alphas_cumprod.to(t.device)[t.long()]
        return (a / (1.0 - a)).float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _gather(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _gather(self.alphas_cumprod, t, x0)
        return a.sqrt() * noise - (1.0 - a).sqrt() * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to predict: eps itself, or v."""
        return noise if self.prediction_type == "epsilon" else self.velocity(x0, noise, t)

    # Conversions between what a model outputs and the quantities samplers need.
    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _gather(self.alphas_cumprod, t, x_t)
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _gather(self.alphas_cumprod, t, x_t)
        return (x_t - a.sqrt() * x0) / (1.0 - a).sqrt()

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _gather(self.alphas_cumprod, t, x_t)
        return a.sqrt() * x_t - (1.0 - a).sqrt() * v

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _gather(self.alphas_cumprod, t, x_t)
        return (1.0 - a).sqrt() * x_t + a.sqrt() * v

    def v_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.velocity(self.x0_from_eps(x_t, eps, t), eps, t)

    def predict_x0_and_eps(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a model output of this schedule's prediction type into (x0, eps)."""
        if self.prediction_type == "epsilon":
            return self.x0_from_eps(x_t, model_output, t), model_output
        return self.x0_from_v(x_t, model_output, t), self.eps_from_v(x_t, model_output, t)
