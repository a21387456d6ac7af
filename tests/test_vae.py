"""Tests for vae/: original key layout, config inference, and numerical parity with diffusers' AutoencoderKL."""
import pytest
import torch
import torch.nn.functional as F

from sd import CheckpointError, check_fits
from vae import SD_SCALE, AutoencoderKL, DiagonalGaussian, VAEConfig, scale_factor
from vae.model import Downsample

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402


def randomized(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """A model whose every parameter is random and non-zero (norm affines included), scaled to stay finite."""
    torch.manual_seed(seed)
    model = AutoencoderKL(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    return model.eval()


def diffusers_vae(cfg: VAEConfig) -> "diffusers.AutoencoderKL":
    n = len(cfg.ch_mult)
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups, sample_size=64,
    )


def to_diffusers(model: AutoencoderKL) -> "diffusers.AutoencoderKL":
    ref = diffusers_vae(model.cfg).eval()
    ldm = {"first_stage_model." + k: v for k, v in model.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(ldm, ref.config)
    ref.load_state_dict(converted, strict=True)
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---------------------------------------------------------------- layout


def test_key_names_match_original_layout():
    with torch.device("meta"):
        keys = set(AutoencoderKL(VAEConfig.sd()).state_dict())
    for k in [
        "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.norm.weight", "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.k.weight", "encoder.mid.attn_1.v.weight", "encoder.mid.attn_1.proj_out.weight",
        "encoder.mid.block_2.norm2.bias", "encoder.norm_out.weight", "encoder.conv_out.weight",
        "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_in.weight", "decoder.mid.attn_1.q.bias",
        "decoder.up.3.block.2.conv2.weight", "decoder.up.1.upsample.conv.weight", "decoder.up.3.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.norm_out.bias", "decoder.conv_out.weight",
    ]:
        assert k in keys, k
    for k in ["encoder.down.3.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
              "encoder.down.0.block.0.nin_shortcut.weight", "decoder.up.2.block.0.nin_shortcut.weight"]:
        assert k not in keys, k
    assert not any(".attn." in k or "temb" in k for k in keys)


def test_full_size_matches_diffusers_on_meta():
    """Every original key is consumed by diffusers' converter and lands on a diffusers parameter of the same shape."""
    cfg = VAEConfig.sd()
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = diffusers_vae(cfg)
    ours_sd = ours.state_dict()
    converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ours_sd.items()}, ref.config)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(converted) == len(ours_sd)
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == 83_653_863
    assert list(ours.buffers()) == []


def test_strict_round_trip_and_meta_load():
    cfg = VAEConfig.tiny()
    a = randomized(cfg, seed=1)
    with torch.device("meta"):
        b = AutoencoderKL(cfg)
    b.load_state_dict(a.state_dict(), strict=True, assign=True)
    b.eval()
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(a.decode(a.encode(x).mean), b.decode(b.encode(x).mean))
    assert set(b.state_dict()) == set(a.state_dict())


# ---------------------------------------------------------------- config inference


@pytest.mark.parametrize("cfg", [VAEConfig.tiny(), VAEConfig.sd(), VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=3,
                                                                              z_channels=8, embed_dim=6, out_ch=1)])
def test_from_state_dict_round_trip(cfg):
    with torch.device("meta"):
        sd = AutoencoderKL(cfg).state_dict()
    assert VAEConfig.from_state_dict(sd) == cfg


def test_from_state_dict_rejects_bad_input():
    with torch.device("meta"):
        sd = AutoencoderKL(VAEConfig.tiny()).state_dict()
    with pytest.raises(ValueError, match="first_stage_model"):
        VAEConfig.from_state_dict({"first_stage_model." + k: v for k, v in sd.items()})
    with pytest.raises(ValueError, match="decoder.conv_in.weight"):
        VAEConfig.from_state_dict({"input_blocks.0.0.weight": torch.empty(4, 4, 3, 3, device="meta")})


def test_a_state_dict_that_does_not_fit_is_named_key_by_key():
    """The config reads only the sizes; whether every key and shape fits is sd.load's one check (sd.check_fits)."""
    with torch.device("meta"):
        sd = AutoencoderKL(VAEConfig.tiny()).state_dict()
    broken = dict(sd)
    del broken["decoder.up.0.block.1.conv2.bias"]
    broken["encoder.down.0.attn.0.q.weight"] = torch.empty(1, device="meta")
    wrong = dict(sd, **{"decoder.mid.attn_1.q.weight": torch.empty(64, 64, device="meta")})
    for state, keys in ((broken, ["decoder.up.0.block.1.conv2.bias", "encoder.down.0.attn.0.q.weight"]),
                        (wrong, ["decoder.mid.attn_1.q.weight"])):
        with torch.device("meta"):
            model = AutoencoderKL(VAEConfig.from_state_dict(state))
        with pytest.raises(CheckpointError) as err:
            check_fits(model, state, "vae")
        assert all(k in str(err.value) for k in keys), str(err.value)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("size", [(16, 20), (17, 13)])
