"""Tests for text/: tokenizer parity with transformers' CLIP tokenizer, both text encoders against diffusers."""

from __future__ import annotations

import gzip
import hashlib
import random
import unicodedata

import pytest
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as ReferenceTokenizer

from text import CLIPTokenizer, ClipLConfig, ClipLTextEncoder, OpenClipConfig, OpenClipTextEncoder, encode_prompts
from text import tokenizer as tokenizer_module
from text.tokenizer import END_ID, START_ID, VOCAB_PATH, VOCAB_SHA256, clean_text, split_words

try:
    import ftfy
except ImportError:  # pragma: no cover
    ftfy = None

# ----------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference() -> ReferenceTokenizer:
    """transformers' CLIP tokenizer, with vocab/merges derived here from the shipped BPE file the way the
    published vocab.json/merges.txt were: 256 byte symbols, the same with '</w>', one token per merge, specials."""
    lines = gzip.decompress(VOCAB_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes = printable + [256 + i for i in range(256 - len(printable))]
    alphabet = [chr(c) for c in codes]
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return ReferenceTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


PROMPTS = {
    "plain": "a photo of an astronaut riding a horse on mars",
    "punctuation": "Hello, World!!! (masterpiece:1.2), [best quality]; {x|y} <lora:foo:0.8> e-mail@x.com ...?!",
    "casing": "A PHOTO Of A CaT iN tHe HaT",
    "accents": "café naïve résumé Ångström Dvořák crème brûlée",
    "decomposed accents": "cafe\u0301 nai\u0308ve",
    "emoji": "🐱🐶 a cat and a dog 👩‍👩‍👧 party 🎉!",
    "cjk": "日本語のテキスト 中文提示词 한국어 프롬프트",
    "apostrophes": "don't DON'T won't I'm you're we've they'll he'd rock'n'roll 'tis !'s",
    "numbers": "1234567890 3.14 1e10 2023-01-01 4k 8K uhd",
    "whitespace": "  multiple    spaces\tand\ttabs\nand\n\nnewlines  ",
    "empty": "",
    "overlong": "a very detailed painting of a castle on a hill at sunset, " * 12,
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_ids_equal_transformers(tok: CLIPTokenizer, reference: ReferenceTokenizer, name: str) -> None:
    prompt = PROMPTS[name]
    assert tok.encode(prompt) == reference(prompt, add_special_tokens=False)["input_ids"]
    ours = tok(prompt, pad_id=END_ID)
    ref = reference(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ours, ref)


def test_batch_equals_transformers(tok: CLIPTokenizer, reference: ReferenceTokenizer) -> None:
    prompts = list(PROMPTS.values())
    ours = tok(prompts, pad_id=END_ID)
    ref = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert ours.dtype == torch.long and ours.shape == (len(prompts), 77)
    assert torch.equal(ours, ref)


def test_vocabulary_constants(tok: CLIPTokenizer) -> None:
    assert hashlib.sha256(VOCAB_PATH.read_bytes()).hexdigest() == VOCAB_SHA256
    assert tok.vocab_size == 49408
    assert (tok.start_id, tok.end_id) == (START_ID, END_ID) == (49406, 49407)
    assert tok.encode("a photo of an astronaut riding a horse on mars") == [
        320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496,
    ]


def test_truncation_keeps_end_token_last(tok: CLIPTokenizer) -> None:
    prompt = PROMPTS["overlong"]
    ids = tok.encode(prompt)
    assert len(ids) > 75
    row = tok(prompt, pad_id=0)[0]
    assert row.shape == (77,)
    assert row[0] == START_ID and row[-1] == END_ID
    assert row[1:76].tolist() == ids[:75]
    # exactly 75 prompt tokens fit without cutting; 76 lose the last one
    fits = tok(" ".join(["cat"] * 75), pad_id=0)[0]
    assert fits[-1] == END_ID and fits[-2] == tok.encode("cat")[0]
    cut = tok(" ".join(["cat"] * 75 + ["dog"]), pad_id=0)[0]
    assert torch.equal(cut, fits)


def test_padding(tok: CLIPTokenizer) -> None:
    sd1 = tok(["a cat", ""], pad_id=END_ID)
    sd2 = tok(["a cat", ""], pad_id=0)
    n = len(tok.encode("a cat")) + 2
    assert torch.equal(sd1[0, :n], sd2[0, :n]) and sd2[0, n - 1] == END_ID
    assert (sd1[0, n:] == END_ID).all() and (sd2[0, n:] == 0).all()
    assert sd2[1, :2].tolist() == [START_ID, END_ID] and (sd2[1, 2:] == 0).all()


@pytest.mark.skipif(ftfy is None, reason="ftfy not installed")
def test_cleaning_like_open_clip(tok: CLIPTokenizer) -> None:
    # Expected ids come from open_clip's SimpleTokenizer (ftfy + double html.unescape + lower), which
    # transformers' fast tokenizer does not reproduce on these inputs.
    expected = {
        "don’t “quoted”": [847, 713, 257, 27706, 257],
        "&amp; &lt;b&gt;": [261, 283, 321, 285],
        "ΟΔΟΣ": [138, 123, 138, 112, 138, 123, 139, 480],  # Python's lower() gives a final sigma
        "mojibake: cafÃ©": [617, 3252, 11878, 281, 15304],
        "ＡＢＣ ﬁsh": [5334, 2759],
    }
    for prompt, ids in expected.items():
        assert tok.encode(prompt) == ids, prompt
    assert tok.encode("don’t") == tok.encode("don't")
    assert tok.encode("salt &amp;amp; pepper") == tok.encode("salt & pepper")


def test_split_words_matches_clip_regex() -> None:
    regex = pytest.importorskip("regex")
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    rng = random.Random(0)
    pool = [chr(c) for c in range(0x20, 0x3000) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    pool += list("abcdemlrstv'''   0123")
    for _ in range(200):
        text = clean_text("".join(rng.choice(pool) for _ in range(rng.randint(0, 40))))
        assert split_words(text) == pattern.findall(text), repr(text)


def test_decode_round_trip(tok: CLIPTokenizer) -> None:
    for prompt in ["a photo of a cat, don't!", "café 日本語 🐱", "x" * 40]:
        assert tok.decode(tok(prompt, pad_id=0)[0]).replace(" ", "") == clean_text(prompt).replace(" ", "")


def test_tokenizer_bad_input(tok: CLIPTokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="prompt must be a str"):
        tok.encode(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty list"):
        tok([], pad_id=0)
    with pytest.raises(ValueError, match="prompt must be a str"):
        tok(["ok", None], pad_id=0)  # type: ignore[list-item]
    for bad in (-1, 49408, "0", 1.0):
        with pytest.raises(ValueError, match="pad_id"):
            tok("a cat", pad_id=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49408])
    damaged = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    damaged.write_bytes(gzip.compress(b"#version: 0.2\ni n\n"))
    with pytest.raises(ValueError, match="sha256"):
        CLIPTokenizer(damaged)
    with pytest.raises(ValueError, match="merge pairs"):
        CLIPTokenizer(damaged, sha256=None)


def test_missing_ftfy_falls_back_to_nfc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_module, "_ftfy", None)
    assert clean_text("  Cafe\u0301   &amp;  X ") == "café & x"


# ------------------------------------------------------------------------------------------------ encoders


def randomize(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights everywhere (layer norms near 1 so they still matter), returned as a state dict."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in module.state_dict().items():
        noise = torch.randn(value.shape, generator=gen)
        is_norm_scale = key.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight", "layer_norm1.weight",
                                      "layer_norm2.weight", "final_layer_norm.weight"))
        sd[key] = 1 + 0.1 * noise if is_norm_scale else 0.1 * noise
    module.load_state_dict(sd)
    return sd


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reference_clip(width: int, layers: int, heads: int, mlp_width: int, act: str) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
    )
    return CLIPTextModel(config).eval()


