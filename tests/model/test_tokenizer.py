"""Byte, BPE and HuggingFace tokenizers: round trips, EOS, training determinism, files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from model.tokenizer import (
    EOS_ID,
    BPETokenizer,
    ByteTokenizer,
    TokenizerError,
    UnknownTokenError,
    get_tokenizer,
    load_hf_tokenizer,
    train_bpe,
)
from tests.model.hf_files import LLAMA_EOS, LLAMA_EOS_ID, THE_ID, llama_like, tiny_bpe

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


# ----------------------------------------------------------------- HuggingFace tokenizer.json
def test_hf_tokenizer_round_trips_text_and_separates_documents_with_its_eos(tmp_path: Path):
    path = tiny_bpe(tmp_path / "tokenizer.json", TEXTS)
    tok = load_hf_tokenizer(path)
    text = "the quick brown fox, ünïcode 42"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and len(ids) > 0 and tok.eos_id not in ids.tolist()
    assert tok.decode([*ids.tolist(), tok.eos_id]) == text
    assert tok.eos_token == "</s>" and tok.eos_id == 0
    assert tok.vocab_size == tokenizers.Tokenizer.from_file(str(path)).get_vocab_size()
    assert tok.name.startswith(f"hf-{tok.vocab_size}-")


def test_hf_tokenizer_skips_the_post_processor_bos_and_counts_ids_up_to_its_largest(
    tmp_path: Path,
):
    tok = load_hf_tokenizer(llama_like(tmp_path / "tokenizer.json"))
    assert tok.encode("in the end").tolist() == [72, 77, THE_ID, 220, 68, 77, 67]  # no BOS
    assert (tok.eos_token, tok.eos_id) == (LLAMA_EOS, LLAMA_EOS_ID)
    assert tok.vocab_size == LLAMA_EOS_ID + 1


def test_hf_tokenizer_name_follows_the_file_contents(tmp_path: Path):
    one = load_hf_tokenizer(tiny_bpe(tmp_path / "one.json", TEXTS))
    again = load_hf_tokenizer(tiny_bpe(tmp_path / "again.json", TEXTS))
    other = load_hf_tokenizer(tiny_bpe(tmp_path / "other.json", TEXTS[:1], vocab_size=280))
    assert one.name == again.name != other.name


def test_hf_eos_token_can_be_named_and_an_unknown_one_is_refused(tmp_path: Path):
    path = tiny_bpe(tmp_path / "tokenizer.json", TEXTS, special=("<pad>", "<|endoftext|>"))
    assert load_hf_tokenizer(path).eos_token == "<|endoftext|>"
    assert load_hf_tokenizer(path, eos_token="<pad>").eos_id == 0
    with pytest.raises(UnknownTokenError, match="'<nope>' is not a token"):
        load_hf_tokenizer(path, eos_token="<nope>")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a HuggingFace tokenizer.json"),
        ('{"model": 1}', "not a HuggingFace tokenizer.json"),
        (None, "no end-of-document token among <|end_of_text|>, <|endoftext|>, </s>, <eos>"),
    ],
)
def test_unusable_hf_files_raise_one_line(tmp_path: Path, content: str | None, message: str):
    path = tmp_path / "tokenizer.json"
    if content is None:
        tiny_bpe(path, TEXTS, special=("<pad>",))
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=re.escape(message)) as info:
        load_hf_tokenizer(path)
    assert "\n" not in str(info.value)
