"""Textual inversion and pivotal tuning: new tokens change only their own rows, embedding files in A1111/ComfyUI
layouts load back (also in sample.py) with the same context, resume is exact, bad input is one line before any model
loads, and TI leaves the toy's forgetting score exactly where the base has it."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
import sd
import train
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict
from data import LatentCache
from text import CLIPTokenizer, embedding_file, new_tokens
from training.config import TrainConfig

from helpers import captioned_circles, train_argv

TOKEN = "<new-colour>"


def tiny_model(tmp_path, version: str):
    path = write_state_dict(tmp_path / f"tiny_{version}.safetensors", tiny_state_dict(version, seed=1))
    return sd.load(path), path


def with_token(model, token: str = TOKEN, num_vectors: int = 2, init_word: str = "dog") -> dict:
    start = new_tokens.initial_vectors(model.text_encoder, model.tokenizer, num_vectors, init_word)
    new_tokens.add_token(model.text_encoder, model.tokenizer, token, start)
    return new_tokens.new_vectors(model.text_encoder)


# ------------------------------------------------------------------------------------- tokens and rows

def test_a_new_token_becomes_its_own_ids_past_the_vocabulary():
    tokenizer = CLIPTokenizer()
    ids = tokenizer.add_token(TOKEN, 3)
    assert ids == [49408, 49409, 49410] and tokenizer.vocab_size == 49411
    assert tokenizer.encode(f"a {TOKEN.upper()}, red") == [320, *ids, 267, 736]
    assert tokenizer.decode(tokenizer(f"a {TOKEN} circle", pad_id=0)[0]) == f"a {TOKEN} circle"


@pytest.mark.parametrize("version", ["sd1", "sd2", "sdxl"])
def test_training_changes_only_the_new_rows(tmp_path, version):
    model, _ = tiny_model(tmp_path, version)
    before = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    plain = model.encode_text(["a red circle"])
    vectors = with_token(model)
    assert set(vectors) == ({"clip_l", "clip_g"} if version == "sdxl" else {"clip_h" if version == "sd2" else "clip_l"})
    for p in vectors.values():
        p.requires_grad_(True)
    start = {k: v.detach().clone() for k, v in vectors.items()}
    optimizer = torch.optim.AdamW(vectors.values(), lr=0.1)
    context, pooled = model.encode_text([f"a {TOKEN} circle", "a red circle"])
    (context.square().mean() + (0 if pooled is None else pooled.square().mean())).backward()
    optimizer.step()
    for name, p in model.text_encoder.named_parameters():
        if name.endswith("new_vectors"):
            continue
        assert p.grad is None and not p.requires_grad, name  # the frozen table: not even a gradient
        assert torch.equal(p, before[name]), name
    assert all(not torch.equal(vectors[k], start[k]) for k in vectors)
    # prompts without the token encode bit for bit as before the token existed
    again = model.encode_text(["a red circle"])
    assert torch.equal(again[0], plain[0]) and (plain[1] is None or torch.equal(again[1], plain[1]))


def test_the_init_word_gives_every_vector_its_embedding(tmp_path):
    model, _ = tiny_model(tmp_path, "sd1")
    vectors = with_token(model, num_vectors=3, init_word="dog")["clip_l"]
    table = model.text_encoder.transformer.text_model.embeddings.token_embedding.weight
    assert torch.equal(vectors.detach(), table[model.tokenizer.encode("dog")[0]].float().expand(3, -1))
    # one vector initialised from 'dog' reads as 'dog' does
    model2, _ = tiny_model(tmp_path, "sd1")
    with_token(model2, num_vectors=1)
    assert torch.equal(model2.encode_prompt([f"a {TOKEN}"]), model2.encode_prompt(["a dog"]))


# ------------------------------------------------------------------------------------- files

@pytest.mark.parametrize("version, keys", [("sd1", {"emb_params"}), ("sd2", {"emb_params"}),
                                           ("sdxl", {"clip_l", "clip_g"})])
def test_embedding_files_use_a1111_and_comfyui_keys(tmp_path, version, keys):
    """A1111 reads a one-tensor .safetensors (our emb_params) and SDXL's clip_l + clip_g; ComfyUI takes the one
    tensor, or the tower's own key. Rows are [vectors, width] in float32, the token in the metadata."""
    model, _ = tiny_model(tmp_path, version)
    vectors = with_token(model, num_vectors=2)
    path = embedding_file.save(tmp_path / "emb.safetensors", TOKEN, vectors)
    tensors = load_file(path)
    assert set(tensors) == keys
    widths = new_tokens.widths(model.text_encoder)
    for key, t in tensors.items():
        width = next(iter(widths.values())) if key == "emb_params" else widths[key]
        assert t.dtype == torch.float32 and t.shape == (2, width)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["name"] == TOKEN