def test_parity_with_diffusers(size):
    """fp32, random non-zero weights, even and odd input sizes (odd sizes exercise the bottom/right-only padding)."""
    model = randomized(VAEConfig.tiny(), seed=2)
    ref = to_diffusers(model)
    torch.manual_seed(3)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        post, ref_post = model.encode(x), ref.encode(x).latent_dist
        assert post.mean.shape == ref_post.mean.shape == (2, 4, size[0] // 2, size[1] // 2)  # n -> n // 2
        assert post.mean.abs().max() > 1e-2 and post.logvar.std() > 1e-2  # non-degenerate outputs
        assert rel_err(post.mean, ref_post.mean) < 1e-5
        assert rel_err(post.logvar, ref_post.logvar) < 1e-5
        z = torch.randn(2, 4, 9, 6)
        out, ref_out = model.decode(z), ref.decode(z).sample
        assert out.shape == (2, 3, 18, 12)
        assert rel_err(out, ref_out) < 1e-5


def test_downsample_pads_bottom_right_only():
    down = Downsample(1)
    x = torch.arange(1.0, 1 + 7 * 6).reshape(1, 1, 7, 6)
    with torch.no_grad():
        down.conv.bias.zero_()
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1  # top-left tap: windows must start at pixel (0, 0)
        # 7 rows -> 3: the window starting at row 6 would need two rows past the single pad row
        assert torch.equal(down(x), x[..., 0:5:2, 0:6:2])
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1  # bottom-right tap: reads the zero padding past the last row/column
        assert torch.equal(down(x), F.pad(x, (0, 1, 0, 1))[..., 2:7:2, 2:7:2])
        assert torch.equal(down(x)[..., -1], torch.zeros(1, 1, 3))  # even width: last column reads the padding
        assert (down(x)[..., :-1] != 0).all()  # odd height: the last row never reaches the padding


def test_bf16_runs_and_tracks_fp32():
    model = randomized(VAEConfig.tiny(), seed=4)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = model.decode(model.encode(x).mean)
        m16 = model.to(torch.bfloat16)
        post = m16.encode(x.bfloat16())
        out = m16.decode(post.sample(torch.Generator().manual_seed(0)))
    assert post.mean.dtype == out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    with torch.no_grad():
        assert rel_err(m16.decode(post.mean), ref) < 0.1


def test_sliced_decode_and_encode_match_full():
    model = randomized(VAEConfig.tiny(), seed=5)
    z = torch.randn(5, 4, 6, 6)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z, slice_size=2), model.decode(z), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.encode(x, slice_size=1).mean, model.encode(x).mean, rtol=1e-4, atol=1e-5)


def test_gaussian_and_scaling():
    moments = torch.randn(2, 8, 3, 3)
    moments[:, 4:, 0, 0] = 50.0  # log-variance beyond the clamp
    moments[:, 4:, 0, 1] = -50.0
    g = DiagonalGaussian(moments)
    assert torch.equal(g.mode(), moments[:, :4])
    assert g.logvar.max() == 20.0 and g.logvar.min() == -30.0
    torch.testing.assert_close(g.std, torch.exp(0.5 * g.logvar))
    s1, s2 = g.sample(torch.Generator().manual_seed(7)), g.sample(torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and not torch.equal(s1, g.mean)

    assert scale_factor("sd1") == scale_factor("SD2") == SD_SCALE == 0.18215
    assert scale_factor("sdxl") == 0.13025
    with pytest.raises(ValueError, match="sd3"):
        scale_factor("sd3")

    model = randomized(VAEConfig.tiny(), seed=6)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        lat = model.encode_latents(x, torch.Generator().manual_seed(1))
        torch.testing.assert_close(lat, model.encode(x).sample(torch.Generator().manual_seed(1)) * SD_SCALE)
        torch.testing.assert_close(model.decode_latents(lat), model.decode(lat / SD_SCALE))
        torch.testing.assert_close(model.decode_latents(lat, scale=0.13025), model.decode(lat / 0.13025))


def test_attention_gets_contiguous_tokens(monkeypatch):
    # With channels strided, PyTorch's CPU attention takes its plain path and holds the whole (h·w)² score matrix:
    # 16 GiB for a 256x256 latent. Contiguous tokens let it stream the scores in blocks.
    import vae.model as vm

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(all(t.is_contiguous() for t in (q, k, v)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(vm.F, "scaled_dot_product_attention", spy)
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 8, 8))
    assert seen and all(seen)
