"""Shared pytest configuration. Fixtures for real services live in tests/support/."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo corpus, prepared once per test session."""
    from model.prepare import ensure_demo

    root = tmp_path_factory.mktemp("demo")
    ensure_demo(root)
    return root
