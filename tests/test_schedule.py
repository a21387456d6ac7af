"""The DDPM schedule matches the reference betas and its conversions invert each other."""
import math

import pytest
import torch

from schedule import DDPMSchedule, scaled_linear_betas


def test_scaled_linear_betas_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = DDPMSchedule()
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod.float(), rtol=1e-6, atol=1e-7)
    assert scaled_linear_betas().dtype == torch.float64
    assert math.isclose(float(scaled_linear_betas()[0]), 0.00085, rel_tol=1e-12)
    assert math.isclose(float(scaled_linear_betas()[-1]), 0.012, rel_tol=1e-12)


def test_add_noise_and_velocity_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ours = DDPMSchedule()
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_conversions_invert_each_other():
    s = DDPMSchedule(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 400, 990])
    x_t = s.add_noise(x0, eps, t)
    v = s.velocity(x0, eps, t)
    torch.testing.assert_close(s.x0_from_eps(x_t, eps, t), x0)
    torch.testing.assert_close(s.eps_from_x0(x_t, x0, t), eps)
    torch.testing.assert_close(s.x0_from_v(x_t, v, t), x0)
    torch.testing.assert_close(s.eps_from_v(x_t, v, t), eps)
    torch.testing.assert_close(s.v_from_eps(x_t, eps, t), v)
    x0_hat, eps_hat = s.predict_x0_and_eps(x_t, v, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    assert torch.equal(s.target(x0, eps, t), v)
    assert torch.equal(DDPMSchedule().target(x0, eps, t), eps)


def test_snr_is_alpha_over_one_minus_alpha():
    s = DDPMSchedule()
    t = torch.tensor([0, 999])
    a = s.alphas_cumprod[t]
    torch.testing.assert_close(s.snr(t), (a / (1 - a)).float())
    assert s.snr(torch.tensor([0]))[0] > s.snr(torch.tensor([999]))[0]


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMSchedule(prediction_type="sample")
