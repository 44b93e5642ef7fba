"""Tokenizers: byte-level (the default), a small byte-level BPE trained on local text, and any
HuggingFace ``tokenizer.json`` (Llama, Mistral, GPT-2, Qwen...) through the ``tokenizers`` library.

The byte and BPE tokenizers map text to ids over the same base: ids 0..255 are raw UTF-8 bytes
and id 256 is EOS, the document separator written after every document in a shard. BPE adds
merged byte sequences as ids 257.. in merge order. Decoding is lossless for valid UTF-8 (EOS is
dropped); a window cut in the middle of a multi-byte character decodes with U+FFFD.

The BPE trainer is deliberately modest (pure Python, incremental pair counts, a few seconds for a
vocabulary of ~1k on a few MB): it exists so a run can use a subword vocabulary without any
download, not to compete with production tokenizers. Text is first split into chunks (words with
their leading space, digit runs, punctuation runs, whitespace) and merges never cross chunks, as
in GPT-2.

``get_tokenizer("byte")`` or ``get_tokenizer("path/to/tokenizer.json")`` (a BPE file of ours);
``load_hf_tokenizer(path)`` for a HuggingFace file. A HuggingFace tokenizer encodes without its
special tokens (no BOS: documents are separated by its end-of-document token, as ours are by
EOS); its ``vocab_size`` is its largest id + 1, added tokens included.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import tokenizers

EOS_ID = 256
BYTE_VOCAB_SIZE = 257  # 256 bytes + EOS

# GPT-2's pre-tokenizer, restricted to what the stdlib ``re`` supports (no \p{L} classes).
_CHUNK = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...  # (N,) int64, no EOS appended

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids; EOS = 256."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = EOS_ID

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE: ``merges[k] = (a, b)`` makes id ``257 + k`` from the pair of ids (a, b)."""

    def __init__(self, merges: Iterable[tuple[int, int]]) -> None:
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.vocab_size = BYTE_VOCAB_SIZE + len(self.merges)
        self.eos_id = EOS_ID
        digest = hashlib.sha256(json.dumps(self.merges).encode()).hexdigest()[:8]
        self.name = f"bpe-{self.vocab_size}-{digest}"
        self._pieces: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for rank, (a, b) in enumerate(self.merges):
            self._pieces[BYTE_VOCAB_SIZE + rank] = self._pieces[a] + self._pieces[b]
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> np.ndarray:
        ids: list[int] = []
        for chunk in _CHUNK.findall(text):
            cached = self._cache.get(chunk)
            if cached is None:
                cached = self._encode_chunk(chunk)
                if len(self._cache) < 200_000:  # bound memory on huge, diverse corpora
                    self._cache[chunk] = cached
            ids.extend(cached)
        return np.asarray(ids, dtype=np.int64)

    def _encode_chunk(self, chunk: str) -> list[int]:
        word = list(chunk.encode("utf-8"))
        while len(word) > 1:
            # Apply the earliest-learned merge present, exactly as training did.
            best = min(itertools.pairwise(word), key=lambda p: self.ranks.get(p, 1 << 62))
            rank = self.ranks.get(best)
            if rank is None:
                break
            word = _merge(word, best, BYTE_VOCAB_SIZE + rank)
        return word

    def decode(self, ids: Iterable[int]) -> str:
        data = b"".join(self._pieces.get(int(i), b"") for i in ids if int(i) != EOS_ID)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> str:
        payload = {"type": "bpe", "version": 1, "vocab_size": self.vocab_size, "eos_id": EOS_ID}
        return json.dumps({**payload, "merges": self.merges})

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        data = json.loads(text)
        if data.get("type") != "bpe" or data.get("eos_id") != EOS_ID:
            raise ValueError("not a byte-level BPE tokenizer file")
        return cls(tuple(pair) for pair in data["merges"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")


def _merge(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(texts: Iterable[str], *, vocab_size: int) -> BPETokenizer:
    """Learn ``vocab_size - 257`` merges from ``texts`` (deterministic for the same input).

    Pair counts are kept incrementally: a merge only revisits the words containing the pair.
    Ties between equally frequent pairs go to the smallest pair, so the result does not depend on
    dictionary order.
    """
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size}: must be >= {BYTE_VOCAB_SIZE}")
    word_counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        word_counts.update(_CHUNK.findall(text))
    words = [list(w.encode("utf-8")) for w in sorted(word_counts)]
    freqs = [word_counts[w] for w in sorted(word_counts)]
    pair_counts: collections.Counter[tuple[int, int]] = collections.Counter()
    where: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for index, word in enumerate(words):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += freqs[index]
            where[pair].add(index)
    # Max-heap by (count, smallest pair) with lazy deletion: an entry is live only while its
    # count still matches pair_counts.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < vocab_size - BYTE_VOCAB_SIZE and heap:
        neg_count, best = heapq.heappop(heap)
        if pair_counts.get(best) != -neg_count:
            continue  # stale entry
        if -neg_count < 2:
            break  # nothing repeats any more: more merges would only memorise
        new_id = BYTE_VOCAB_SIZE + len(merges)
        merges.append(best)
        touched: set[tuple[int, int]] = set()
        for index in sorted(where.pop(best)):
            old = words[index]
            new = _merge(old, best, new_id)
            if len(new) == len(old):
                continue  # the word lost this pair to an earlier merge
            for pair in itertools.pairwise(old):
                pair_counts[pair] -= freqs[index]
                touched.add(pair)
            for pair in itertools.pairwise(new):
                pair_counts[pair] += freqs[index]
                where[pair].add(index)
                touched.add(pair)
            words[index] = new
        for pair in touched:
            count = pair_counts.get(pair, 0)
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            else:
                pair_counts.pop(pair, None)
    return BPETokenizer(merges)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (one line, for the caller to prefix)."""


class UnknownTokenError(TokenizerError):
    """A token named by the user that the tokenizer does not have."""


# End-of-document tokens of common HuggingFace tokenizers, in the order they are tried:
# Llama 3, GPT-2 / Qwen / Falcon, Llama 2 / Mistral / T5, Gemma.
HF_EOS_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


class HFTokenizer:
    """A HuggingFace ``tokenizers.Tokenizer`` behind this module's :class:`Tokenizer` protocol.

    ``name`` is ``hf-<vocab_size>-<sha256 of the file, 8 hex>``: shards made with different
    files never mix (``model.mixture`` compares names).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, text: str, eos_token: str) -> None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise UnknownTokenError(f"{eos_token!r} is not a token of this tokenizer")
        self._tokenizer = tokenizer
        self._text = text
        self.eos_token = eos_token
        self.eos_id = int(eos_id)
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
        self.name = f"hf-{self.vocab_size}-{digest}"

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        """The ``tokenizer.json`` it was loaded from, unchanged."""
        return self._text


def load_hf_tokenizer(path: str | Path, *, eos_token: str | None = None) -> HFTokenizer:
    """The HuggingFace tokenizer in ``path`` with its end-of-document token (``eos_token``, else
    the first of :data:`HF_EOS_TOKENS` it knows). :class:`TokenizerError` when the file is
    unreadable, not a tokenizer.json or has none of them; :class:`UnknownTokenError` when it
    lacks ``eos_token``."""
    import tokenizers  # only prepare-data needs it; the trainer never tokenizes

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read it ({exc})") from None
    try:
        tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # the Rust parser raises plain Exception
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TokenizerError(f"not a HuggingFace tokenizer.json ({first[:200]})") from None
    if eos_token is None:
        known = [t for t in HF_EOS_TOKENS if tokenizer.token_to_id(t) is not None]
        if not known:
            raise TokenizerError(
                f"no end-of-document token among {', '.join(HF_EOS_TOKENS)}; name one with "
                "--eos-token"
            )
        eos_token = known[0]
    return HFTokenizer(tokenizer, text=text, eos_token=eos_token)


def get_tokenizer(name_or_path: str) -> Tokenizer:
    """``"byte"``, or the path of a BPE tokenizer JSON file written by :meth:`BPETokenizer.save`."""
    if name_or_path == "byte":
        return ByteTokenizer()
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"tokenizer={name_or_path!r}: not 'byte' and not a tokenizer JSON file")
    return BPETokenizer.from_json(path.read_text(encoding="utf-8"))
