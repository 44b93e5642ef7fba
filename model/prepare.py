"""Prepare token shards from text: the ``elasticd prepare-data`` command and the demo corpus.

Usage::

    python -m model.prepare --source NAME=URL[,URL...] [--source ...] --out DIR
        [--tokenizer byte|bpe:VOCAB|hf:PATH|PATH] [--eos-token TOKEN]
        [--holdout-fraction 0.01] [--format text|jsonl] [--jsonl-field text]
    python -m model.prepare --demo --out DIR

Each ``--source`` becomes ``DIR/NAME/`` (see :mod:`model.shards`). Inputs are files: local paths
may be glob patterns (``**`` recurses) or directories (every file below, sorted); other URLs
(``s3://bucket/a.jsonl``) name single files and are read through the repository's storage
adapter. ``.gz`` inputs are decompressed. A text file is one document; a JSONL file holds one
document per line in field ``--jsonl-field``. Without ``--format`` the extension decides
(``.jsonl``/``.ndjson`` -> jsonl, anything else -> text).

``--tokenizer bpe:VOCAB`` trains a byte-level BPE on (up to 4 MB of) every source first and saves
it as ``DIR/tokenizer.json`` and ``DIR/NAME/tokenizer.json``; a path to such a file reuses it.
``--tokenizer hf:PATH`` uses a HuggingFace ``tokenizer.json`` (local file) through the
``tokenizers`` library, copied to the same places; documents are separated by its
end-of-document token (``--eos-token``, else the first of ``<|end_of_text|>``,
``<|endoftext|>``, ``</s>``, ``<eos>`` it has). Shards store ``uint32`` ids when the vocabulary
has 65536 ids or more (``uint16`` below).

Bad input prints one line on stderr naming the option and value and exits with 2.
"""

from __future__ import annotations

import argparse
import functools
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from elastic import jsonlog
from elastic.files import replace_file
from model import corpus
from model.shards import (
    DataError,
    ShardIndex,
    ShardWriter,
    StorageOptions,
    is_local,
    join_url,
    local_path,
    open_shard,
)
from model.tokenizer import (
    BPETokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    UnknownTokenError,
    get_tokenizer,
    load_hf_tokenizer,
    train_bpe,
)

DEMO_MANIFEST = "demo.json"
DEMO_HOLDOUT_FRACTION = 0.02
BPE_TRAIN_BYTES_PER_SOURCE = 4 * 2**20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
TOKENIZER_CHOICES = "byte, bpe:VOCAB, hf:PATH (a HuggingFace tokenizer.json) or a bpe file's path"


class PrepareError(DataError):
    """Bad input to prepare: the message names the option and value."""


def expand_inputs(url: str, *, option: str) -> list[str]:
    """The files ``url`` names: a glob, a directory (recursively) or a single file/URL."""
    if not is_local(url):
        if any(c in url for c in "*?["):
            raise PrepareError(f"{option}={url!r}: glob patterns work for local paths only")
        return [url]
    pattern = str(local_path(url))
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise PrepareError(f"{option}={url!r}: no file matches")
    return paths


def read_input(url: str, *, storage_options: StorageOptions = None) -> bytes:
    if is_local(url):
        data = local_path(url).read_bytes()
    else:
        from elastic.checkpoint.errors import CheckpointError, CheckpointNotFound
        from elastic.checkpoint.storage import Storage  # the single fsspec adapter

        base, _, name = url.rstrip("/").rpartition("/")
        try:
            data = Storage(base, storage_options=storage_options).read_bytes(name)
        except CheckpointNotFound:
            raise PrepareError(f"--source={url!r}: not found") from None
        except CheckpointError as exc:
            raise DataError(f"{url}: {exc}") from exc
    return gzip.decompress(data) if url.endswith(".gz") else data