@pytest.mark.parametrize("version", ["sd1", "sdxl"])
def test_an_embedding_written_here_gives_the_same_context_after_loading(tmp_path, version):
    model, _ = tiny_model(tmp_path, version)
    vectors = with_token(model)
    with torch.no_grad():
        for p in vectors.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))  # as if trained
    path = embedding_file.save(tmp_path / "emb.safetensors", TOKEN, vectors)
    fresh, _ = tiny_model(tmp_path, version)
    assert embedding_file.load(path, fresh.text_encoder, fresh.tokenizer) == TOKEN  # the name in the file
    prompt = [f"a {TOKEN} circle on white"]
    ours, theirs = model.encode_text(prompt), fresh.encode_text(prompt)
    assert torch.equal(ours[0], theirs[0]) and (ours[1] is None or torch.equal(ours[1], theirs[1]))


def test_sample_py_uses_the_embedding_for_its_token(tmp_path, monkeypatch):
    """sample.py --embedding FILE:TOKEN conditions on exactly the context the trained model gives the token."""
    import sampling

    model, ckpt = tiny_model(tmp_path, "sd1")
    vectors = with_token(model, num_vectors=1, init_word="red")
    with torch.no_grad():
        vectors["clip_l"].mul_(-3)  # far from 'red': the images must differ from the plain prompt's
    path = embedding_file.save(tmp_path / "emb.safetensors", "<renamed>", vectors)
    contexts, original = [], sampling.generate

    def recording(m, prompts, *a, **k):
        contexts.append(m.encode_prompt(prompts))
        return original(m, prompts, *a, **k)

    monkeypatch.setattr(sampling, "generate", recording)
    common = ["--ckpt", str(ckpt), "--steps", "2", "--sampler", "ddim", "--size", "32x32", "--quiet"]
    assert sample.main([*common, "--prompt", f"a {TOKEN}", "--embedding", f"{path}:{TOKEN}", "--out",
                        str(tmp_path / "a")]) == 0
    assert sample.main([*common, "--prompt", "a red", "--out", str(tmp_path / "b")]) == 0
    assert torch.equal(contexts[0], model.encode_prompt([f"a {TOKEN}"]))
    a, b = (next((tmp_path / d).glob("*.png")).read_bytes() for d in "ab")
    assert a != b


def test_others_files_load_a1111_pt_and_diffusers_learned_embeds(tmp_path):
    rows = torch.randn(2, 128)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "x", "step": 100,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, tmp_path / "a1111.pt")
    got = embedding_file.read(tmp_path / "a1111.pt")
    assert torch.equal(got.vectors["emb_params"], rows)
    torch.save({"<cat-toy>": rows[0]}, tmp_path / "learned_embeds.bin")
    got = embedding_file.read(tmp_path / "learned_embeds.bin")
    assert got.name == "<cat-toy>" and got.vectors["emb_params"].shape == (1, 128)
    save_file({"clip_l": rows[:, :64].contiguous(), "clip_g": torch.randn(2, 96)}, tmp_path / "xl.safetensors")
    assert set(embedding_file.read(tmp_path / "xl.safetensors").vectors) == {"clip_l", "clip_g"}


class NeedsCode:
    def __reduce__(self):
        return (print, ("this would run",))


def test_a_pt_embedding_that_needs_code_is_refused_in_one_line(tmp_path):
    torch.save({"string_to_param": {"*": NeedsCode()}}, tmp_path / "evil.pt")  # a .pt whose loading runs print
    with pytest.raises(ValueError) as err:
        embedding_file.read(tmp_path / "evil.pt")
    assert "evil.pt" in str(err.value) and "refused" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- bad input: one line

