"""data.LatentLoader: one bucket per batch, epochs that cover every image `repeats` times, seeded order, resume at
any step equal to the tail of a full run, and fresh posterior samples with the right statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sd
from data import DataError, ImageSource, LatentCache, LatentLoader, encode_dataset, sample_latents
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    ckpt = write_state_dict(root / "tiny.safetensors", tiny_state_dict("sd1", seed=0))
    rng = np.random.default_rng(0)
    sizes = {"3_square": [(20, 20)] * 3, "wide": [(40, 20)] * 4, "tall": [(20, 36)] * 2}
    for folder, shapes in sizes.items():
        for i, (w, h) in enumerate(shapes):
            path = root / "imgs" / folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            path.with_suffix(".txt").write_text(f"{folder} number {i}")
    encode_dataset([ImageSource(root / "imgs"), ImageSource(root / "imgs" / "tall", repeats=2)], root / "cache",
                   sd.load(ckpt), resolution=16, bucket=True, bucket_step=4, flip=True, progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def cache(cache_dir):
    return LatentCache(cache_dir)


def test_cache_shape(cache):
    assert len(cache) == 9
    assert sorted({it.bucket for it in cache.items}) == [(12, 20), (16, 16), (20, 12)]
    assert sorted(it.repeats for it in cache.items) == [1, 1, 1, 1, 1, 1, 3, 3, 3]  # "tall" twice: first source wins
    assert cache.has_flip and cache.has_context


def test_epochs_cover_every_sample_once_in_single_bucket_batches(cache):
    loader = LatentLoader(cache, batch_size=2, seed=0)
    # 3 squares x 3 repeats = 9 -> 5 batches, 4 wide -> 2, 2 tall -> 1
    assert len(loader) == loader.steps_per_epoch == 8
    for epoch in range(3):
        seen = []
        for step in range(epoch * 8, (epoch + 1) * 8):
            batch = loader.batch(step)
            assert batch.epoch == epoch and 1 <= len(batch.indices) <= 2
            assert {cache.items[i].bucket for i in batch.indices} == {batch.bucket}
            w, h = batch.bucket
            assert batch.latents.shape == (len(batch.indices), 4, h // 2, w // 2) and batch.latents.dtype == torch.float32
            assert batch.context.shape == (len(batch.indices), 77, 128) and batch.tokens.shape == (len(batch.indices), 77)
            seen += batch.indices
        assert sorted(seen) == sorted(i for i, it in enumerate(cache.items) for _ in range(it.repeats))


def test_order_depends_on_seed_and_epoch_only(cache_dir, cache):
    a, b = LatentLoader(cache, 2, seed=5), LatentLoader(LatentCache(cache_dir), 2, seed=5)
    assert [a.epoch_plan(e) for e in range(3)] == [b.epoch_plan(e) for e in range(3)]
    assert a.epoch_plan(0) != a.epoch_plan(1)  # reshuffled every epoch
    assert LatentLoader(cache, 2, seed=6).epoch_plan(0) != a.epoch_plan(0)
    for step in (0, 3, 11):
        x, y = a.batch(step), b.batch(step)
        assert x.indices == y.indices and x.flipped == y.flipped and torch.equal(x.latents, y.latents)
    fixed = LatentLoader(cache, 2, shuffle=False)
    assert [i for batch in fixed.epoch_plan(0) for i in batch] == sorted(
        (i for i, it in enumerate(cache.items) for _ in range(it.repeats)), key=lambda i: (cache.items[i].bucket, i))


@pytest.mark.parametrize("start", [1, 7, 8, 13])
def test_resume_at_step_k_equals_the_tail_of_a_full_run(cache_dir, start):
    total = 20  # two and a half epochs
    full = list(LatentLoader(cache_dir, 2, seed=1).iterate(0, total))
    resumed = list(LatentLoader(cache_dir, 2, seed=1).iterate(start_step=start, num_steps=total - start))
    assert [b.step for b in resumed] == list(range(start, total))
    for x, y in zip(full[start:], resumed):
        assert (x.indices, x.flipped, x.captions, x.epoch) == (y.indices, y.flipped, y.captions, y.epoch)
        assert torch.equal(x.latents, y.latents) and torch.equal(x.context, y.context)


def test_posterior_sampling_statistics(cache):
    mean, logvar = cache.moments(0)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_latents(mean, logvar, 0.5, generator) for _ in range(4000)])
    std = torch.exp(0.5 * logvar.float())
    torch.testing.assert_close(draws.mean(0), mean.float() * 0.5, atol=float(5 * std.max() * 0.5 / 4000 ** 0.5), rtol=0)
    ratio = draws.std(0) / (std * 0.5)
    assert (ratio - 1).abs().max() < 0.1, ratio

    # Through the loader: (latents / scale - mean) / std is standard normal over many steps.
    loader = LatentLoader(cache, batch_size=3, seed=2, flip=False)
    z = []
    for step in range(60):
        batch = loader.batch(step)
        for row, index in enumerate(batch.indices):
            m, v = cache.moments(index)
            z.append(((batch.latents[row] / cache.scale_factor - m.float()) / torch.exp(0.5 * v.float())).flatten())
    z = torch.cat(z)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    # and a repeated image gets a different sample each time it is drawn
    draws = [loader.batch(s) for s in range(16)]
    firsts = [b.latents[b.indices.index(0)] for b in draws if 0 in b.indices]
    assert len(firsts) >= 2 and not torch.equal(firsts[0], firsts[1])


def test_mean_only_and_flip_choices(cache):
    loader = LatentLoader(cache, batch_size=3, seed=0, sample=False)
    flips = []
    for step in range(40):
        batch = loader.batch(step)
        for row, (index, flipped) in enumerate(zip(batch.indices, batch.flipped)):
            expected = cache.moments(index, "flip" if flipped else "plain")[0].float() * cache.scale_factor
            assert torch.equal(batch.latents[row], expected)
            flips.append(flipped)
    assert 0.3 < np.mean(flips) < 0.7
    assert not any(f for s in range(10) for f in LatentLoader(cache, 3, flip=False).batch(s).flipped)


def test_drop_last_and_batch_contents(cache):
    loader = LatentLoader(cache, batch_size=3, drop_last=True)
    assert len(loader) == 3 + 1 + 0  # 9 squares, 4 wide (one left over), 2 tall (dropped)
    assert all(len(loader.batch(s).indices) == 3 for s in range(len(loader)))
    batch = loader.batch(0)
    for row, index in enumerate(batch.indices):
        assert batch.captions[row] == cache.items[index].caption
        assert torch.equal(batch.tokens[row], cache.tokens(index))
        assert torch.equal(batch.context[row], cache.context(index).float())
    half = batch.to("cpu", torch.float16)
    assert half.latents.dtype == torch.float16 and half.tokens.dtype == torch.int64
    with pytest.raises(DataError, match="no bucket has 20 samples"):
        LatentLoader(cache, batch_size=20, drop_last=True)
    with pytest.raises(ValueError, match="batch_size"):
        LatentLoader(cache, batch_size=0)


def test_refusals(tmp_path, cache_dir):
    with pytest.raises(DataError, match="no latent cache here"):
        LatentCache(tmp_path)
    (tmp_path / "manifest.json").write_text("{ not json")
    with pytest.raises(DataError, match="damaged cache manifest"):
        LatentCache(tmp_path)
