"""data.encode_dataset on a tiny checkpoint: every caption convention, odd image formats, latents equal to a direct
VAE call, manifest contents, incremental re-encoding, bad-input accounting, --strict, cache-mismatch refusal."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sd
from data import CacheMismatchError, DataError, ImageSource, LatentCache, encode_dataset
from data.buckets import Placement, apply
from data.images import load_rgb
from data.sources import CaptionRules, scan
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict

# The tiny VAE halves once (factor 2): any even size is valid; a bucket step of 4 pixels keeps buckets distinct.
FAST = dict(resolution=16, bucket_step=4, progress=False, workers=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_state_dict(tmp_path_factory.mktemp("model") / "tiny.safetensors", tiny_state_dict("sd1", seed=0))


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory):
    return write_state_dict(tmp_path_factory.mktemp("model2") / "other.safetensors", tiny_state_dict("sd1", seed=1))


@pytest.fixture(scope="module")
def model(ckpt):
    return sd.load(ckpt)


def picture(path, size=(24, 20), seed=0, mode="RGB", **save):
    """A noise image of `size` saved at `path` (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, **save)
    return path


def caption(image_path, text):
    image_path.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")


def png16_gray(path, size=(20, 20)):
    values = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 97 % 65536).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in values)

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", *size, 16, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def test_caption_conventions_and_repeats(tmp_path, model):
    root = tmp_path / "train"
    a = picture(root / "10_sks dog" / "a.png")                    # sd-scripts folder: repeats 10, folder caption
    b = picture(root / "10_sks dog" / "b.png", seed=1)
    caption(b, "a photo of sks dog, on grass")                    # an explicit caption beats the folder name
    c = picture(root / "txt" / "c.jpg", seed=2)
    caption(c, "line one\n  line two  ")                          # lines are joined
    hf = root / "hf"
    d = picture(hf / "d.png", seed=3)
    e = picture(hf / "sub" / "e.webp", seed=4)
    (hf / "metadata.jsonl").write_text(json.dumps({"file_name": "d.png", "text": "dee"}) + "\n\n"
                                       + json.dumps({"file_name": "sub/e.webp", "text": "eee", "extra": 1}) + "\n")
    f = picture(root / "csv" / "f.png", seed=5)
    (root / "csv" / "metadata.csv").write_text('file_name,text\nf.png,"eff, with comma"\n')
    picture(root / ".hidden" / "h.png")                           # hidden folders are not training data
    picture(root / "txt" / ".h.png")

    found = scan([ImageSource(root)], CaptionRules(folder_captions=True))
    got = {x.path.name: (x.caption, x.caption_source, x.repeats) for x in found.found}
    assert got == {
        "a.png": ("sks dog", "folder", 10), "b.png": ("a photo of sks dog, on grass", "caption-file", 10),
        "c.jpg": ("line one line two", "caption-file", 1), "d.png": ("dee", "metadata", 1),
        "e.webp": ("eee", "metadata", 1), "f.png": ("eff, with comma", "metadata", 1),
    }
    assert found.problems == []

    # Without folder captions the uncaptioned image is a problem, and the message says how to fix it.
    found = scan([ImageSource(root)], CaptionRules(repeats=2))
    assert [p.path for p in found.problems] == [str(a)]
    assert "missing caption" in found.problems[0].reason and "'sks dog'" in found.problems[0].reason
    assert {x.path.name: x.repeats for x in found.found}["c.jpg"] == 2

    # DreamBooth: one prompt for everything, caption files ignored; per-source prompt and repeats win.
    found = scan([ImageSource(root / "txt", repeats=3, prompt="a photo of sks dog"), ImageSource(root / "csv")],
                 CaptionRules(prompt="a photo of a dog"))
    assert {(x.path.name, x.caption, x.caption_source, x.repeats) for x in found.found} == {
        ("c.jpg", "a photo of sks dog", "prompt", 3), ("f.png", "a photo of a dog", "prompt", 1)}
    assert ImageSource.parse(f"{root / 'txt'}:5") == ImageSource(root / "txt", repeats=5)
    assert ImageSource.parse(str(root / "txt")) == ImageSource(root / "txt")

    report = encode_dataset(root, tmp_path / "cache", model, folder_captions=True, **FAST)
    assert report.images == 6 and report.samples_per_epoch == 10 + 10 + 4 and not report.skipped
    cache = LatentCache(tmp_path / "cache")
    assert sorted(it.caption for it in cache.items) == sorted(v[0] for v in got.values())