def load_reference(model: CLIPTextModel, converted: dict[str, torch.Tensor]) -> None:
    # diffusers' converters emit `text_model.*`; transformers 5's CLIPTextModel has no such level.
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    model.load_state_dict(converted, strict=True)


@pytest.fixture(scope="module")
def ids(tok: CLIPTokenizer) -> torch.Tensor:
    return tok(["a photo of a cat", "an oil painting of a lighthouse, don't stop", ""], pad_id=END_ID)


def test_clip_l_keys(ids: torch.Tensor) -> None:
    model = ClipLTextEncoder(ClipLConfig.tiny()).eval()
    sd = randomize(model)
    assert all(k.startswith("transformer.text_model.") for k in sd)
    assert "transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    assert "transformer.text_model.final_layer_norm.weight" in sd
    assert ClipLConfig.from_state_dict(sd) == ClipLConfig.tiny()
    with torch.no_grad():
        expected = model(ids)
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd.items()}
    variants = {
        "new layout": sd,
        "new layout + position_ids": {**sd, "transformer.text_model.embeddings.position_ids": torch.arange(77)[None]},
        "old layout": old,
        "old layout + float position_ids": {**old, "transformer.embeddings.position_ids": torch.arange(77.0)[None]},
    }
    for name, variant in variants.items():
        loaded = ClipLTextEncoder.from_state_dict(variant).eval()
        assert not any(b.is_meta for b in loaded.buffers()), name
        assert set(loaded.state_dict()) == set(sd), name
        with torch.no_grad():
            assert torch.equal(loaded(ids), expected), name


