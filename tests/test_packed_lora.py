"""LoRA on OpenCLIP's packed q/k/v (lora/packed.py) and the files from the wild that needed it: an sd-scripts SDXL
file with te2 q/k/v loads live and equals the merged result, stacks, merges, unmerges and comes off exactly, samples
live and with sample.py --merge; and two edge cases of reading alpha (peft's use_rslora beside an explicit .alpha,
alpha 0)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import lora
import sample
import sd
from lora import packed
from lora.names import unet_to_diffusers
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict

from helpers import randomize, randomize_lora

PROMPTS = ["a red circle", "a photo of a cat on a chair"]
# fp32: live and merged differ only in rounding (live LoRA layers add s·B(A·x) to W0·x; merged ones use W0 + s·B·A)
TOL = dict(atol=1e-5, rtol=1e-5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def sd_scripts_sdxl_file(path: Path, model, seed: int = 0, qkv: bool = True) -> dict[str, torch.Tensor]:
    """An SDXL LoRA laid out as sd-scripts writes it: te2 q/k/v/out_proj and MLP, te1 q_proj, a UNet projection.
    Layer 0 of te2 has thirds of different ranks, layer 1 only q and v (what a resized or peft-style file can hold)."""
    g = torch.Generator().manual_seed(seed)
    te2 = model.text_encoder.embedders[1].config
    w = te2.width
    modules = {}  # name -> (in, out, rank, alpha)
    for i in range(te2.layers):
        for proj, rank in {"q_proj": 2, "k_proj": 3 if i == 0 else 2, "v_proj": 2, "out_proj": 2}.items():
            if qkv and not (i == 1 and proj == "k_proj") or proj == "out_proj":
                modules[f"lora_te2_text_model_encoder_layers_{i}_self_attn_{proj}"] = (w, w, rank, 1.0 + i)
        modules[f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1"] = (w, te2.mlp_width, 2, 1.0)
    te1 = model.text_encoder.embedders[0].config.width
    modules["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] = (te1, te1, 2, 2.0)
    to_q = model.unet.get_submodule("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] = (to_q.in_features, to_q.out_features, 4, 2)
    tensors = {}
    for key, (d_in, d_out, rank, alpha) in modules.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, d_in, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(d_out, rank, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora",
                                            "ss_base_model_version": "sdxl_base_v1-0"})
    return tensors


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    ckpt = write_state_dict(root / "xl.safetensors", tiny_state_dict("sdxl", seed=5))
    model = sd.load(ckpt)
    tensors = sd_scripts_sdxl_file(root / "qkv.safetensors", model)
    sd_scripts_sdxl_file(root / "other.safetensors", model, seed=1)
    sd_scripts_sdxl_file(root / "no_qkv.safetensors", model, qkv=False)
    return {"root": root, "ckpt": ckpt, "file": root / "qkv.safetensors", "other": root / "other.safetensors",
            "no_qkv": root / "no_qkv.safetensors", "tensors": tensors}


def outputs(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context, pooled, UNet output) for fixed prompts and inputs."""
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600])
    with torch.no_grad():
        context, pooled = model.encode_text(PROMPTS)
        return context, pooled, model.unet(x, t, context, model.vector(pooled, (64, 64)))


def te2(model):
    return model.text_encoder.embedders[1]


def test_sd_scripts_sdxl_file_with_te2_qkv_loads_live_and_equals_merged(world):
    base = sd.load(world["ckpt"])
    want_base = outputs(base)
    live = sd.load(world["ckpt"])
    info = lora.load(world["file"], live, scale=0.8)
    packed_layers = [layer for layer in lora.lora_layers(te2(live)) if isinstance(layer, lora.PackedLoRA)]
    assert len(packed_layers) == 3 and packed_layers[0].ranks == {"q": 2, "k": 3, "v": 2}
    assert packed_layers[1].slices == ["q", "v"]  # layer 1 of the file has no k_proj: its k rows stay W0's
    assert len(info.modules) == len([k for k in world["tensors"] if k.endswith(".alpha")])
    merged = sd.load(world["ckpt"])
    lora.load(world["file"], merged, scale=0.8, merge=True)
    for got, want, base_out in zip(outputs(live), outputs(merged), want_base):
        torch.testing.assert_close(got, want, **TOL)
        assert rel_err(base_out, want) > 1e-3
    # The q/k/v thirds really take part: the same file without them gives another context.
    without = sd.load(world["ckpt"])
    lora.load(world["no_qkv"], without, scale=0.8)
    width_l = live.text_encoder.config.clip_l.width
    assert rel_err(outputs(without)[0][..., width_l:], outputs(live)[0][..., width_l:]) > 1e-3

    # The weights, by the formula: W0 + multiplier·[s_q·B_q·A_q; 0; s_v·B_v·A_v] for layer 1 (no k in the file).
    key = "lora_te2_text_model_encoder_layers_1_self_attn_{}_proj"
    t = world["tensors"]
    w0 = te2(base).model.transformer.resblocks[1].attn.in_proj_weight.detach()
    delta = [0.8 * (2.0 / 2) * t[key.format(x) + ".lora_up.weight"] @ t[key.format(x) + ".lora_down.weight"]
             if x != "k" else torch.zeros(w0.shape[1], w0.shape[1]) for x in "qkv"]
    want_w = w0 + torch.cat(delta)
    torch.testing.assert_close(te2(merged).model.transformer.resblocks[1].attn.in_proj_weight.detach(), want_w, **TOL)
    prefix = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    torch.testing.assert_close(lora.merged_state_dict(live)[prefix], want_w, **TOL)
    # Under the original keys, live or not: the base's own weights (nothing was written into them).
    plain = base.state_dict()
    state = {prefix + k: v for prefix, module in live.parts.items() for k, v in lora.base_state_dict(module).items()}
    assert state.keys() == plain.keys() and all(torch.equal(state[k], plain[k]) for k in plain)
    assert set(lora.merged_state_dict(live)) == set(plain)


