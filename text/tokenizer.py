"""CLIP's byte-level BPE tokenizer, offline: turns prompts into the [B, 77] id tensors both SD text encoders read."""

from __future__ import annotations

import functools
import gzip
import re
import hashlib
import html
import unicodedata
from pathlib import Path

import torch

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
# The standard vocabulary (as shipped by OpenAI CLIP and open-clip-torch); a different file gives different ids.
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # the vocabulary was trained to 49152 entries: 256 bytes + merges + 2 specials
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408: bytes, bytes ending a word, one entry per merge, specials
START_ID = 49406  # <|startoftext|>
END_ID = 49407  # <|endoftext|>
# SD1 (CompVis, transformers' CLIPTokenizer) pads with the end token, SD2 (open_clip.tokenize) with zeros.
PAD_ID_CLIP_L = END_ID
PAD_ID_OPEN_CLIP = 0

END_OF_WORD = "</w>"
# Kept as whole pieces, like CLIP's pre-tokenizer regex `'s|'t|'re|'ve|'m|'ll|'d|...`.
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

try:  # CLIP was trained on ftfy-cleaned text; without it, curly quotes, mojibake etc. tokenize differently.
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - exercised only where ftfy is missing
    _ftfy = None


def bytes_to_symbols() -> dict[int, str]:
    """Map every byte to one printable character, so that BPE can run on plain strings.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7f-0xa0, soft hyphen)
    are shifted to code points 256, 257, ... in byte order. The dict's order (printable bytes first, then
    the shifted ones) is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def clean_text(text: str) -> str:
    """Normalise a prompt the way CLIP's reference tokenizer does before splitting it into words."""
    # NFC is also what ftfy.fix_text ends with, so the fallback differs only on text ftfy would repair.
    text = _ftfy.fix_text(text) if _ftfy is not None else unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))  # twice, as the reference does: web captions are often double-escaped
    return " ".join(text.split()).lower()


def _char_kind(char: str) -> str:
    """'L' letter, 'N' number, ' ' whitespace, 'P' anything else (punctuation, symbols, emoji, marks)."""
    if char.isspace():
        return " "
    major = unicodedata.category(char)[0]
    return major if major in ("L", "N") else "P"


def split_words(text: str) -> list[str]:
    """Split cleaned text into the pieces BPE works on, equal to CLIP's regex
    `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (a hand-written scan, so no `regex` dependency).

    Letters group into runs, every digit stands alone, any other non-space characters group into runs
    (a run of punctuation swallows apostrophes too: "!'s" -> "!'", "s").
    """
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        kind = _char_kind(text[i])
        if kind == " ":
            i += 1
            continue
        if text[i] == "'":
            contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if contraction is not None:
                words.append(contraction)
                i += len(contraction)
                continue
        j = i + 1
        if kind != "N":
            while j < n and _char_kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


