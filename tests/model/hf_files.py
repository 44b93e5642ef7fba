"""HuggingFace tokenizer.json files the tests build themselves with ``tokenizers`` (no download)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Llama 3 numbers its specials from 128000; its vocabulary has 128256 ids.
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA_BOS_ID, LLAMA_EOS_ID = 128000, 128001
THE_ID = 127999  # "Ġthe": an ordinary token above uint16's range


def tiny_bpe(
    path: Path, texts: Iterable[str], *, special: Sequence[str] = ("</s>",), vocab_size: int = 320
) -> Path:
    """A byte-level BPE trained on ``texts`` (GPT-2 style), saved as ``path``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    tokenizer.save(str(path))
    return path


def llama_like(path: Path) -> Path:
    """Llama-3-shaped: byte-level BPE, specials at 128000/128001 and a post-processor that
    prepends BOS (what ``add_special_tokens=True`` would do); a few merges, ids up to 128001."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {"Ġt": 70000, "he": 70001, "Ġthe": THE_ID, LLAMA_BOS: LLAMA_BOS_ID}
    vocab[LLAMA_EOS] = LLAMA_EOS_ID
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([LLAMA_BOS, LLAMA_EOS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A", special_tokens=[(LLAMA_BOS, LLAMA_BOS_ID)]
    )
    tokenizer.save(str(path))
    return path
