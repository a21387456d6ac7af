"""SDXL training end to end on a tiny SDXL-shaped checkpoint: the cache stores pooled text and each image's own
size/crop conditioning, train.py builds y from them, the LoRA it writes gives the same UNet output in diffusers,
and a cache that does not fit the model is refused."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import lora
import sd
import train
from data import CacheMismatchError, LatentCache, LatentLoader, encode_dataset
from data.pipeline import SIZE_CONDITIONING
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict

pytest.importorskip("diffusers")

# The tiny VAE halves once, so any even side works; a bucket step of 4 keeps buckets distinct at 16 px.
FAST = dict(resolution=16, bucket=True, bucket_step=4, progress=False, workers=0)
# (width, height) of the training pictures: square, landscape and portrait, so they land in different buckets.
SIZES = [(32, 32), (64, 32), (30, 45), (32, 32)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl_train")
    tensors = tiny_state_dict("sdxl", seed=7)
    ckpt = write_state_dict(root / "xl.safetensors", tensors)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(["a red circle", "a blue square", "a green star", "a red circle"][i])
    cache = root / "cache"
    encode_dataset(images, cache, ckpt, flip=True, **FAST)
    return {"root": root, "tensors": tensors, "ckpt": str(ckpt), "images": str(images), "cache": str(cache)}


@pytest.fixture(scope="module")
def model(world):
    return sd.load(world["ckpt"])


def test_cache_stores_pooled_text_and_each_images_own_sizes(world, model):
    cache = LatentCache(world["cache"])
    m = cache.manifest
    assert m["model"]["version"] == "sdxl" and m["model"]["pad_ids"] == list(model.text_encoder.pad_ids)
    assert m["model"]["pooled_dim"] == model.text_encoder.config.pooled_dim and "pad_id" not in m["model"]
    assert m["model"]["context_dim"] == model.unet.cfg.context_dim
    assert m["text"]["pooled"] is True and m["size_conditioning"] == list(SIZE_CONDITIONING)
    assert cache.has_pooled and cache.has_size_conditioning and cache.version == "sdxl"

    buckets = set()
    for index, item in enumerate(cache.items):
        (ow, oh), (bw, bh), (top, left) = item.original_size, item.bucket, item.crop
        assert (ow, oh) == SIZES[int(item.file.rsplit("/", 1)[1].split(".")[0])]
        resized_w = m["items"][index]["resized"][0]
        # original (h, w), crop (top, left) in the resized image, target = the bucket's (h, w); the mirror
        # image's crop is counted from the other side.
        assert item.size_conditioning == {"plain": [oh, ow, top, left, bh, bw],
                                          "flip": [oh, ow, top, resized_w - bw - left, bh, bw]}
        assert torch.equal(cache.size_conditioning(index, "flip"),
                           torch.tensor([oh, ow, top, resized_w - bw - left, bh, bw], dtype=torch.float32))
        buckets.add((bw, bh))
    assert len(buckets) == 3  # square, landscape, portrait: each image is conditioned on its own bucket
    assert any(it.crop != (0, 0) for it in cache.items)  # some image was really cropped

    # Context, pooled vector and both towers' tokens are what the model computes for the caption.
    with torch.no_grad():
        context, pooled = model.encode_text([it.caption for it in cache.items] + [""])
    tokens_l, tokens_g = model.tokenize([it.caption for it in cache.items])
    for index in range(len(cache)):
        torch.testing.assert_close(cache.context(index).float(), context[index], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(cache.pooled(index).float(), pooled[index], atol=2e-3, rtol=2e-3)
        assert torch.equal(cache.tokens(index), tokens_l[index]) and torch.equal(cache.tokens_g(index), tokens_g[index])
    torch.testing.assert_close(cache.empty_pooled().float(), pooled[-1], atol=2e-3, rtol=2e-3)

    # The loader hands each row the sizes of the variant it drew.
    loader = LatentLoader(cache, batch_size=2, seed=3)
    for step in range(4):
        batch = loader.batch(step)
        assert batch.pooled.shape == (len(batch.indices), model.text_encoder.config.pooled_dim)
        for row, (index, flipped) in enumerate(zip(batch.indices, batch.flipped)):
            want = cache.size_conditioning(index, "flip" if flipped else "plain")
            assert torch.equal(batch.size_conditioning[row], want)
            assert torch.equal(batch.pooled[row], cache.pooled(index).float())
    assert any(f for s in range(4) for f in loader.batch(s).flipped)


def test_sd1_caches_are_unchanged(tmp_path, world):
    ckpt = write_state_dict(tmp_path / "sd1.safetensors", tiny_state_dict("sd1", seed=0))
    encode_dataset(world["images"], tmp_path / "cache", ckpt, **FAST)
    cache = LatentCache(tmp_path / "cache")
    m = cache.manifest
    assert "size_conditioning" not in m and set(m["text"]) == {"embeddings", "layer"}
    assert "pad_id" in m["model"] and "pooled_dim" not in m["model"]
    assert all("size_conditioning" not in it for it in m["items"])
    batch = LatentLoader(cache, batch_size=2).batch(0)
    assert batch.pooled is None and batch.size_conditioning is None and batch.tokens_g is None
    with pytest.raises(CacheMismatchError, match="sd1 model in the cache, sdxl asked for"):
        cache.check(version="sdxl")


def args(world, out, **overrides) -> list[str]:
    base = {"ckpt": world["ckpt"], "images": world["images"], "cache": world["cache"], "resolution": 16,
            "bucket": True, "bucket_step": 4, "flip": True, "out": str(out), "precision": "fp32", "steps": 3,
            "batch_size": 2, "lr": 1e-2, "rank": 4, "alpha": 2, "targets": "attn-mlp", "toy_eval": False, "seed": 0}
    base.update(overrides)
    return [f"--{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A UNet LoRA trained through train.main with prior preservation and a validation image."""
    out = tmp_path_factory.mktemp("xl_run")
    assert train.main(args(world, out, class_prompt="a circle", num_class_images=2, validation_steps=2,
                           validation_prompts="a red circle")) == 0
    return out