@functools.lru_cache(maxsize=4)
def _load_vocabulary(path: str, sha256: str | None) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Read the merges file once per process; returns (token -> id, merge pair -> rank)."""
    raw = Path(path).read_bytes()
    if sha256 is not None:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256:
            raise ValueError(
                f"CLIP BPE vocabulary {path} has sha256 {actual}, expected {sha256}: "
                "the file is damaged or is not the standard bpe_simple_vocab_16e6.txt.gz"
            )
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Line 0 is a version header; only the first NUM_MERGES merges made it into the released model.
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"CLIP BPE vocabulary {path} does not hold {NUM_MERGES} merge pairs")
    symbols = list(bytes_to_symbols().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    token_to_id = {t: i for i, t in enumerate(tokens)}
    if len(token_to_id) != VOCAB_SIZE:
        raise ValueError(f"CLIP BPE vocabulary {path} gives {len(token_to_id)} distinct tokens, expected {VOCAB_SIZE}")
    ranks = {m: r for r, m in enumerate(merges)}
    return token_to_id, ranks


class CLIPTokenizer:
    """Prompt -> token ids for CLIP text encoders (77 positions, start/end tokens, truncation, padding)."""

    def __init__(
        self,
        vocab_path: str | Path = VOCAB_PATH,
        context_length: int = CONTEXT_LENGTH,
        sha256: str | None = VOCAB_SHA256,
    ) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must leave room for the start and end tokens, got {context_length}")
        self.context_length = context_length
        self.token_to_id, self._ranks = _load_vocabulary(str(vocab_path), sha256)
        self.id_to_token = {i: t for t, i in self.token_to_id.items()}
        self.byte_to_symbol = bytes_to_symbols()
        self.symbol_to_byte = {s: b for b, s in self.byte_to_symbol.items()}
        self.start_id = self.token_to_id["<|startoftext|>"]
        self.end_id = self.token_to_id["<|endoftext|>"]
        self._word_cache: dict[str, list[int]] = {}
        # New tokens (textual inversion, text.new_tokens): a string that stands for ids past the vocabulary, one per
        # vector. Kept apart from token_to_id, which is shared by every tokenizer of the process.
        self.added_tokens: dict[str, list[int]] = {}
        self._added_pattern: re.Pattern | None = None

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can produce: the file's vocabulary, then the rows of added tokens."""
        return len(self.token_to_id) + sum(len(ids) for ids in self.added_tokens.values())

    def add_token(self, token: str, num_vectors: int) -> list[int]:
        """Give `token` num_vectors new ids at the end of the vocabulary; in a prompt it then becomes those ids
        (matched as written, case-insensitively, wherever it occurs). Checks: see text.new_tokens.check_token."""
        ids = list(range(self.vocab_size, self.vocab_size + num_vectors))
        self.added_tokens[token] = ids
        names = sorted(self.added_tokens, key=len, reverse=True)  # the longest first: '<cat-2>' before '<cat>'
        self._added_pattern = re.compile("|".join(re.escape(t) for t in names), re.IGNORECASE)
        return ids

    def _bpe(self, word: str) -> list[str]:
        """Apply merges to one word (already mapped to byte symbols), lowest rank first, until none applies."""
        parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self._ranks.get(pair, NUM_MERGES))
            if best not in self._ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _encode_word(self, word: str) -> list[int]:
        ids = self._word_cache.get(word)
        if ids is None:
            symbols = "".join(self.byte_to_symbol[b] for b in word.encode("utf-8"))
            ids = [self.token_to_id[p] for p in self._bpe(symbols)]
            if len(self._word_cache) < 100_000:  # prompts reuse few words; the cap only bounds pathological input
                self._word_cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
        # Special-token strings typed into a prompt are encoded as ordinary text.
        if self._added_pattern is None:
            return self._encode_text(text)
        ids, at = [], 0
        for match in self._added_pattern.finditer(text):
            ids += self._encode_text(text[at:match.start()])
            ids += next(v for k, v in self.added_tokens.items() if k.lower() == match.group().lower())
            at = match.end()
        return ids + self._encode_text(text[at:])

    def _encode_text(self, text: str) -> list[int]:
        return [i for word in split_words(clean_text(text)) for i in self._encode_word(word)]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of token ids; lossy only where cleaning was (case, spacing). Stops at the first end token,
        since whatever follows it is padding (0 for OpenCLIP would otherwise read as '!')."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        added = {ids[0]: token for token, ids in self.added_tokens.items()}
        rest = {i for ids in self.added_tokens.values() for i in ids[1:]}  # a token's later vectors add no text
        bad = [i for i in ids if i not in self.id_to_token and i not in added and i not in rest]
        if bad:
            raise ValueError(f"token ids outside the vocabulary of {self.vocab_size}: {bad[:10]}")
        as_symbols = lambda t: "".join(self.byte_to_symbol[b] for b in t.encode("utf-8")) + END_OF_WORD  # noqa: E731
        symbols = "".join(self.id_to_token[i] if i in self.id_to_token else as_symbols(added[i])
                          for i in ids if i != self.start_id and i not in rest)
        out = bytearray()
        for word in symbols.split(END_OF_WORD):
            out.extend(self.symbol_to_byte[s] for s in word)
            out.extend(b" ")
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: str | list[str], pad_id: int) -> torch.Tensor:
        """LongTensor [B, context_length]: start, ids, end, then pad_id.

        Long prompts are cut so that the end token stays last."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a str or a non-empty list of str, got {prompts!r}")
        if not isinstance(pad_id, int) or not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be a token id in [0, {self.vocab_size}), got {pad_id!r}")
        body = self.context_length - 2
        out = torch.full((len(prompts), self.context_length), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = [self.start_id, *self.encode(prompt)[:body], self.end_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