def test_multiplier_merge_unmerge_stacking_and_removal(world):
    model = sd.load(world["ckpt"])
    base = outputs(model)
    w0 = {k: v.clone() for k, v in te2(model).state_dict().items()}
    lora.load(world["file"], model, name="a")
    one = outputs(model)
    lora.set_multiplier(model.text_encoder, 0.0, "a")
    lora.set_multiplier(model.unet, 0.0, "a")
    for got, want in zip(outputs(model), base):
        assert torch.equal(got, want)  # multiplier 0: the update is not even added
    lora.set_multiplier(model.text_encoder, 1.0, "a")
    lora.set_multiplier(model.unet, 1.0, "a")

    # Stacked with a second file: the same as both merged.
    lora.load(world["other"], model, scale=-0.5, name="b")
    both = outputs(model)
    ref = sd.load(world["ckpt"])
    lora.load(world["file"], ref, merge=True)
    lora.load(world["other"], ref, scale=-0.5, merge=True)
    for got, want in zip(both, outputs(ref)):
        torch.testing.assert_close(got, want, **TOL)

    # merge() folds every layer into the stored weights; unmerge() takes exactly that out again.
    attn = te2(model).model.transformer.resblocks[0].attn
    lora.merge(model.text_encoder)
    assert not torch.allclose(packed.base_weight(attn), w0["model.transformer.resblocks.0.attn.in_proj_weight"])
    for got, want in zip(outputs(model)[:2], both[:2]):
        torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(ValueError, match="merged"):
        lora.set_multiplier(model.text_encoder, 2.0)
    lora.unmerge(model.text_encoder)
    torch.testing.assert_close(packed.base_weight(attn).detach(),
                               w0["model.transformer.resblocks.0.attn.in_proj_weight"], atol=1e-6, rtol=0)

    # Taking "b" off leaves "a" alone; taking everything off gives the plain module and the base's weights back.
    lora.remove(model.text_encoder, "b")
    lora.remove(model.unet, "b")
    for got, want in zip(outputs(model), one):
        torch.testing.assert_close(got, want, **TOL)
    assert {layer.name for _, layer in lora.named_lora_layers(te2(model))} == {"a"}
    lora.remove(model.text_encoder)
    lora.remove(model.unet)
    assert type(attn).__name__ == "Attention" and set(te2(model).state_dict()) == set(w0)
    for k, v in te2(model).state_dict().items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)


def test_injected_packed_layers_train_and_round_trip_in_both_formats(world, tmp_path):
    model = sd.load(world["ckpt"])
    paths = lora.inject(model.text_encoder, rank=2, alpha=1.0, targets="attn")
    assert "embedders.1.model.transformer.resblocks.0.attn" in paths
    layer = te2(model).model.transformer.resblocks[0].attn.parametrizations.in_proj_weight[0]
    assert isinstance(layer, lora.PackedLoRA) and all(p.requires_grad for p in layer.adapter_parameters())
    assert not te2(model).model.transformer.resblocks[0].attn.parametrizations.in_proj_weight.original.requires_grad
    # B starts at zero; a backward step reaches every third's factors.
    context, pooled = model.encode_text(PROMPTS)
    (context.square().mean() + pooled.square().mean()).backward()
    assert all(layer.lora_up[x].grad.abs().sum() > 0 for x in "qkv")
    randomize_lora(model.text_encoder)
    want = outputs(model)[:2]
    for fmt, key in [("kohya", "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight"),
                     ("diffusers", "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight")]:
        path = tmp_path / f"{fmt}.safetensors"
        lora.save(path, model.text_encoder, format=fmt)
        with safe_open(str(path), "pt") as f:
            assert key in set(f.keys())
        fresh = sd.load(world["ckpt"])
        lora.load(path, fresh.text_encoder)
        for got, ref in zip(outputs(fresh)[:2], want):
            torch.testing.assert_close(got, ref, **TOL)


