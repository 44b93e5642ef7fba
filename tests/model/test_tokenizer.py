"""Byte and BPE tokenizers: round trips, EOS, training determinism, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.tokenizer import EOS_ID, BPETokenizer, ByteTokenizer, get_tokenizer, train_bpe

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Ünïcödé and emoji 🚀 survive the round trip.\n",
    "for i in range(10):\n    print(i, i * i)\n" * 10,
]


def test_byte_tokenizer_round_trips_unicode_and_drops_eos():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int64 and ids.max() < 256
        assert tok.decode([*ids.tolist(), EOS_ID]) == text
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_bpe_round_trips_and_compresses():
    tok = train_bpe(TEXTS, vocab_size=300)
    assert tok.vocab_size == 300
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids.tolist()) == text
    joined = "".join(TEXTS)
    assert len(tok.encode(joined)) < 0.6 * len(joined.encode("utf-8"))


def test_bpe_training_is_deterministic_and_named_by_its_merges():
    a, b = train_bpe(TEXTS, vocab_size=280), train_bpe(TEXTS, vocab_size=280)
    assert a.merges == b.merges and a.name == b.name
    assert train_bpe(TEXTS, vocab_size=290).name != a.name


def test_bpe_stops_when_no_pair_repeats():
    tok = train_bpe(["abc"], vocab_size=1000)
    assert tok.vocab_size == 257


def test_bpe_rejects_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(TEXTS, vocab_size=100)


def test_get_tokenizer_loads_a_saved_bpe_file(tmp_path: Path):
    tok = train_bpe(TEXTS, vocab_size=290)
    tok.save(tmp_path / "tok.json")
    loaded = get_tokenizer(str(tmp_path / "tok.json"))
    assert isinstance(loaded, BPETokenizer) and loaded.name == tok.name
    assert loaded.encode(TEXTS[1]).tolist() == tok.encode(TEXTS[1]).tolist()
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="nope"):
        get_tokenizer("nope")