def test_clip_l_matches_diffusers(ids: torch.Tensor) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    config = ClipLConfig.tiny()
    checkpoint = {"cond_stage_model." + k: v for k, v in randomize(ClipLTextEncoder(config), seed=1).items()}
    ours = ClipLTextEncoder.from_state_dict({k.removeprefix("cond_stage_model."): v for k, v in checkpoint.items()})
    ref = reference_clip(config.width, config.layers, config.heads, config.mlp_width, "quick_gelu")
    load_reference(ref, convert_ldm_clip_checkpoint(checkpoint))
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        context = ours(ids)
        assert context.shape == (3, 77, config.width)
        assert rel_err(context, out.last_hidden_state) < 1e-5
        ours.layer = "penultimate"
        assert rel_err(ours(ids), ref.final_layer_norm(out.hidden_states[-2])) < 1e-5


def tiny_sd2_checkpoint(seed: int = 2) -> dict[str, torch.Tensor]:
    return {"cond_stage_model." + k: v for k, v in randomize(OpenClipTextEncoder(OpenClipConfig.tiny()), seed).items()}


def test_open_clip_keys() -> None:
    sd = OpenClipTextEncoder(OpenClipConfig.tiny()).state_dict()
    expected = {"model.token_embedding.weight", "model.positional_embedding", "model.ln_final.weight",
                "model.ln_final.bias", "model.text_projection", "model.logit_scale"}
    for i in range(3):
        for name in ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                     "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias"):
            expected.add(f"model.transformer.resblocks.{i}.{name}")
    assert set(sd) == expected
    assert sd["model.logit_scale"].shape == ()
    assert OpenClipConfig.from_state_dict(sd) == OpenClipConfig.tiny()


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_open_clip_matches_diffusers(ids: torch.Tensor, layer: str) -> None:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    config = OpenClipConfig.tiny()
    checkpoint = tiny_sd2_checkpoint()
    ours = OpenClipTextEncoder.from_state_dict(
        {k.removeprefix("cond_stage_model."): v for k, v in checkpoint.items()}, layer=layer
    ).eval()
    # Like diffusers' SD2 text encoder: "penultimate" is a CLIPTextModel with the last block removed.
    layers = config.layers - 1 if layer == "penultimate" else config.layers
    ref = reference_clip(config.width, layers, config.heads, config.mlp_width, "gelu")
    converted = convert_open_clip_checkpoint(ref, checkpoint, prefix="cond_stage_model.model.")
    converted.pop("text_projection.weight", None)  # diffusers skips it too: SD2 does not use the projection
    converted = {k: v for k, v in converted.items() if not k.startswith(f"text_model.encoder.layers.{layers}.")}
    load_reference(ref, converted)
    tokens = ids.clone()
    tokens[ids == END_ID] = 0  # SD2's padding
    tokens[torch.arange(3), (ids == END_ID).int().argmax(1)] = END_ID
    with torch.no_grad():
        context = ours(tokens)
        assert context.shape == (3, 77, config.width)
        assert rel_err(context, ref(input_ids=tokens).last_hidden_state) < 1e-5