def input_format(url: str, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    name = url.removesuffix(".gz")
    return "jsonl" if name.endswith((".jsonl", ".ndjson")) else "text"


def documents(
    url: str, *, fmt: str | None, jsonl_field: str, storage_options: StorageOptions = None
) -> Iterator[str]:
    """The documents of one input file."""
    text = read_input(url, storage_options=storage_options).decode("utf-8", errors="replace")
    if input_format(url, fmt) == "text":
        yield text
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrepareError(f"--source: {url}:{number}: not JSON ({exc.msg})") from None
        value = record.get(jsonl_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise PrepareError(f"--jsonl-field={jsonl_field!r}: {url}:{number} has no such text")
        yield value


def write_source(
    out_dir: str,
    name: str,
    docs: Iterable[str],
    *,
    tokenizer: Tokenizer,
    holdout_fraction: float,
    storage_options: StorageOptions = None,
) -> ShardIndex:
    """Tokenize ``docs`` into ``out_dir/name/`` and return its index."""
    writer = ShardWriter(
        join_url(out_dir, name),
        source=name,
        tokenizer=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        storage_options=storage_options,
    )
    for doc in docs:
        writer.add(tokenizer.encode(doc))
    return writer.close(holdout_fraction=holdout_fraction)


def _bpe_sample(docs: Iterable[str]) -> Iterator[str]:
    total = 0
    for doc in docs:
        yield doc
        total += len(doc)
        if total >= BPE_TRAIN_BYTES_PER_SOURCE:
            return


def check_tokenizer_spec(spec: str, *, eos_token: str | None = None) -> None:
    """Reject a bad ``--tokenizer`` or ``--eos-token`` before any input is read."""
    if eos_token is not None and not spec.startswith("hf:"):
        raise PrepareError(f"--eos-token={eos_token!r}: only for --tokenizer hf:PATH")
    if spec.startswith("hf:"):
        load_hf(spec, eos_token=eos_token)
    elif spec.startswith("bpe:"):
        vocab = spec.removeprefix("bpe:")
        if not vocab.isdigit() or int(vocab) < 257:
            raise PrepareError(f"--tokenizer={spec!r}: expected bpe:VOCAB with VOCAB >= 257")
    elif spec != "byte":
        load_bpe_file(spec)


def load_hf(spec: str, *, eos_token: str | None = None) -> HFTokenizer:
    """The HuggingFace tokenizer of ``--tokenizer hf:PATH`` (PrepareError naming the flag)."""
    path = spec.removeprefix("hf:")
    if not path:
        raise PrepareError(f"--tokenizer={spec!r}: expected hf:PATH to a tokenizer.json")
    if not os.path.isfile(path):
        raise PrepareError(f"--tokenizer={spec!r}: no such local file {path!r}")
    try:
        return load_hf_tokenizer(path, eos_token=eos_token)
    except UnknownTokenError:
        raise PrepareError(f"--eos-token={eos_token!r}: not a token of {path}") from None
    except TokenizerError as exc:
        raise PrepareError(f"--tokenizer={spec!r}: {exc}") from None


def load_bpe_file(spec: str) -> Tokenizer:
    """The tokenizer file of ``--tokenizer PATH`` (one that ``bpe:VOCAB`` wrote)."""
    if not os.path.isfile(spec):
        scheme = _SCHEME.match(spec)
        if scheme is not None:
            raise PrepareError(
                f"--tokenizer={spec!r}: unknown scheme {scheme.group(1)!r}; "
                f"expected {TOKENIZER_CHOICES}"
            )
        raise PrepareError(f"--tokenizer={spec!r}: no such file; expected {TOKENIZER_CHOICES}")
    try:
        return get_tokenizer(spec)
    except (ValueError, KeyError, TypeError):
        raise PrepareError(
            f"--tokenizer={spec!r}: not a bpe tokenizer file of prepare-data "
            "(for a HuggingFace tokenizer.json use hf:PATH)"
        ) from None


def resolve_tokenizer(
    spec: str,
    *,
    out_dir: str,
    sample: Callable[[], Iterable[str]],
    storage_options: StorageOptions = None,
    eos_token: str | None = None,
) -> Tokenizer:
    """``byte``, ``bpe:VOCAB`` (trained on ``sample()``), ``hf:PATH`` or a bpe file's path;
    a trained or HuggingFace tokenizer is saved as ``out_dir/tokenizer.json``."""
    tokenizer: Tokenizer
    if spec.startswith("hf:"):
        tokenizer = load_hf(spec, eos_token=eos_token)  # checks it (a large file: read once)
    else:
        check_tokenizer_spec(spec, eos_token=eos_token)
        if spec == "byte":
            return get_tokenizer(spec)
        if not spec.startswith("bpe:"):
            return load_bpe_file(spec)
        tokenizer = train_bpe(sample(), vocab_size=int(spec.removeprefix("bpe:")))
    _write_text(out_dir, "tokenizer.json", _saved_json(tokenizer), storage_options)
    return tokenizer


def _saved_json(tokenizer: Tokenizer) -> str:
    assert isinstance(tokenizer, BPETokenizer | HFTokenizer)
    return tokenizer.to_json()


def _write_text(out_dir: str, name: str, text: str, storage_options: StorageOptions = None) -> None:
    if is_local(out_dir):
        replace_file(local_path(out_dir) / name, text.encode(), durable=True)
    else:
        from elastic.checkpoint.storage import Storage  # the single fsspec adapter

        Storage(out_dir, storage_options=storage_options).write_bytes(name, text.encode())


def prepare_documents(
    sources: Mapping[str, Callable[[], Iterable[str]]],
    out_dir: str,
    *,
    tokenizer: str = "byte",
    holdout_fraction: float = 0.01,
    storage_options: StorageOptions = None,
    eos_token: str | None = None,
) -> dict[str, ShardIndex]:
    """Write one shard per source; ``sources[name]()`` yields that source's documents.

    The callables are invoked once more per source when a BPE tokenizer is trained.
    """
    log = jsonlog.get("model.prepare")

    def sample() -> Iterator[str]:
        for docs in sources.values():
            yield from _bpe_sample(docs())

    tok = resolve_tokenizer(
        tokenizer,
        out_dir=out_dir,
        sample=sample,
        storage_options=storage_options,
        eos_token=eos_token,
    )
    indexes: dict[str, ShardIndex] = {}
    for name, docs in sources.items():
        started = time.monotonic()
        index = write_source(
            out_dir,
            name,
            docs(),
            tokenizer=tok,
            holdout_fraction=holdout_fraction,
            storage_options=storage_options,
        )
        if isinstance(tok, BPETokenizer | HFTokenizer):
            _write_text(join_url(out_dir, name), "tokenizer.json", tok.to_json(), storage_options)
        indexes[name] = index
        log.info(
            "prepare_source",
            source=name,
            num_tokens=index.num_tokens,
            num_docs=index.num_docs,
            vocab_size=index.vocab_size,
            dtype=index.dtype,
            heldout_start=index.heldout_start,
            seconds=round(time.monotonic() - started, 3),
        )
    return indexes


def prepare_sources(
    inputs: Mapping[str, Sequence[str]],
    out_dir: str,
    *,
    tokenizer: str = "byte",
    holdout_fraction: float = 0.01,
    fmt: str | None = None,
    jsonl_field: str = "text",
    storage_options: StorageOptions = None,
    eos_token: str | None = None,
) -> dict[str, ShardIndex]:
    """Shards from files: ``inputs[name]`` lists URLs or local glob patterns.

    ``storage_options`` go to fsspec for remote inputs and a remote ``out_dir``.
    """
    files = {
        name: [f for url in urls for f in expand_inputs(url, option="--source")]
        for name, urls in inputs.items()
    }

    def reader(paths: list[str]) -> Callable[[], Iterator[str]]:
        return lambda: (
            doc
            for path in paths
            for doc in documents(
                path, fmt=fmt, jsonl_field=jsonl_field, storage_options=storage_options
            )
        )

    return prepare_documents(
        {name: reader(paths) for name, paths in files.items()},
        out_dir,
        tokenizer=tokenizer,
        holdout_fraction=holdout_fraction,
        storage_options=storage_options,
        eos_token=eos_token,
    )


def prepare_demo(
    out_dir: str | Path,
    *,
    tokenizer: str = "byte",
    max_bytes_per_source: int = corpus.MAX_SOURCE_BYTES,
    eos_token: str | None = None,
) -> dict[str, ShardIndex]:
    """Build the demo corpus (:mod:`model.corpus`) into ``out_dir``, manifest written last."""
    collected = corpus.collect_demo(max_bytes_per_source=max_bytes_per_source)
    indexes = prepare_documents(
        {name: functools.partial(iter, docs) for name, docs in collected.items()},
        str(out_dir),
        tokenizer=tokenizer,
        holdout_fraction=DEMO_HOLDOUT_FRACTION,
        eos_token=eos_token,
    )
    weights = {name: corpus.DEMO_WEIGHTS[name] for name in indexes}
    manifest = {"format": 1, "weights": weights, "tokenizer": tokenizer}
    _write_text(str(out_dir), DEMO_MANIFEST, json.dumps(manifest, indent=1))
    return indexes


def load_demo(out_dir: str | Path) -> dict[str, ShardIndex]:
    """Indexes of a built demo corpus (raises ShardNotFound/ShardCorrupt if incomplete)."""
    manifest = json.loads((Path(out_dir) / DEMO_MANIFEST).read_text(encoding="utf-8"))
    return {name: open_shard(str(Path(out_dir) / name)).index for name in manifest["weights"]}


def demo_weights(out_dir: str | Path) -> dict[str, float]:
    manifest = json.loads((Path(out_dir) / DEMO_MANIFEST).read_text(encoding="utf-8"))
    return {str(k): float(v) for k, v in manifest["weights"].items()}


def ensure_demo(out_dir: str | Path) -> dict[str, ShardIndex]:
    """Build the demo corpus into local ``out_dir`` unless it is already there; idempotent.

    Safe when several processes call it at once: each builds into its own temp dir beside
    ``out_dir`` and renames it into place; ``rename`` onto a non-empty directory fails, so the
    first finisher wins and the others discard their copy. The corpus is deterministic, so it does
    not matter whose copy stays. ``out_dir`` must be absent, empty, or a built demo corpus.
    """
    out = Path(out_dir)
    if (out / DEMO_MANIFEST).is_file():
        return load_demo(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        prepare_demo(tmp)
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if not (out / DEMO_MANIFEST).is_file():
                raise DataError(f"{out}: exists and is not a demo corpus ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_demo(out)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as for every other bad input (argparse would print usage first).
        self.exit(2, f"prepare-data: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prepare-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", action="append", default=[], metavar="NAME=URL[,URL...]")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--demo", action="store_true", help="build the demo corpus into DIR")
    parser.add_argument("--tokenizer", default="byte", metavar="byte|bpe:VOCAB|hf:PATH|PATH")
    parser.add_argument(
        "--eos-token",
        default=None,
        metavar="TOKEN",
        help="hf: only: the token written after every document (default: the first of "
        "<|end_of_text|>, <|endoftext|>, </s>, <eos> the tokenizer has)",
    )
    parser.add_argument("--holdout-fraction", type=float, default=0.01)
    parser.add_argument("--format", choices=("text", "jsonl"), default=None)
    parser.add_argument("--jsonl-field", default="text")
    parser.add_argument(
        "--storage-options",
        default="{}",
        metavar="JSON",
        help='fsspec options for remote URLs, e.g. {"endpoint_url": "http://minio:9000"}',
    )
    return parser


def parse_sources(items: Sequence[str]) -> dict[str, list[str]]:
    sources: dict[str, list[str]] = {}
    for item in items:
        name, sep, urls = item.partition("=")
        if not sep or not _NAME.match(name) or not urls.strip(","):
            raise PrepareError(f"--source={item!r}: expected NAME=URL[,URL...]")
        if name in sources:
            raise PrepareError(f"--source={item!r}: source {name!r} given twice")
        sources[name] = [u for u in urls.split(",") if u]
    return sources


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if not 0.0 <= args.holdout_fraction < 0.5:
        raise PrepareError(f"--holdout-fraction={args.holdout_fraction!r}: must be in [0, 0.5)")
    check_tokenizer_spec(args.tokenizer, eos_token=args.eos_token)
    if args.demo and args.source:
        raise PrepareError(f"--demo: builds its own sources; drop --source={args.source[0]!r}")
    if not args.demo and not args.source:
        raise PrepareError("--source: missing; give NAME=URL[,URL...] at least once, or --demo")
    if args.demo:
        if not is_local(args.out):
            raise PrepareError(f"--out={args.out!r}: the demo corpus is built on local disk")
        return prepare_demo(args.out, tokenizer=args.tokenizer, eos_token=args.eos_token)
    return prepare_sources(
        parse_sources(args.source),
        args.out,
        tokenizer=args.tokenizer,
        holdout_fraction=args.holdout_fraction,
        fmt=args.format,
        jsonl_field=args.jsonl_field,
        storage_options=_storage_options(args.storage_options),
        eos_token=args.eos_token,
    )


def _storage_options(text: str) -> dict[str, Any]:
    try:
        options = json.loads(text)
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise PrepareError(f"--storage-options={text!r}: must be a JSON object")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    jsonlog.configure()
    try:
        indexes = _run(args)
    except PrepareError as exc:
        print(f"prepare-data: {exc}", file=sys.stderr)
        return 2
    except (DataError, OSError) as exc:
        print(f"prepare-data: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    jsonlog.get("model.prepare").info(
        "prepare_done",
        out=args.out,
        sources=sorted(indexes),
        num_tokens=sum(i.num_tokens for i in indexes.values()),
        tokenizer=next(iter(indexes.values())).tokenizer,
        vocab_size=next(iter(indexes.values())).vocab_size,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