def test_unet_lora_trains_with_prior_preservation_and_validation(trained):
    lines = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in lines)
    assert (trained / "lora_final.safetensors").is_file() and (trained / "samples" / "step_0000003.png").is_file()
    classes = LatentCache(trained / "class_cache")
    assert classes.has_pooled and classes.has_size_conditioning
    assert classes.items[0].size_conditioning["plain"] == [16, 16, 0, 0, 16, 16]  # generated at 16 x 16
    with safe_open(str(trained / "lora_final.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in keys
    assert not any(k.startswith("lora_te") for k in keys)


def test_trained_lora_gives_the_same_unet_output_in_diffusers(world, trained):
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as Loader
    from test_sdxl import diffusers_sdxl_unet, unet_part

    path = trained / "lora_final.safetensors"
    ours = sd.load(world["ckpt"])
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 6, generator=g), torch.tensor([50, 800])
    with torch.no_grad():
        context, pooled = ours.encode_text(["a red circle", "a green star"])
        original, crop, target = torch.tensor([[32, 48], [45, 30]]), torch.tensor([[0, 2], [3, 0]]), (16, 12)
        y = ours.vector(pooled, original, crop, target)
        base = ours.unet(x, t, context, y)
        lora.load(path, ours)
        want = ours.unet(x, t, context, y)

    ref = diffusers_sdxl_unet(ours.unet.cfg, unet_part(world["tensors"]))
    state_dict, alphas = Loader.lora_state_dict(str(path), unet_config=ref.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unmatched key would only be a warning in diffusers
        Loader.load_lora_into_unet(dict(state_dict), alphas, ref, adapter_name="trained")
    time_ids = torch.cat([original, crop, torch.tensor([target, target])], dim=1).float()
    with torch.no_grad():
        got = ref(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert float((base - want).abs().max() / want.abs().max()) > 1e-3  # training changed the UNet


def test_text_encoder_lora_trains_on_both_towers(world, tmp_path):
    out = tmp_path / "te"
    assert train.main(args(world, out, cache=str(tmp_path / "tokens_cache"), steps=2, train_text_encoder=True)) == 0
    tokens_only = LatentCache(tmp_path / "tokens_cache")
    assert not tokens_only.has_context and tokens_only.tokens_g(0).shape == (77,)
    with safe_open(str(out / "lora_final.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in keys
    # bigG's packed q/k/v are adapted too, and written as sd-scripts' three modules.
    for x in "qkv":
        assert f"lora_te2_text_model_encoder_layers_0_self_attn_{x}_proj.lora_up.weight" in keys
    fresh = sd.load(world["ckpt"])
    lora.load(out / "lora_final.safetensors", fresh)
    assert lora.lora_layers(fresh.text_encoder.embedders[1]) and lora.lora_layers(fresh.unet)
    qkv = [layer for layer in lora.lora_layers(fresh.text_encoder) if isinstance(layer, lora.PackedLoRA)]
    assert len(qkv) == fresh.text_encoder.embedders[1].config.layers
    assert all(layer.lora_up[x].abs().max() > 0 for layer in qkv[:1] for x in "qkv")  # B moved from its zero start
    merged = sd.load(world["ckpt"])
    lora.load(out / "lora_final.safetensors", merged, merge=True)
    with torch.no_grad():
        for got, want in zip(fresh.encode_text(["a red circle"]), merged.encode_text(["a red circle"])):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_caption_dropout_zeroes_sdxl_text_but_keeps_sizes(world, model):
    loader = LatentLoader(world["cache"], batch_size=2, seed=0)
    batch = next(b for b in loader.iterate(0, len(loader)) if len(b.indices) == 2)  # the square bucket's pair
    autocast = torch.autocast("cpu", enabled=False)
    keep, y_keep = train.conditioning(model, batch, autocast, torch.float32)
    drop = torch.tensor([True, False])
    context, y = train.conditioning(model, batch, autocast, torch.float32, drop=drop)
    pooled_dim = model.text_encoder.config.pooled_dim
    assert context[0].abs().max() == 0 and y[0, :pooled_dim].abs().max() == 0
    assert torch.equal(context[1], keep[1]) and torch.equal(y[1], y_keep[1])
    assert torch.equal(y[0, pooled_dim:], y_keep[0, pooled_dim:])  # the size conditioning stays
    torch.testing.assert_close(y_keep, model.vector(batch.pooled, batch.size_conditioning[:, :2],
                                                    batch.size_conditioning[:, 2:4], batch.size_conditioning[:, 4:]))
    assert train.caption_drop_mask(0.0, 4, 0, 0) is None
    assert torch.equal(train.caption_drop_mask(0.5, 64, 1, 2), train.caption_drop_mask(0.5, 64, 1, 2))


def test_a_cache_that_does_not_fit_is_refused(world, model, tmp_path):
    # Made for another checkpoint: refused before training, as for SD1.
    sd1 = write_state_dict(tmp_path / "sd1.safetensors", tiny_state_dict("sd1", seed=0))
    sd1_cache = tmp_path / "sd1_cache"
    encode_dataset(world["images"], sd1_cache, sd1, **FAST)
    with pytest.raises(CacheMismatchError, match="another model"):
        train.main(args(world, tmp_path / "run1", cache=str(sd1_cache)))
    # An SDXL cache without the size conditioning (or pooled vector) cannot build y: refused with the reason.
    cache = LatentCache(world["cache"])
    manifest = json.loads(json.dumps(cache.manifest))
    del manifest["size_conditioning"]
    manifest["text"]["pooled"] = False
    cache.manifest = manifest
    with pytest.raises(CacheMismatchError, match="no SDXL size conditioning.*without SDXL's pooled"):
        cache.check(version="sdxl")
    with pytest.raises(CacheMismatchError, match="a sdxl model in the cache, sd1 asked for"):
        LatentCache(world["cache"]).check(version="sd1")
    with pytest.raises(CacheMismatchError, match="context width"):
        LatentCache(world["cache"]).check(context_dim=768)
    # SDXL's text layers are fixed.
    with pytest.raises(ValueError, match="text_layer"):
        encode_dataset(world["images"], tmp_path / "layer_cache", model, text_layer="last", **FAST)