def test_open_clip_file_variants(ids: torch.Tensor) -> None:
    sd = {k.removeprefix("cond_stage_model."): v for k, v in tiny_sd2_checkpoint().items()}
    with torch.no_grad():
        expected = OpenClipTextEncoder.from_state_dict(sd)(ids)
        # image tower and the saved causal mask are ignored
        extra = {**sd, "model.visual.proj": torch.zeros(4, 4), "model.visual.conv1.weight": torch.zeros(8, 3, 14, 14),
                 "model.attn_mask": torch.zeros(77, 77)}
        assert torch.equal(OpenClipTextEncoder.from_state_dict(extra)(ids), expected)
        # files without projection / logit scale, or with a [1]-shaped logit scale, still load strictly
        bare = {k: v for k, v in sd.items() if k not in ("model.text_projection", "model.logit_scale")}
        model = OpenClipTextEncoder.from_state_dict(bare)
        assert model.config.embed_dim is None and model.config.logit_scale_shape is None
        assert torch.equal(model(ids), expected)
        odd = {**sd, "model.logit_scale": torch.ones(1)}
        assert torch.equal(OpenClipTextEncoder.from_state_dict(odd)(ids), expected)


def test_encode_prompts(tok: CLIPTokenizer) -> None:
    prompts = ["a cat", "a dog on a skateboard"]
    for encoder in (ClipLTextEncoder(ClipLConfig.tiny()), OpenClipTextEncoder(OpenClipConfig.tiny())):
        with torch.no_grad():
            context = encode_prompts(encoder.eval(), tok, prompts)
            assert context.shape == (2, 77, 128)
            assert torch.equal(context, encoder(tok(prompts, pad_id=encoder.pad_id)))
    assert ClipLTextEncoder.pad_id == END_ID and OpenClipTextEncoder.pad_id == 0


def test_full_size_clip_l_on_meta() -> None:
    with torch.device("meta"):
        model = ClipLTextEncoder(ClipLConfig())
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
    sd = model.state_dict()
    assert ClipLConfig.from_state_dict(sd) == ClipLConfig(49408, 768, 12, 12, 3072, 77)
    loaded = ClipLTextEncoder.from_state_dict(sd)
    assert loaded.config == ClipLConfig()
    assert loaded(torch.zeros(1, 77, dtype=torch.long, device="meta")).shape == (1, 77, 768)