def test_packed_layer_refuses_what_it_cannot_do():
    from text import OpenClipConfig, OpenClipTextEncoder
    te = randomize(OpenClipTextEncoder(OpenClipConfig.tiny()))
    with pytest.raises(ValueError, match="packed q/k/v"):
        lora.inject(te, rank=2, targets=["*.resblocks.0.attn"], dropout=0.1)
    # A preset leaves them out where they cannot be adapted, and says so by the paths it returns.
    paths = lora.inject(te, rank=2, targets="attn", dropout=0.1)
    assert "model.transformer.resblocks.0.attn.out_proj" in paths and "model.transformer.resblocks.0.attn" not in paths


# ------------------------------------------------------------------------------------------------- sample.py

def run_sample(*argv) -> list[Path]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert sample.main([*map(str, argv), "--quiet"]) == 0
    return [Path(line) for line in out.getvalue().split()]


def test_sample_cli_with_te2_qkv_file_live_and_merged(world, tmp_path):
    args = ["--ckpt", world["ckpt"], "--prompt", "a red circle", "--lora", f"{world['file']}:0.9", "--steps", "2",
            "--size", "16x16", "--seed", "1", "--cfg", "3"]
    [live] = run_sample(*args, "--out", tmp_path / "live")
    [merged] = run_sample(*args, "--merge", "--out", tmp_path / "merged")
    [plain] = run_sample(*args[:4], *args[6:], "--out", tmp_path / "base")
    a, b, c = (np.asarray(Image.open(p), dtype=np.int16) for p in (live, merged, plain))
    assert np.abs(a - b).max() <= 1  # the same image (8-bit rounding of fp32 values that agree to ~1e-6)
    assert np.abs(a - c).max() > 1  # and the LoRA changed it


def test_sample_cli_merge_refuses_lora_scales(world, capsys):
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--ckpt", str(world["ckpt"]), "--prompt", "x", "--lora", str(world["file"]), "--merge",
                     "--lora-scales", "0,1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--merge" in err[0] and "--lora-scales" in err[0]


# --------------------------------------------------------------------------------------------- reading alpha

def one_module_file(path: Path, unet, *, fmt: str, alpha: float, metadata: dict | None = None, rank: int = 4):
    """One attention projection of a tiny SD1 UNet, in the kohya or the diffusers layout, with an explicit alpha."""
    mpath = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    layer = unet.get_submodule(mpath)
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(rank, layer.in_features, generator=g), torch.randn(layer.out_features, rank, generator=g)
    name = unet_to_diffusers(mpath, unet.cfg.num_res_blocks)
    if fmt == "kohya":
        key = "lora_unet_" + name.replace(".", "_")
        tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    else:
        key = "unet." + name
        tensors = {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata=metadata)
    return mpath, up @ down


@pytest.mark.parametrize("fmt, alpha, metadata, scale", [
    # peft's use_rslora in diffusers' metadata beside an explicit .alpha: alpha/sqrt(r) = 16/2, not 16/4.
    ("diffusers", 16.0, {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 16, "use_rslora": True})}, 8.0),
    ("diffusers", 16.0, {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 16})}, 4.0),
    # alpha 0, read as sd-scripts reads it: alpha = rank, scale 1 (live and merged alike).
    ("kohya", 0.0, None, 1.0),
    ("diffusers", 0.0, None, 1.0),
])
def test_alpha_edge_cases(tmp_path, fmt, alpha, metadata, scale):
    from unet import UNetConfig, UNetModel
    unet = randomize(UNetModel(UNetConfig.tiny_sd1())).eval()
    path = tmp_path / "one.safetensors"
    mpath, ba = one_module_file(path, unet, fmt=fmt, alpha=alpha, metadata=metadata)
    w0 = unet.get_submodule(mpath).weight.detach().clone()
    lora.load(path, unet)
    layer = unet.get_submodule(mpath)
    assert layer.scale == pytest.approx(scale)
    merged = randomize(UNetModel(UNetConfig.tiny_sd1())).eval()
    lora.load(path, merged, merge=True)
    torch.testing.assert_close(merged.get_submodule(mpath).weight.detach(), w0 + scale * ba, **TOL)
    torch.testing.assert_close(lora.base_state_dict(unet, merged=True)[mpath + ".weight"], w0 + scale * ba, **TOL)
