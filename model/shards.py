"""Token shards on disk or object storage: one flat token array per data source.

A prepared source is a directory ``<dir>/<source>/`` holding

- ``tokens.bin``: every document's tokens followed by EOS, concatenated; little-endian
  ``uint16`` when the vocabulary fits (< 65536 ids), else ``uint32``;
- ``index.json`` (written last, so its presence means the shard is complete)::

    {"format": 1, "source": "code", "tokenizer": "byte", "vocab_size": 257, "dtype": "uint16",
     "num_tokens": 3145728, "num_docs": 812, "heldout_start": 3114011,
     "files": ["tokens.bin"], "sha256": "..."}

``heldout_start`` is the token offset where the held-out (eval) split begins: the last
``holdout_fraction`` of the tokens, moved forward to the next document start when one exists so
no document straddles the two splits. Training crops windows from ``[0, heldout_start)`` only.

Local paths and ``file://`` URLs are read through a numpy memmap (nothing is loaded up front).
Other URLs (``s3://...``) go through :class:`elastic.checkpoint.storage.Storage`, the repository's
single fsspec adapter, and the token file is read whole into memory: fine for shards of a few
hundred MB per source; larger remote corpora should be staged to local disk first.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from elastic.files import replace_file

INDEX_FILE = "index.json"
TOKENS_FILE = "tokens.bin"
FORMAT_VERSION = 1
StorageOptions = Mapping[str, Any] | None


class DataError(Exception):
    """Root error of the data pipeline (shards, prepare, sampler input)."""


class ShardNotFound(DataError):
    """No ``index.json`` at the given location."""


class ShardCorrupt(DataError):
    """The index and the token file disagree, or the index is unreadable."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size < 2**16 else "uint32"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


@dataclass(frozen=True)
class ShardIndex:
    source: str
    tokenizer: str
    vocab_size: int
    dtype: str
    num_tokens: int
    num_docs: int
    heldout_start: int
    files: tuple[str, ...] = (TOKENS_FILE,)
    sha256: str = ""
    format: int = FORMAT_VERSION

    @property
    def train_tokens(self) -> int:
        return self.heldout_start

    @property
    def heldout_tokens(self) -> int:
        return self.num_tokens - self.heldout_start

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, *, where: str = "index.json") -> ShardIndex:
        try:
            data: dict[str, Any] = json.loads(text)
            data["files"] = tuple(data["files"])
            index = cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise ShardCorrupt(f"{where}: not a shard index ({exc})") from exc
        if index.format != FORMAT_VERSION or index.files != (TOKENS_FILE,):
            raise ShardCorrupt(f"{where}: unsupported shard format {index.format}")
        return index


def heldout_offset(num_tokens: int, doc_starts: list[int], *, holdout_fraction: float) -> int:
    """First token of the held-out split: the next document start after the cut, if any."""
    cut = num_tokens - round(num_tokens * holdout_fraction)
    i = bisect.bisect_left(doc_starts, cut)
    return doc_starts[i] if i < len(doc_starts) else cut


