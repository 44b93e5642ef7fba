"""prepare-data: shards from text and JSONL files, the CLI's errors, the demo corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import structlog
import torch

from elastic.config import ConfigError, build
from elastic.worker.dist import DistInfo
from model import batches, corpus, prepare
from model.config import JobConfig
from model.shards import ShardIndex, open_shard, resolve_shard_url, verify_shard
from model.tokenizer import EOS_ID, ByteTokenizer, get_tokenizer, load_hf_tokenizer
from tests.model.hf_files import LLAMA_EOS_ID, THE_ID, llama_like, tiny_bpe

ROOT = Path(__file__).resolve().parents[2]
DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (5 + i) for i in range(40)]


@pytest.fixture(autouse=True)
def _reset_logging():
    # main() binds JSON logging to the sys.stdout of the moment, a capture that closes after
    # the test; later log lines must not go there.
    yield
    structlog.reset_defaults()


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    (src / "txt").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:20]):
        (src / "txt" / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    lines = [json.dumps({"text": doc, "id": i}) for i, doc in enumerate(DOCS[20:])]
    (src / "docs.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return src


def _decoded_docs(out: Path, name: str) -> list[str]:
    shard = open_shard(str(out / name))
    tokens = shard.window(0, shard.index.num_tokens)
    assert tokens[-1] == EOS_ID
    pieces = np.split(tokens, np.flatnonzero(tokens == EOS_ID) + 1)[:-1]
    return [ByteTokenizer().decode(p.tolist()) for p in pieces]


def test_prepare_sources_writes_one_shard_per_source(inputs: Path, tmp_path: Path):
    out = tmp_path / "out"
    indexes = prepare.prepare_sources(
        {"txt": [f"{inputs}/txt/*.txt"], "json": [str(inputs / "docs.jsonl")]},
        str(out),
        holdout_fraction=0.1,
    )
    assert set(indexes) == {"txt", "json"}
    assert _decoded_docs(out, "txt") == DOCS[:20]
    assert _decoded_docs(out, "json") == DOCS[20:]
    index = indexes["txt"]
    assert index.num_docs == 20 and index.dtype == "uint16" and index.tokenizer == "byte"
    assert index.num_tokens == sum(len(d) + 1 for d in DOCS[:20])
    on_disk = ShardIndex.from_json((out / "txt" / "index.json").read_text())
    assert on_disk == index
    verify_shard(open_shard(str(out / "txt")))


def test_heldout_split_starts_at_a_document_boundary(inputs: Path, tmp_path: Path):
    indexes = prepare.prepare_sources(
        {"txt": [str(inputs / "txt")]}, str(tmp_path / "out"), holdout_fraction=0.1
    )
    index = indexes["txt"]
    starts = np.cumsum([0] + [len(d) + 1 for d in DOCS[:20]])
    assert index.heldout_start in starts.tolist()
    assert 0.05 < index.heldout_tokens / index.num_tokens < 0.2


def test_shard_url_resolves_the_prepare_output_dir(inputs: Path, tmp_path: Path):
    out = tmp_path / "out"
    prepare.prepare_sources({"txt": [str(inputs / "txt")]}, str(out))
    assert resolve_shard_url(str(out), "txt") == f"{out}/txt"
    assert resolve_shard_url(f"file://{out}/txt", "txt") == f"file://{out}/txt"
    assert open_shard(f"file://{out}/txt").index.num_docs == 20


def test_bpe_tokenizer_is_trained_saved_and_recorded(inputs: Path, tmp_path: Path):
    out = tmp_path / "out"
    indexes = prepare.prepare_sources({"txt": [str(inputs / "txt")]}, str(out), tokenizer="bpe:300")
    tok = get_tokenizer(str(out / "txt" / "tokenizer.json"))
    assert indexes["txt"].tokenizer == tok.name and indexes["txt"].vocab_size == tok.vocab_size
    assert (out / "tokenizer.json").is_file()
    shard = open_shard(str(out / "txt"))
    first_doc = shard.window(0, int(np.argmax(shard.tokens == EOS_ID)))
    assert tok.decode(first_doc.tolist()) == DOCS[0]
    assert indexes["txt"].num_tokens < sum(len(d) + 1 for d in DOCS[:20]) * 0.6


def _split_docs(out: Path, name: str, *, eos_id: int) -> list[np.ndarray]:
    shard = open_shard(str(out / name))
    tokens = shard.window(0, shard.index.num_tokens)
    assert tokens[-1] == eos_id
    return np.split(tokens, np.flatnonzero(tokens == eos_id) + 1)[:-1]


def test_hf_tokenizer_makes_shards_in_its_ids_and_keeps_a_copy(inputs: Path, tmp_path: Path):
    path = tiny_bpe(tmp_path / "tokenizer.json", DOCS)
    out = tmp_path / "out"
    indexes = prepare.prepare_sources(
        {"txt": [str(inputs / "txt")]}, str(out), tokenizer=f"hf:{path}"
    )
    tok = load_hf_tokenizer(path)
    index = indexes["txt"]
    assert (index.tokenizer, index.vocab_size, index.dtype) == (tok.name, tok.vocab_size, "uint16")
    assert [tok.decode(d.tolist()) for d in _split_docs(out, "txt", eos_id=tok.eos_id)] == DOCS[:20]
    assert index.num_tokens < sum(len(d) + 1 for d in DOCS[:20]) * 0.6  # subwords, not bytes
    for copy in (out / "tokenizer.json", out / "txt" / "tokenizer.json"):
        assert copy.read_bytes() == path.read_bytes()


def test_a_vocabulary_past_65535_ids_is_stored_as_uint32(inputs: Path, tmp_path: Path):
    path = llama_like(tmp_path / "tokenizer.json")
    out = tmp_path / "out"
    index = prepare.prepare_sources(
        {"txt": [str(inputs / "txt")]}, str(out), tokenizer=f"hf:{path}"
    )["txt"]
    assert (index.vocab_size, index.dtype) == (LLAMA_EOS_ID + 1, "uint32")
    docs = _split_docs(out, "txt", eos_id=LLAMA_EOS_ID)
    assert len(docs) == 20 and all(THE_ID not in d for d in docs)  # DOCS have no " the"
    assert load_hf_tokenizer(path).decode(docs[3].tolist()) == DOCS[3]


def test_ids_past_uint16_read_back_unchanged(tmp_path: Path):
    (tmp_path / "in.txt").write_text("in the end " * 50, encoding="utf-8")
    path = llama_like(tmp_path / "tokenizer.json")
    source = {"t": [str(tmp_path / "in.txt")]}
    prepare.prepare_sources(source, str(tmp_path / "out"), tokenizer=f"hf:{path}")
    tokens = open_shard(str(tmp_path / "out" / "t")).window(0, 8)
    assert tokens.tolist() == [72, 77, THE_ID, 220, 68, 77, 67, 220]  # "in the end "


def _hf_job(tmp_path: Path, **model: int) -> JobConfig:
    (tmp_path / "in.txt").write_text("in the end " * 400, encoding="utf-8")
    path = llama_like(tmp_path / "tokenizer.json")
    source = {"t": [str(tmp_path / "in.txt")]}
    prepare.prepare_sources(source, str(tmp_path / "out"), tokenizer=f"hf:{path}")
    document = {
        "run_dir": str(tmp_path / "run"),
        "model": dict(model),
        "data": {"sources": [{"name": "t", "url": str(tmp_path / "out" / "t")}]},
        "train": {"seq_len": 16, "global_batch_tokens": 64, "micro_batch_size": 4},
    }
    return build(JobConfig, document)


def test_the_trainer_refuses_a_model_vocab_smaller_than_the_shards_naming_the_key(tmp_path: Path):
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError) as refused:
        batches.build_sampler(_hf_job(tmp_path), info)  # the tiny preset: 257 ids
    assert str(refused.value) == (
        "model.vocab_size=257: smaller than the data's tokenizer (128002 ids, from the shard "
        "index); set model.vocab_size to at least 128002"
    )


def test_the_trainer_gets_ids_past_uint16_with_model_vocab_size_set(tmp_path: Path):
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    plan = batches.build_sampler(_hf_job(tmp_path, vocab_size=LLAMA_EOS_ID + 1), info)
    assert plan.sampler.vocab_size == LLAMA_EOS_ID + 1
    ((inputs, targets),) = plan.local(0)
    assert THE_ID in inputs.tolist()[0] and int(targets.max()) <= LLAMA_EOS_ID


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model.prepare", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_prepares_sources_and_logs_json_lines(inputs: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = _cli("--source", f"a={inputs}/txt/0*.txt,{inputs}/txt/1*.txt", "--out", str(out))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert events == ["prepare_source", "prepare_done"]
    assert open_shard(str(out / "a")).index.num_docs == 20


def test_cli_exits_2_with_one_line_naming_a_missing_input(tmp_path: Path):
    result = _cli("--source", f"a={tmp_path}/nope/*.txt", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--source=" in result.stderr and "nope/*.txt" in result.stderr


def test_cli_prepares_with_an_hf_tokenizer_and_logs_its_vocab(inputs: Path, tmp_path: Path):
    path = llama_like(tmp_path / "tokenizer.json")
    out = tmp_path / "out"
    result = _cli("--source", f"a={inputs}/txt", "--out", str(out), "--tokenizer", f"hf:{path}")
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout.splitlines()[-1])
    assert done["event"] == "prepare_done" and done["vocab_size"] == LLAMA_EOS_ID + 1
    assert open_shard(str(out / "a")).index.dtype == "uint32"


def _bad_tokenizer_files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "other.json").write_text('{"model": 1}', encoding="utf-8")
    tiny_bpe(tmp_path / "no_eos.json", DOCS, special=("<pad>",))
    return {
        "hf_missing": f"hf:{tmp_path}/missing/tokenizer.json",
        "hf_broken": f"hf:{tmp_path}/broken.json",
        "hf_other": f"hf:{tmp_path}/other.json",
        "hf_no_eos": f"hf:{tmp_path}/no_eos.json",
        "hf_plain_path": str(llama_like(tmp_path / "llama.json")),
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hf_missing", "no such local file"),
        ("hf_broken", "not a HuggingFace tokenizer.json"),
        ("hf_other", "not a HuggingFace tokenizer.json"),
        ("hf_no_eos", "name one with --eos-token"),
        ("hf_plain_path", "use hf:PATH"),
        ("hf:", "expected hf:PATH"),
        ("sp:tok.model", "unknown scheme 'sp'"),
        ("no/such/file.json", "no such file"),
    ],
)
def test_a_bad_tokenizer_value_exits_2_with_one_line_naming_flag_and_value(
    value: str,
    expected: str,
    inputs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    spec = _bad_tokenizer_files(tmp_path).get(value, value)
    args = ["--source", f"a={inputs}/txt", "--out", str(tmp_path / "out"), "--tokenizer", spec]
    assert prepare.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"prepare-data: --tokenizer={spec!r}: ")
    assert expected in err
    assert not (tmp_path / "out").exists()  # refused before anything is read or written


def test_a_bad_eos_token_exits_2_naming_it(
    inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = llama_like(tmp_path / "tokenizer.json")
    base = ["--source", f"a={inputs}/txt", "--out", str(tmp_path / "out")]
    assert prepare.main([*base, "--tokenizer", f"hf:{path}", "--eos-token", "<nope>"]) == 2
    assert capsys.readouterr().err == (
        f"prepare-data: --eos-token='<nope>': not a token of {path}\n"
    )
    assert prepare.main([*base, "--eos-token", "</s>"]) == 2
    assert "--eos-token='</s>': only for --tokenizer hf:PATH" in capsys.readouterr().err


def test_the_eos_token_can_be_named(inputs: Path, tmp_path: Path):
    path = llama_like(tmp_path / "tokenizer.json")
    out = tmp_path / "out"
    args = ["--source", f"a={inputs}/txt", "--out", str(out), "--tokenizer", f"hf:{path}"]
    assert prepare.main([*args, "--eos-token", "<|begin_of_text|>"]) == 0
    shard = open_shard(str(out / "a"))
    assert shard.window(0, shard.index.num_tokens)[-1] == 128000


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--source", "no-equals-sign"], "--source='no-equals-sign'"),
        (["--source", "a=x", "--holdout-fraction", "0.9"], "--holdout-fraction=0.9"),
        (["--source", "a=x", "--tokenizer", "bpe:12"], "--tokenizer='bpe:12'"),
        (["--format", "xml", "--source", "a=x"], "--format"),
        ([], "--source: missing"),
        (["--demo", "--source", "a=x"], "--demo"),
    ],
)
def test_main_rejects_bad_options_with_exit_2_and_one_line(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exited:
        sys.exit(prepare.main([*args, "--out", str(tmp_path / "out")]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and err.startswith("prepare-data: ")


def test_main_rejects_a_jsonl_line_without_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    code = prepare.main(["--source", f"a={tmp_path}/a.jsonl", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--jsonl-field='text'" in capsys.readouterr().err


def _small_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = {
        name: [f"{name} document {i} " * 50 for i in range(30)]
        for name in ("code", "prose", "legal")
    }
    monkeypatch.setattr(corpus, "collect_demo", lambda **_: docs)


def test_ensure_demo_is_idempotent_and_safe_when_raced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _small_demo(monkeypatch)
    out = tmp_path / "run" / "data"
    results: list[dict[str, ShardIndex]] = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare.ensure_demo(out))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3 and results[0] == results[1] == results[2]
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]  # no temp dirs left
    mtime = (out / prepare.DEMO_MANIFEST).stat().st_mtime_ns
    assert prepare.ensure_demo(out) == results[0]
    assert (out / prepare.DEMO_MANIFEST).stat().st_mtime_ns == mtime
    assert prepare.demo_weights(out) == {
        n: corpus.DEMO_WEIGHTS[n] for n in ("code", "prose", "legal")
    }


def test_ensure_demo_fills_an_existing_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _small_demo(monkeypatch)
    (tmp_path / "data").mkdir()
    assert set(prepare.ensure_demo(tmp_path / "data")) == {"code", "prose", "legal"}


def test_demo_corpus_builds_at_least_three_real_sources_deterministically(tmp_path: Path):
    cap = 384 * 2**10  # smaller than the default so the test stays quick
    first = prepare.prepare_demo(tmp_path / "a", max_bytes_per_source=cap)
    second = prepare.prepare_demo(tmp_path / "b", max_bytes_per_source=cap)
    assert {"code", "prose", "legal"} <= set(first)
    assert first == second  # same sizes, splits and sha256
    for name, index in first.items():
        assert corpus.MIN_SOURCE_BYTES <= index.num_tokens <= cap + index.num_docs, name
        assert index.heldout_tokens > 1024, name
    text = {}
    for name in ("code", "prose"):
        shard = open_shard(str(tmp_path / "a" / name))
        text[name] = ByteTokenizer().decode(shard.window(0, shard.index.num_tokens))
    # prose holds the docstrings, not the code around them
    assert text["code"].count("def ") > 10 * text["prose"].count("def ") + 10


def test_strip_roff_keeps_text_and_drops_markup():
    roff = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\n'
    assert corpus.strip_roff(roff) == "NAME\nls - list directory contents\n"