def test_metadata_problems_are_reported(tmp_path):
    picture(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\nnot json\n'
                                             '{"file_name": "gone.png", "text": "?"}\n{"file_name": "x.png"}\n')
    found = scan([ImageSource(tmp_path)], CaptionRules())
    reasons = sorted(p.reason for p in found.problems)
    assert len(reasons) == 3
    assert any("line 2: not valid JSON" in r for r in reasons)
    assert any("'gone.png' does not exist" in r for r in reasons)
    assert any("line 4: no 'text' caption" in r for r in reasons)
    assert [x.caption for x in found.found] == ["ok"]


def test_odd_formats_all_encode(tmp_path, model):
    folder = tmp_path / "odd"
    rgba = Image.new("RGBA", (30, 22), (255, 0, 0, 0))
    rgba.putpixel((3, 3), (0, 255, 0, 255))
    folder.mkdir()
    rgba.save(folder / "rgba.png")
    picture(folder / "palette.gif", mode="P")
    picture(folder / "cmyk.jpg", mode="CMYK")
    png16_gray(folder / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(folder / "rotated.jpg", size=(40, 20), exif=exif)
    picture(folder / "photo.webp", size=(50, 30))
    picture(folder / "gray.bmp", mode="L")
    picture(folder / "scan.tif", size=(20, 40))
    report = encode_dataset(folder, tmp_path / "cache", model, prompt="a thing", bucket=True, text=False, **FAST)
    assert report.images == 8 and report.encoded == 8 and report.skipped == []
    items = {os.path.basename(it["file"]): it for it in manifest(tmp_path / "cache")["items"]}
    assert items["rotated.jpg"]["original_size"] == [20, 40]  # EXIF orientation applied before bucketing
    assert items["rotated.jpg"]["bucket"][0] < items["rotated.jpg"]["bucket"][1]
    assert items["photo.webp"]["bucket"][0] > items["photo.webp"]["bucket"][1]


# ---------------------------------------------------------------------------------------------------------------
# What is stored


def test_stored_moments_match_a_direct_vae_call_and_flip_is_the_mirror(tmp_path, ckpt, model):
    folder = tmp_path / "imgs"
    for i, size in enumerate([(24, 20), (20, 30)]):
        caption(picture(folder / f"{i}.png", size=size, seed=i), f"caption number {i}")
    encode_dataset(folder, tmp_path / "cache", model, flip=True, bucket=True, **FAST)
    cache = LatentCache(tmp_path / "cache")
    assert cache.has_flip and cache.has_context and cache.scale_factor == model.scale_factor
    for index, item in enumerate(cache.items):
        placement = Placement(item.bucket, tuple(manifest(tmp_path / "cache")["items"][index]["resized"]), item.crop)
        pixels = np.asarray(apply(load_rgb(item.file), placement), dtype=np.float32)
        for variant, array in (("plain", pixels), ("flip", pixels[:, ::-1].copy())):
            x = torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1
            with torch.no_grad():
                posterior = model.vae.encode(x)
            mean, logvar = cache.moments(index, variant)
            assert mean.dtype == logvar.dtype == torch.float16
            assert mean.shape == (4, item.bucket[1] // 2, item.bucket[0] // 2)
            torch.testing.assert_close(mean.float(), posterior.mean[0], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(logvar.float(), posterior.logvar[0], atol=2e-2, rtol=2e-3)
        assert not torch.equal(*(cache.moments(index, v)[0] for v in ("plain", "flip")))
        with torch.no_grad():
            context = model.encode_prompt(item.caption)[0]
        torch.testing.assert_close(cache.context(index).float(), context, atol=2e-3, rtol=2e-3)
        assert torch.equal(cache.tokens(index), model.tokenize(item.caption)[0])
    tokens, context = cache.empty_prompt()
    assert torch.equal(tokens, model.tokenize("")[0]) and context.shape == (77, model.text_encoder.config.width)


def test_manifest_records_model_geometry_and_file_hashes(tmp_path, ckpt, model):
    folder = tmp_path / "imgs"
    files = [picture(folder / f"{i}.png", seed=i) for i in range(3)]
    encode_dataset(folder, tmp_path / "cache", model, prompt="p", **FAST)
    m = manifest(tmp_path / "cache")
    assert m["format"] == "sd-latent-cache" and m["format_version"] == 1
    assert m["model"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert m["model"]["short_hash"] == m["model"]["sha256"][:10]
    assert m["model"]["version"] == "sd1" and m["model"]["scale_factor"] == 0.18215 and m["model"]["downsample_factor"] == 2
    assert m["geometry"]["resolution"] == [16, 16] and m["geometry"]["bucket"] is False
    assert [it["sha256"] for it in m["items"]] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert all(it["bucket"] == [16, 16] for it in m["items"])
    shards = {p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".safetensors"}
    assert shards == set(m["entries"].values())
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------
# Incremental re-encoding


def test_rerun_encodes_only_what_changed(tmp_path, ckpt):
    folder, out = tmp_path / "imgs", tmp_path / "cache"
    files = [picture(folder / f"{i}.png", seed=i) for i in range(4)]
    for i, f in enumerate(files):
        caption(f, f"image {i}")
    first = encode_dataset(folder, out, ckpt, **FAST)
    assert (first.encoded, first.reused, first.model_loaded, first.captions_encoded) == (4, 0, True, 5)  # + ""

    again = encode_dataset(folder, out, ckpt, **FAST)
    assert (again.encoded, again.reused, again.model_loaded, again.captions_encoded) == (0, 4, False, 0)

    deleted_sha = hashlib.sha256(files[0].read_bytes()).hexdigest()
    picture(files[1], seed=99)                              # new pixels
    os.utime(files[2], ns=(1, 1_000_000_000))               # new mtime, same bytes: re-hashed, not re-encoded
    caption(files[3], "a changed caption")                  # only the caption
    picture(folder / "new.png", seed=7)
    caption(folder / "new.png", "brand new")
    files[0].unlink()
    files[0].with_suffix(".txt").unlink()
    report = encode_dataset(folder, out, ckpt, **FAST)
    assert (report.encoded, report.reused, report.captions_encoded) == (2, 2, 2)
    m = manifest(out)
    assert sorted(os.path.basename(it["file"]) for it in m["items"]) == ["1.png", "2.png", "3.png", "new.png"]

    # Only live entries remain, and every shard on disk is one the manifest names.
    live = {k for it in m["items"] for k in (*it["latents"].values(), it["text"])} | {m["empty_text"]}
    assert set(m["entries"]) == live
    from safetensors import safe_open
    on_disk = set()
    for shard in sorted(out.glob("shard-*.safetensors")):
        assert shard.name in m["entries"].values()
        with safe_open(shard, "pt") as f:
            on_disk |= {k.rsplit(".", 1)[0] for k in f.keys()}
    assert live <= on_disk
    assert not any(k.startswith(f"latent/{deleted_sha[:32]}") for k in m["entries"])  # the deleted image's latents

    fingerprint = LatentCache(out).fingerprint
    final = encode_dataset(folder, out, ckpt, **FAST)
    assert (final.encoded, final.model_loaded) == (0, False)
    assert LatentCache(out).fingerprint == fingerprint  # nothing changed, so a training run resumes exactly
    caption(files[2], "another caption")
    encode_dataset(folder, out, ckpt, **FAST)
    assert LatentCache(out).fingerprint != fingerprint


def test_dead_entries_are_compacted_away(tmp_path, model):
    folder, out = tmp_path / "imgs", tmp_path / "cache"
    files = [picture(folder / f"{i}.png", seed=i) for i in range(4)]
    encode_dataset(folder, out, model, prompt="p", text=False, **FAST)
    (out / ".shard-00009.safetensors.x.tmp").write_bytes(b"half a shard")  # as a killed write leaves it
    for f in files[1:]:
        f.unlink()
    encode_dataset(folder, out, model, prompt="p", text=False, **FAST)
    from safetensors import safe_open
    [shard] = list(out.glob("shard-*.safetensors"))  # the mostly-dead shard was rewritten
    with safe_open(shard, "pt") as f:
        assert sorted(f.keys()) == sorted(f"{k}.{part}" for k in manifest(out)["entries"]
                                          for part in (("mean", "logvar") if k.startswith("latent/") else ("tokens",)))
    assert not list(out.glob(".*.tmp"))
    assert len(LatentCache(out)) == 1


def test_flip_and_text_options_add_only_missing_entries(tmp_path, ckpt, model):
    folder, out = tmp_path / "imgs", tmp_path / "cache"
    for i in range(3):
        picture(folder / f"{i}.png", seed=i)
    encode_dataset(folder, out, model, prompt="p", text=False, **FAST)
    cache = LatentCache(out)
    assert cache.context(0) is None and cache.tokens(0).shape == (77,) and not cache.has_flip

    report = encode_dataset(folder, out, model, prompt="p", text=True, flip=True, **FAST)
    assert report.latents_written == 3 and report.captions_encoded == 2  # flips only; "p" and ""
    cache = LatentCache(out)
    assert cache.has_flip and cache.context(0).shape == (77, 128)

    with pytest.raises(ValueError, match="uses layer 'last' but text_layer='penultimate'"):
        encode_dataset(folder, out, model, prompt="p", text_layer="penultimate", flip=True, **FAST)
    report = encode_dataset(folder, out, ckpt, prompt="p", text_layer="penultimate", flip=True, **FAST)
    assert report.latents_written == 0 and report.captions_encoded == 2
    assert LatentCache(out).manifest["text"]["layer"] == "penultimate"


def test_interrupted_run_keeps_its_work(tmp_path, model, monkeypatch):
    folder, out = tmp_path / "imgs", tmp_path / "cache"
    for i in range(5):
        picture(folder / f"{i}.png", seed=i)
    from data import pipeline

    real, calls = pipeline._prepare, []

    def stop_at_fourth(item, max_pixels):
        calls.append(item)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(item, max_pixels)

    monkeypatch.setattr(pipeline, "_prepare", stop_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(folder, out, model, prompt="p", batch_size=1, text=False, **{**FAST, "workers": 0})
    monkeypatch.undo()
    assert len(manifest(out)["entries"]) == 3  # the three finished images were saved
    report = encode_dataset(folder, out, model, prompt="p", text=False, **FAST)
    assert (report.encoded, report.reused) == (2, 3)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def _messy(folder):
    for i in range(3):
        caption(picture(folder / f"good{i}.png", seed=i), f"good {i}")
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"GIF89a but not really")
    full = picture(folder / "truncated.png", size=(48, 48)).read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    picture(folder / "huge.png", size=(300, 300))
    picture(folder / "nocaption.png", seed=9)
    for name in ("empty", "garbage", "truncated", "huge"):
        (folder / f"{name}.txt").write_text("has a caption")
    return folder


def test_bad_input_is_skipped_counted_and_not_retried(tmp_path, ckpt):
    folder, out = _messy(tmp_path / "imgs"), tmp_path / "cache"
    report = encode_dataset(folder, out, ckpt, max_pixels=200 * 200, text=False, **FAST)
    reasons = {os.path.basename(p.path): p.reason for p in report.skipped}
    assert report.images == 3 and report.encoded == 3 and len(report.skipped) == 5
    assert "empty file" in reasons["empty.png"]
    assert "not a readable image" in reasons["garbage.jpg"]
    assert "corrupt or truncated" in reasons["truncated.png"]
    assert "decompression bomb" in reasons["huge.png"]
    assert "missing caption" in reasons["nocaption.png"]
    assert "skipped 5" in str(report) and "truncated.png" in str(report)
    assert len(manifest(out)["skipped"]) == 5

    again = encode_dataset(folder, out, ckpt, max_pixels=200 * 200, text=False, **FAST)
    assert (again.encoded, again.model_loaded, len(again.skipped)) == (0, False, 5)  # the broken file is not retried

    caption(folder / "nocaption.png", "now it has one")  # fixing a file brings it in
    fixed = encode_dataset(folder, out, ckpt, max_pixels=200 * 200, text=False, **FAST)
    assert (fixed.images, fixed.encoded, len(fixed.skipped)) == (4, 1, 4)


def test_strict_mode_fails_on_bad_input(tmp_path, model):
    folder = _messy(tmp_path / "imgs")
    with pytest.raises(DataError, match="strict") as err:
        encode_dataset(folder, tmp_path / "cache", model, strict=True, max_pixels=200 * 200, text=False, **FAST)
    assert "nocaption.png" in str(err.value)
    # Files that only fail when decoded stop the run too.
    clean = tmp_path / "clean"
    caption(picture(clean / "ok.png"), "ok")
    full = picture(clean / "cut.png", size=(48, 48)).read_bytes()
    (clean / "cut.png").write_bytes(full[: len(full) // 2])
    caption(clean / "cut.png", "cut")
    with pytest.raises(DataError, match="cut.png.*corrupt or truncated.*strict"):
        encode_dataset(clean, tmp_path / "cache2", model, strict=True, text=False, **FAST)


def test_empty_datasets_get_clear_errors(tmp_path, ckpt):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images found in .*nothing.*png"):
        encode_dataset(tmp_path / "nothing", tmp_path / "c1", ckpt, **FAST)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="(?s)every candidate was skipped.*x.png: empty file"):
        encode_dataset(tmp_path / "bad", tmp_path / "c2", ckpt, prompt="p", **FAST)
    with pytest.raises(ValueError, match="does not exist"):
        encode_dataset(tmp_path / "missing", tmp_path / "c3", ckpt, **FAST)


def test_cache_inside_the_image_folder_is_not_scanned(tmp_path, model):
    folder = tmp_path / "imgs"
    for i in range(2):
        picture(folder / f"{i}.png", seed=i)
    encode_dataset(folder, folder / "cache", model, prompt="p", text=False, **FAST)
    picture(folder / "cache" / "stray.png")  # even an image put there later
    report = encode_dataset(folder, folder / "cache", model, prompt="p", text=False, **FAST)
    assert (report.images, report.encoded) == (2, 0)
    with pytest.raises(ValueError, match="must not be an image folder"):
        encode_dataset(folder, folder, model, prompt="p", text=False, **FAST)


# ---------------------------------------------------------------------------------------------------------------
# Never reuse a cache made for something else


def test_cache_for_another_model_or_geometry_is_refused(tmp_path, ckpt, other_ckpt):
    folder, out = tmp_path / "imgs", tmp_path / "cache"
    for i in range(2):
        picture(folder / f"{i}.png", seed=i)
    encode_dataset(folder, out, ckpt, prompt="p", text=False, **FAST)
    before = (out / "manifest.json").read_bytes()

    with pytest.raises(CacheMismatchError, match="another model.*overwrite"):
        encode_dataset(folder, out, other_ckpt, prompt="p", text=False, **FAST)
    with pytest.raises(CacheMismatchError, match=r"resolution=\[16, 16\] \(now \[24, 24\]\)"):
        encode_dataset(folder, out, ckpt, prompt="p", text=False, **{**FAST, "resolution": 24})
    with pytest.raises(CacheMismatchError, match="bucket=False"):
        encode_dataset(folder, out, ckpt, prompt="p", bucket=True, text=False, **FAST)
    with pytest.raises(CacheMismatchError, match="crop="):
        encode_dataset(folder, out, ckpt, prompt="p", crop="random", text=False, **FAST)
    assert (out / "manifest.json").read_bytes() == before  # refused without touching anything

    report = encode_dataset(folder, out, other_ckpt, prompt="p", overwrite=True, text=False, **FAST)
    assert (report.encoded, report.reused) == (2, 0)
    cache = LatentCache(out)
    assert cache.model_sha256 == hashlib.sha256(other_ckpt.read_bytes()).hexdigest()
    cache.check(model_sha256=cache.model_sha256, resolution=16)
    with pytest.raises(CacheMismatchError, match="resolution"):
        cache.check(resolution=512)
    with pytest.raises(CacheMismatchError, match="model sha256"):
        cache.check(model_sha256=hashlib.sha256(ckpt.read_bytes()).hexdigest())


def test_model_hash_is_the_file_sha256_and_remembered(tmp_path, ckpt):
    assert data.model_hash(ckpt) == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(ckpt.read_bytes())
    stat = copy.stat()
    known = {"path": str(copy.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": "f" * 64}
    assert data.model_hash(copy, known) == "f" * 64  # trusted from the manifest: the file was not read again
    os.utime(copy, ns=(1, 2))
    assert data.model_hash(copy, known) == data.model_hash(ckpt)