class ShardWriter:
    """Streams documents into ``tokens.bin`` and writes ``index.json`` last.

    Writes go to a local file (under ``out_dir`` when local, else a temp file uploaded through
    :class:`Storage` on :meth:`close`), so memory stays bounded by one document.
    """

    def __init__(
        self,
        out_url: str,
        *,
        source: str,
        tokenizer: str,
        vocab_size: int,
        eos_id: int,
        storage_options: StorageOptions = None,
    ) -> None:
        self.out_url = out_url
        self.storage_options = storage_options
        self.source = source
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.dtype = np.dtype(token_dtype(vocab_size)).newbyteorder("<")
        if is_local(out_url):
            local_path(out_url).mkdir(parents=True, exist_ok=True)
            self._path = local_path(out_url) / TOKENS_FILE
            self._file = open(self._path, "wb")  # noqa: SIM115 (closed in close())
        else:
            fd, name = tempfile.mkstemp(suffix=".bin")
            self._path = Path(name)
            self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._doc_starts: list[int] = []
        self.num_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        """Append one document (ids without EOS); empty documents are skipped."""
        if len(ids) == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            # astype() below would wrap such an id silently into a wrong token.
            raise DataError(
                f"{self.source}: token ids {int(ids.min())}..{int(ids.max())} outside the "
                f"vocabulary 0..{self.vocab_size - 1} of tokenizer {self.tokenizer}"
            )
        self._doc_starts.append(self.num_tokens)
        data = np.append(ids, self.eos_id).astype(self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.num_tokens += len(ids) + 1

    def close(self, *, holdout_fraction: float) -> ShardIndex:
        self._file.close()
        index = ShardIndex(
            source=self.source,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            dtype=token_dtype(self.vocab_size),
            num_tokens=self.num_tokens,
            num_docs=len(self._doc_starts),
            heldout_start=heldout_offset(
                self.num_tokens, self._doc_starts, holdout_fraction=holdout_fraction
            ),
            sha256=self._hash.hexdigest(),
        )
        if is_local(self.out_url):
            replace_file(
                local_path(self.out_url) / INDEX_FILE, index.to_json().encode(), durable=True
            )
        else:
            storage = _storage(self.out_url, self.storage_options)
            try:
                storage.write_bytes(TOKENS_FILE, self._path.read_bytes())
                storage.write_bytes(INDEX_FILE, index.to_json().encode())
            finally:
                self._path.unlink(missing_ok=True)
        return index


def _storage(url: str, storage_options: StorageOptions) -> Any:
    # Imported lazily: the adapter lives in elastic.checkpoint (the one module allowed to import
    # fsspec) and local shards must not need it.
    from elastic.checkpoint.storage import Storage

    return Storage(url, storage_options=storage_options)


class TokenShard:
    """Read access to one prepared source: windows of tokens as int64 arrays."""

    def __init__(self, url: str, index: ShardIndex, tokens: np.ndarray) -> None:
        self.url = url
        self.index = index
        self.tokens = tokens  # (num_tokens,) uint16/uint32, memmap for local shards

    @property
    def name(self) -> str:
        return self.index.source

    def window(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset + length) as int64; the range must lie inside the shard."""
        if offset < 0 or offset + length > self.index.num_tokens:
            raise IndexError(f"window [{offset}, {offset + length}) outside {self.url}")
        return np.asarray(self.tokens[offset : offset + length], dtype=np.int64)


def shard_exists(url: str, *, storage_options: StorageOptions = None) -> bool:
    if is_local(url):
        return (local_path(url) / INDEX_FILE).is_file()
    return bool(_storage(url, storage_options).exists(INDEX_FILE))


def resolve_shard_url(url: str, source: str, *, storage_options: StorageOptions = None) -> str:
    """``url`` itself when it holds a shard, else ``url/<source>`` (a prepare output dir)."""
    if shard_exists(url, storage_options=storage_options):
        return url
    nested = join_url(url, source)
    if shard_exists(nested, storage_options=storage_options):
        return nested
    raise ShardNotFound(f"no {INDEX_FILE} at {url!r} or {nested!r}")


def open_shard(url: str, *, storage_options: StorageOptions = None) -> TokenShard:
    """Open a prepared source directory (local path, ``file://`` or any Storage URL).

    ``storage_options`` go to fsspec unchanged for remote URLs (``endpoint_url``, ``key``...).
    """
    if is_local(url):
        return _open_local(url)
    from elastic.checkpoint.errors import CheckpointError

    try:
        storage = _storage(url, storage_options)
        if not storage.exists(INDEX_FILE):
            raise ShardNotFound(f"no {INDEX_FILE} at {url!r}")
        index = ShardIndex.from_json(storage.read_bytes(INDEX_FILE).decode(), where=url)
        data = storage.read_bytes(TOKENS_FILE)
    except CheckpointError as exc:
        raise DataError(f"{url}: {exc}") from exc
    return TokenShard(url, index, _checked(np.frombuffer(data, dtype=_np_dtype(index)), index, url))


def _open_local(url: str) -> TokenShard:
    root = local_path(url)
    try:
        text = (root / INDEX_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShardNotFound(f"no {INDEX_FILE} at {url!r}") from None
    index = ShardIndex.from_json(text, where=str(root / INDEX_FILE))
    path = root / TOKENS_FILE
    if not path.is_file():
        raise ShardCorrupt(f"{url}: {TOKENS_FILE} is missing")
    if index.num_tokens == 0:
        return TokenShard(url, index, np.zeros(0, dtype=_np_dtype(index)))
    tokens = np.memmap(path, dtype=_np_dtype(index), mode="r")
    return TokenShard(url, index, _checked(tokens, index, url))


def _np_dtype(index: ShardIndex) -> np.dtype[Any]:
    if index.dtype not in ("uint16", "uint32"):
        raise ShardCorrupt(f"{index.source}: unknown dtype {index.dtype!r}")
    return np.dtype(index.dtype).newbyteorder("<")


def _checked(tokens: np.ndarray, index: ShardIndex, url: str) -> np.ndarray:
    if len(tokens) != index.num_tokens:
        raise ShardCorrupt(f"{url}: {len(tokens)} tokens on storage, index says {index.num_tokens}")
    if not 0 <= index.heldout_start <= index.num_tokens:
        raise ShardCorrupt(f"{url}: heldout_start={index.heldout_start} outside the shard")
    return tokens


def verify_shard(shard: TokenShard) -> None:
    """Recompute the checksum (reads the whole file); raise ShardCorrupt on a mismatch."""
    digest = hashlib.sha256(np.asarray(shard.tokens).tobytes()).hexdigest()
    if shard.index.sha256 and digest != shard.index.sha256:
        raise ShardCorrupt(f"{shard.url}: sha256 mismatch")
