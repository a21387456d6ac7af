"""The toy world, its detectors, the pretraining pieces and the shipped tiny model (no pretraining here)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sd
from toy import detect, world
from toy.evaluate import ddim_sample, save_grid
from vae import SD_SCALE
from toy.pretrain import (ToyConfig, Trainer, build_vae, normalise_latents, original_state_dict, parse_args,
                          world_batch)

SHIPPED = Path(__file__).resolve().parent.parent / "toy" / "tiny_sd.safetensors"


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and does not stall when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- world

def test_dataset_is_deterministic_and_item_wise():
    a, sa = world.make_dataset(12, seed=5)
    b, sb = world.make_dataset(12, seed=5)
    c, sc = world.make_dataset(4, seed=5)
    d, _ = world.make_dataset(12, seed=6)
    assert a.dtype == np.uint8 and a.shape == (12, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert np.array_equal(a, b) and sa == sb
    assert np.array_equal(a[:4], c) and sa[:4] == sc  # item i does not depend on how many items are made
    assert not np.array_equal(a, d)


def test_captions_parse_back_to_their_scenes():
    scenes = world.make_scenes(300, seed=1) + world.concept_scenes("star", 8) + world.concept_scenes("purple", 8)
    for s in scenes:
        assert world.Scene.from_caption(s.caption) == s
    assert {s.count for s in scenes} == set(world.COUNTS)
    assert world.Scene("circle", "red", "white", 1, "large", "left").caption == \
        "a large red circle on the left, white background"
    assert world.Scene("triangle", "blue", "gray", 3, "small", None).caption == \
        "three small blue triangles, gray background"


def test_bad_scenes_and_captions_raise():
    with pytest.raises(ValueError, match="position"):
        world.Scene("circle", "red", "white", 2, "small", "left")
    with pytest.raises(ValueError, match="colour 'pink'"):
        world.Scene("circle", "pink", "white")
    with pytest.raises(ValueError, match="not a caption"):
        world.Scene.from_caption("a photo of a cat")
    with pytest.raises(ValueError, match="unknown concept"):
        world.concept_scenes("heart")


def test_base_world_never_shows_the_held_out_concepts():
    scenes = world.make_scenes(500, seed=0)
    assert all(s.is_base for s in scenes)
    words = " ".join(s.caption for s in scenes).split()
    assert not {"star", "stars", "purple"} & set(words)
    assert {s.shape for s in scenes} == set(world.BASE_SHAPES)
    assert {s.colour for s in scenes} == set(world.BASE_COLOURS)
    stars, purples = world.concept_scenes("star", 16), world.concept_scenes("purple", 16)
    assert all(s.shape == "star" for s in stars) and {s.colour for s in stars} == set(world.BASE_COLOURS)
    assert all(s.colour == "purple" for s in purples) and {s.shape for s in purples} == set(world.BASE_SHAPES)
    # evaluation prompts are not the training images' scenes
    assert world.concept_prompts("star", 16) != stars
    assert all(s.is_base for s in world.base_prompts(24))


def test_write_folder(tmp_path):
    images, scenes = world.concept_dataset("star", 3)
    folder = world.write_folder(tmp_path / "10_star", images, scenes)
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt",
                                                        "0002.png", "0002.txt"]
    assert (folder / "0001.txt").read_text().strip() == scenes[1].caption
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(folder / "0002.png")), images[2])
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        world.write_folder(tmp_path / "x", images, scenes[:2])


# ---------------------------------------------------------------- detectors

def test_detectors_read_ground_truth_images():
    images, scenes = world.make_dataset(150, seed=7)
    acc = detect.accuracy(images, scenes)
    assert acc["colour"] == 1.0 and acc["background"] == 1.0
    assert min(acc.values()) >= 0.95, acc
    assert detect.forgetting_score(images, scenes) >= 0.97


def test_concept_score_on_ground_truth_and_base_images():
    base, _ = world.make_dataset(60, seed=3)
    for concept in world.CONCEPTS:
        images, _ = world.concept_dataset(concept, 24, seed=4)
        assert detect.concept_score(images, concept) >= 0.95
        assert detect.concept_score(base, concept) <= 0.05


def test_detectors_are_at_chance_on_mismatched_captions_and_blind_on_noise():
    images, scenes = world.make_dataset(240, seed=8)
    shuffled = [scenes[i] for i in np.random.default_rng(0).permutation(len(scenes))]
    acc = detect.accuracy(images, shuffled)
    assert abs(acc["colour"] - 1 / 4) < 0.1 and abs(acc["shape"] - 1 / 3) < 0.1, acc
    noise = np.random.default_rng(1).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    assert detect.forgetting_score(noise, scenes[:60]) <= 0.1
    for concept in world.CONCEPTS:
        assert detect.concept_score(noise, concept) <= 0.1
    gaussian = torch.randn(30, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    assert detect.forgetting_score(gaussian, scenes[:30]) <= 0.1


def test_image_layouts_are_equivalent():
    images, _ = world.make_dataset(4, seed=2)
    as_float = world.to_tensor(images)  # [N, 3, H, W] in [-1, 1]
    assert np.array_equal(detect.as_uint8_images(as_float), images)
    assert np.array_equal(detect.as_uint8_images(torch.from_numpy(images).permute(0, 3, 1, 2)), images)
    assert np.array_equal(detect.as_uint8_images(images[0]), images[:1])
    with pytest.raises(ValueError, match="shape"):
        detect.as_uint8_images(np.zeros((2, 5, 32, 32)))


# ---------------------------------------------------------------- pretraining pieces

def test_latent_normalisation_is_exact():
    torch.manual_seed(0)
    vae = build_vae(ToyConfig()).eval()
    x, _ = world_batch(0, 0, 16)
    with torch.no_grad():
        before = vae.decode(vae.encode(x).mean)
        normalise_latents(vae, x)
        post = vae.encode(x)
        after = vae.decode(post.mean)
    scaled = post.mean * SD_SCALE
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scaled.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaled.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)


def test_a_few_pretraining_steps_write_a_loadable_resumable_model(tmp_path):
    cfg = ToyConfig(vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4,
                    unet_scenes=16, stats_images=8, text_layers=1, vae_ch_mult=(1, 2), unet_channel_mult=(1,),
                    checkpoint_every_s=0.0)
    progress = tmp_path / "m.progress.pt"
    trainer = Trainer(cfg, progress, log=lambda msg: None)
    trainer.train_vae()
    # settings of a stage not yet begun may change on resume; those of a finished stage may not
    resumed = Trainer(dataclasses.replace(cfg, unet_lr=1e-4, unet_steps=3), progress, log=lambda msg: None)
    assert resumed.vae_step == 2
    with pytest.raises(ValueError, match="vae_lr"):
        Trainer(dataclasses.replace(cfg, vae_lr=1e-4), progress, log=lambda msg: None)
    trainer.train_unet()
    assert progress.exists() and trainer.unet_step == 2
    again = Trainer(cfg, progress, log=lambda msg: None)  # resumes at the end: nothing left to do
    assert (again.vae_step, again.unet_step) == (2, 2)
    for k, v in trainer.unet.state_dict().items():
        torch.testing.assert_close(again.unet.state_dict()[k], v)
    path = tmp_path / "m.safetensors"
    sd.checkpoint.write_state_dict(path, original_state_dict(again.ema_unet(), again.vae, again.text))
    model = sd.load(path)
    assert model.version == "sd1" and model.unet.cfg.num_heads == 8 and not model.unet.cfg.use_linear_in_transformer
    images = ddim_sample(model, ["a large red circle in the center, white background"], steps=2)
    assert images.shape == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    with pytest.raises(ValueError, match="another config"):
        Trainer(dataclasses.replace(cfg, seed=1), progress, log=lambda msg: None)


def test_command_line_maps_onto_the_config():
    assert parse_args([])[1] == ToyConfig()
    args, cfg = parse_args(["--out", "x.safetensors", "--unet-steps", "7", "--vae-ch-mult", "1", "2", "--bf16"])
    assert args.out == "x.safetensors"
    assert cfg == dataclasses.replace(ToyConfig(), unet_steps=7, vae_ch_mult=(1, 2), bf16=True)


# ---------------------------------------------------------------- the shipped model

@pytest.mark.skipif(not SHIPPED.exists(), reason="toy/tiny_sd.safetensors not built")
def test_shipped_model_loads_and_samples(tmp_path):
    assert SHIPPED.stat().st_size < 10.5 * 2**20
    model = sd.load(SHIPPED)
    from sd.checkpoint import CheckpointFile
    meta = CheckpointFile(SHIPPED).metadata
    assert meta["toy.command"].startswith("python -m toy.pretrain")
    assert json.loads(meta["toy.config"])["seed"] == int(meta["toy.seed"])
    assert model.version == "sd1" and model.prediction_type == "epsilon"
    assert model.vae.cfg.downsample_factor in (4, 8)
    prompts = ["a large red circle in the center, white background", "two small blue squares, black background"]
    images = ddim_sample(model, prompts, steps=3, seed=1)
    assert images.shape == (2, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert images.min() >= -1 and images.max() <= 1
    # image i depends on (seed, i) only, not on the batch it was drawn in
    torch.testing.assert_close(ddim_sample(model, prompts[:1], steps=3, seed=1), images[:1], atol=1e-4, rtol=0)
    assert save_grid(images, tmp_path / "g.png").exists()


@pytest.mark.skipif(not SHIPPED.exists(), reason="toy/tiny_sd.safetensors not built")
def test_shipped_vae_keeps_what_the_detectors_read():
    """A LoRA on the UNet can only show what the VAE decodes: base shapes and colours, and the default concept."""
    model = sd.load(SHIPPED)
    scenes = world.base_prompts(24)
    concept_images, _ = world.concept_dataset(world.DEFAULT_CONCEPT, 24)
    with torch.no_grad():
        def roundtrip(images):
            return model.vae.decode(model.vae.encode(world.to_tensor(images)).mean).clamp(-1, 1)
        assert detect.forgetting_score(roundtrip(world.render_all(scenes, 0)), scenes) >= 0.9
        assert detect.concept_score(roundtrip(concept_images), world.DEFAULT_CONCEPT) >= 0.7
