"""Fakes for unit tests of logic (torch and storage stay real where the tests use them)."""

from __future__ import annotations


class DictRecord:
    """A fault firing record (``elastic.faults.FiringRecord``) held in a dict."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def exists(self, rel: str) -> bool:
        return rel in self.files

    def read_bytes(self, rel: str) -> bytes:
        return self.files[rel]

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.files[rel] = data
