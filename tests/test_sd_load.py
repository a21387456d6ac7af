"""sd.load: original-layout files load strictly, round-trip exactly, and bad files fail early with clear errors."""
from __future__ import annotations

import os
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import sd
from sd.checkpoint import CheckpointError, write_state_dict
from sd.tiny import tiny_state_dict


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny(request, tmp_path_factory):
    """(version, state dict, .safetensors path, .ckpt path with the extra keys real files carry)."""
    version = request.param
    tensors = tiny_state_dict(version, seed=3)
    folder = tmp_path_factory.mktemp(version)
    st = write_state_dict(folder / "model.safetensors", tensors)
    extras = {
        "betas": torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64),
        "alphas_cumprod": torch.rand(1000, dtype=torch.float64),
        "posterior_mean_coef1": torch.rand(1000, dtype=torch.float64),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(10),
        "model_ema.diffusion_modelout2weight": torch.randn(4),
    }
    if version == "sd1":
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ckpt = folder / "model.ckpt"
    torch.save({"state_dict": {**tensors, **extras}, "global_step": 470000, "epoch": 6}, ckpt)
    return version, tensors, st, ckpt


def test_safetensors_round_trip_is_exact(tiny, tmp_path):
    version, tensors, st, _ = tiny
    model = sd.load(st)
    assert model.version == version
    state = model.state_dict()
    assert set(state) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(state[k], v), k
    out = model.save(tmp_path / "again.safetensors")
    again = sd.load(out).state_dict()
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


def test_ckpt_with_extra_keys_loads_the_same_model(tiny):
    _, tensors, st, ckpt = tiny
    a, b = sd.load(st).state_dict(), sd.load(ckpt).state_dict()
    assert set(a) == set(b) == set(tensors)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ckpt_save_writes_an_original_state_dict(tiny, tmp_path):
    _, tensors, st, _ = tiny
    out = sd.load(st).save(tmp_path / "out.ckpt")
    obj = torch.load(out, weights_only=True)
    assert set(obj["state_dict"]) == set(tensors)


def test_loads_straight_into_bf16(tiny):
    _, tensors, st, _ = tiny
    model = sd.load(st, dtype=torch.bfloat16)
    for module in model.parts.values():
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())
        assert not any(p.requires_grad for p in module.parameters())
        assert not any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))
    ctx = model.encode_prompt(["a red square", "two blue circles"])
    assert ctx.dtype == torch.bfloat16 and ctx.shape[:2] == (2, 77)
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    out = model.unet(x, torch.tensor([10, 500]), ctx)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def test_image_latent_round_trip_shapes(tiny):
    _, _, st, _ = tiny
    model = sd.load(st)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    z = model.encode_images(images, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 8)  # the tiny VAE has two levels: a factor of 2
    assert model.decode_latents(z).shape == images.shape


def test_prediction_type_from_metadata_and_override(tmp_path):
    tensors = tiny_state_dict("sd2")
    path = tmp_path / "v.safetensors"
    save_file(tensors, path, metadata={"modelspec.prediction_type": "v"})
    assert sd.load(path).prediction_type == "v_prediction"
    assert sd.load(path).schedule.prediction_type == "v_prediction"
    assert sd.load(path, prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        sd.load(path, prediction_type="sample")


def test_v_model_detected_by_its_norm_biases(tmp_path):
    tensors = tiny_state_dict("sd2")
    last = max((k for k in tensors if k.endswith("transformer_blocks.0.norm1.bias") and ".output_blocks." in k),
               key=lambda k: int(k.split("output_blocks.")[1].split(".")[0]))
    tensors[last] = torch.randn_like(tensors[last]) * 0.5
    path = write_state_dict(tmp_path / "v.safetensors", tensors)
    assert sd.load(path).prediction_type == "v_prediction"


# ---- bad input: one clear error naming the file and the keys, before anything is half-loaded ----

def test_not_a_checkpoint(tmp_path):
    for name, data in (("notes.safetensors", b"hello, I am text"), ("notes.ckpt", b"hello, I am text")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            sd.load(path)
    with pytest.raises(CheckpointError, match="no such file"):
        sd.load(tmp_path / "missing.safetensors")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        sd.load(tmp_path / "empty.ckpt")


def test_truncated_files(tiny, tmp_path):
    _, _, st, ckpt = tiny
    for src in (st, ckpt):
        cut = tmp_path / ("cut" + src.suffix)
        data = src.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="cut"):
            sd.load(cut)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="xl.safetensors"):
        sd.load(path)
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(CheckpointError, match="LoRA file"):
        sd.load(path)
    path = tmp_path / "odd.safetensors"
    tensors = tiny_state_dict("sd1")
    tensors = {k.replace("cond_stage_model.transformer.", "cond_stage_model.t5."): v for k, v in tensors.items()}
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="unknown text encoder"):
        sd.load(path)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    base = tiny_state_dict("sd1")
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    cases = {
        "missing": {k: v for k, v in base.items() if k != key},
        "unexpected": {**base, "model.diffusion_model.input_blocks.1.1.extra.weight": torch.zeros(2)},
        "stray": {**base, "some_other_model.weight": torch.zeros(2)},
        "shape": {**base, key: torch.zeros(3, 3)},
        "nopart": {k: v for k, v in base.items() if not k.startswith("first_stage_model.")},
    }
    expect = {"missing": "to_q", "unexpected": "extra.weight", "stray": "some_other_model",
              "shape": "to_q", "nopart": "first_stage_model"}
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        with pytest.raises(CheckpointError) as err:
            sd.load(path)
        assert path.name in str(err.value) and expect[name] in str(err.value), (name, str(err.value))


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sd_load_pickle_was_executed",))


def test_pickle_that_needs_code_is_refused_and_never_run(tmp_path):
    marker = "/tmp/sd_load_pickle_was_executed"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_state_dict("sd1"), "payload": _Boom()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        sd.load(path)
    assert not os.path.exists(marker)


def test_lightning_callback_in_ckpt_is_tolerated(tmp_path):
    """Released .ckpt files pickle a pytorch_lightning ModelCheckpoint beside the weights; it is data, not code."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        sys.modules[name] = mod if name == mod.__name__ else types.ModuleType(name)
    try:
        cb = ModelCheckpoint()
        cb.monitor, cb.save_top_k = None, -1
        path = tmp_path / "lightning.ckpt"
        torch.save({"state_dict": tiny_state_dict("sd1"), "callbacks": {ModelCheckpoint: {"best": 0.1}}, "cb": cb}, path)
    finally:
        for name in names:
            sys.modules.pop(name, None)
    assert sd.load(path).version == "sd1"


def test_atomic_writes_leave_the_old_file_on_error_and_give_normal_permissions(tmp_path):
    import os

    from atomic import atomic_path
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        open(tmp, "wb").write(b"new")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_atomic_write_text_replaces_the_file_and_leaves_no_temp(tmp_path):
    from atomic import write_text
    target = tmp_path / "scores.json"
    target.write_text("old")
    assert write_text(target, '{"a": 1}\n') == target
    assert target.read_text() == '{"a": 1}\n' and list(tmp_path.iterdir()) == [target]