def test_an_embedding_whose_width_does_not_fit_is_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys):
    _, ckpt = tiny_model(tmp_path, "sd1")  # its CLIP-L is 128 wide
    save_file({"emb_params": torch.zeros(1, 768)}, tmp_path / "sd15.safetensors")
    monkeypatch.setattr(sd, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as code:
        sample.main(["--ckpt", str(ckpt), "--prompt", "a <x>", "--embedding", f"{tmp_path / 'sd15.safetensors'}:<x>"])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "sd15.safetensors" in err and "emb_params is 768 wide" in err and "128 wide" in err
    assert len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1 checkpoint and four captioned 32 px images whose captions name the new token."""
    root = tmp_path_factory.mktemp("ti")
    ckpt = write_state_dict(root / "tiny.safetensors", tiny_state_dict("sd1", seed=1))
    images = root / "images"
    captioned_circles(images, [(150, 60, 200)] * 4, [f"a {TOKEN} circle {i}" for i in range(4)])
    return {"ckpt": str(ckpt), "images": str(images), "cache": str(root / "cache"), "root": root}


def args(world, out, **overrides) -> list[str]:
    options = {"steps": 4, "targets": "attn", "mode": "ti", "token": TOKEN, "init_word": "red", "ti_lr": 0.05}
    return train_argv(world, out, **{**options, **overrides})


@pytest.mark.parametrize("option, message", [
    ({"token": "dog"}, "token 'dog' is already in the vocabulary (id 1929"),
    ({"init_word": "purplish-blue"}, "init_word 'purplish-blue' tokenizes to"),
    ({"token": ""}, "token: --mode ti learns a new token"),
    ({"mode": "lora"}, "token: only for --mode ti or pivotal"),
])
def test_bad_token_options_are_one_line_before_any_work(world, tmp_path, monkeypatch, option, message):
    monkeypatch.setattr(sd, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(train, "encode_dataset", lambda *a, **k: pytest.fail("images were encoded"))
    with pytest.raises(ValueError) as err:
        train.main(args(world, tmp_path / "x", **option))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------- training and resume

@pytest.mark.parametrize("mode, extra", [("ti", {}), ("pivotal", {"ti_steps": 3})])
def test_resume_is_exact(world, tmp_path, capsys, mode, extra):
    """Stopped at step 2 and resumed to 5 gives the same files as 5 steps in one go (pivotal: across the switch
    from vectors alone to vectors + LoRA at step 3)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(args(world, whole, mode=mode, steps=5, **extra)) == 0
    assert train.main(args(world, parts, mode=mode, steps=2, **extra)) == 0
    assert train.main(["--resume", "latest", "--out", str(parts), "--steps", "5"]) == 0
    names = ["embedding_final.safetensors"] + (["lora_final.safetensors"] if mode == "pivotal" else [])
    assert sorted(p.name for p in whole.glob("*_final.safetensors")) == sorted(names)
    for name in names:
        a, b = load_file(whole / name), load_file(parts / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    start = new_tokens.initial_vectors(sd.load(world["ckpt"]).text_encoder, CLIPTokenizer(), 1, "red")["clip_l"]
    assert not torch.equal(load_file(whole / "embedding_final.safetensors")["emb_params"], start)  # it trained
    if mode == "pivotal":  # the LoRA waited for ti_steps: after 2 steps it is still zero in B
        two = load_file(parts / "lora_final.safetensors")
        assert two  # the final file after the resume
        state = torch.load(sorted((parts / "state").glob("step_0000002.pt"))[0], weights_only=False)
        ups = [v for k, v in state["trainable"].items() if k.endswith("lora_up.weight")]
        assert ups and all(not u.any() for u in ups)


def test_pivotal_trains_the_vectors_alone_for_ti_steps_then_both_or_the_adapter_alone():
    cfg = TrainConfig(mode="pivotal", token=TOKEN, ti_steps=3)
    assert [train.training_phase(cfg, s) for s in (0, 2, 3, 9)] == [(True, False)] * 2 + [(True, True)] * 2
    cfg.ti_freeze = True
    assert [train.training_phase(cfg, s) for s in (2, 3)] == [(True, False), (False, True)]
    assert train.training_phase(TrainConfig(mode="ti", token=TOKEN), 0) == (True, False)
    assert train.training_phase(TrainConfig(mode="pivotal", token=TOKEN), 0) == (True, True)


def test_textual_inversion_leaves_the_forgetting_score_of_the_base(world, tmp_path):
    """TI trains only the new rows: on prompts without the token the model draws the same images, bit for bit, so the
    toy's forgetting score equals the base's exactly."""
    from toy.evaluate import evaluate

    out = tmp_path / "ti"
    assert train.main(args(world, out, steps=3)) == 0
    cache = LatentCache(world["cache"])  # token ids only, the new token's among them: the encoder runs in the loop
    assert not cache.has_context and 49408 in cache.tokens(0).tolist()
    base = sd.load(world["ckpt"])
    trained = sd.load(world["ckpt"])
    embedding_file.load(out / "embedding_final.safetensors", trained.text_encoder, trained.tokenizer)
    kwargs = dict(concept="purple", n_base=6, n_concept=2, n_world=2, steps=2, seed=0)
    before, after = evaluate(base, **kwargs), evaluate(trained, concept_word=TOKEN, **kwargs)
    assert after["forgetting_score"] == before["forgetting_score"]
    assert torch.equal(after["images"]["base"], before["images"]["base"])
    assert torch.equal(after["images"]["world"], before["images"]["world"])
    assert after["prompts"]["concept"][0].count(TOKEN) == 1