def test_full_size_open_clip_h_against_diffusers_layout() -> None:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    with torch.device("meta"):
        model = OpenClipTextEncoder(OpenClipConfig())
        # diffusers' SD2 text encoder: the same tower minus the unused last block, as a CLIPTextModel
        ref = reference_clip(1024, 23, 16, 4096, "gelu")
    sd = model.state_dict()
    assert OpenClipConfig.from_state_dict(sd) == OpenClipConfig()
    converted = convert_open_clip_checkpoint(ref, {"cond_stage_model." + k: v for k, v in sd.items()})
    assert "text_projection.weight" not in converted  # diffusers drops it: SD2 does not use the projection
    projection = sd["model.text_projection"]
    assert tuple(projection.shape) == (1024, 1024)
    if not hasattr(ref, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    ref_sd = ref.state_dict()
    assert set(converted) == set(ref_sd)
    assert all(tuple(converted[k].shape) == tuple(ref_sd[k].shape) for k in ref_sd)
    ours_count = sum(p.numel() for p in model.parameters())
    ref_count = sum(p.numel() for p in ref.parameters())
    last_block = sum(p.numel() for p in model.model.transformer.resblocks[23].parameters())
    assert ours_count == ref_count + last_block + projection.numel() + 1  # + logit_scale
    assert model(torch.zeros(2, 77, dtype=torch.long, device="meta")).shape == (2, 77, 1024)


def test_encoder_bad_input(ids: torch.Tensor) -> None:
    clip = ClipLTextEncoder(ClipLConfig.tiny())
    clip_sd = clip.state_dict()
    open_sd = OpenClipTextEncoder(OpenClipConfig.tiny()).state_dict()

    with pytest.raises(ValueError, match="token_embedding"):
        ClipLConfig.from_state_dict({})
    with pytest.raises(ValueError, match="model.token_embedding.weight"):
        OpenClipConfig.from_state_dict(clip_sd)
    with pytest.raises(ValueError, match="token_embedding"):
        ClipLConfig.from_state_dict(open_sd)
    with pytest.raises(ValueError, match="inconsistent widths"):
        ClipLConfig.from_state_dict({**clip_sd, "transformer.text_model.final_layer_norm.weight": torch.ones(64)})
    gap = {k: v for k, v in open_sd.items() if ".resblocks.1." not in k}
    with pytest.raises(ValueError, match=r"gaps, missing indices \[1\]"):
        OpenClipConfig.from_state_dict(gap)
    # Keys and shapes: load_state_dict(strict=True) names them (sd.load runs sd.check_fits on a file first).
    with pytest.raises(RuntimeError, match='Unexpected key.*"model.extra"'):
        OpenClipTextEncoder.from_state_dict({**open_sd, "model.extra": torch.ones(1)})
    bias = "model.transformer.resblocks.2.attn.in_proj_bias"
    with pytest.raises(RuntimeError, match=f"size mismatch for {bias}"):
        OpenClipTextEncoder.from_state_dict({**open_sd, bias: torch.ones(5)})
    missing = {k: v for k, v in clip_sd.items() if not k.endswith("layers.1.mlp.fc2.bias")}
    with pytest.raises(RuntimeError, match='Missing key.*"transformer.text_model.encoder.layers.1.mlp.fc2.bias"'):
        ClipLTextEncoder.from_state_dict(missing)
    mixed = {**clip_sd, "transformer.final_layer_norm.weight": torch.ones(128)}
    with pytest.raises(ValueError, match="mixes old and new layouts"):
        ClipLTextEncoder.from_state_dict(mixed)

    for encoder in (clip, OpenClipTextEncoder(OpenClipConfig.tiny())):
        with pytest.raises(ValueError, match="int64/int32"):
            encoder(ids.float())
        with pytest.raises(ValueError, match=r"shape \[B, T\]"):
            encoder(ids[0])
        with pytest.raises(ValueError, match=r"shape \[B, T\]"):
            encoder(torch.zeros(1, 78, dtype=torch.long))
        with pytest.raises(ValueError, match=r"must lie in \[0, 49408\)"):
            encoder(torch.full((1, 77), 49408))
    with pytest.raises(ValueError, match="layer must be one of"):
        OpenClipTextEncoder(OpenClipConfig.tiny(), layer="middle")
    with pytest.raises(ValueError, match="at least 2 blocks"):
        OpenClipTextEncoder(OpenClipConfig(width=64, layers=1, heads=1, mlp_width=64))
    with pytest.raises(ValueError, match="not divisible"):
        ClipLConfig(width=100, heads=3)
