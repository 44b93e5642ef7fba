"""Ports for child servers come from below the kernel's ephemeral range, and are free."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from daemon import ports


def test_free_port_is_below_the_ephemeral_range_and_binds() -> None:
    low = ports.ephemeral_low()
    picked = {ports.free_port() for _ in range(20)}
    assert all(ports.LOWEST_PORT <= p < low for p in picked)
    assert len(picked) > 1  # random, so two servers started together do not share one
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", picked.pop()))


def test_a_port_with_a_listener_is_never_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", ports.free_port()))
        listener.listen()
        taken = listener.getsockname()[1]
        assert not ports.binds(taken)
        # A range with only the taken port below it: the pick falls back to the kernel's.
        monkeypatch.setattr(ports, "LOWEST_PORT", taken)
        monkeypatch.setattr(ports, "ATTEMPTS", 1)
        monkeypatch.setattr(ports, "ephemeral_low", lambda: taken + 1)
        assert ports.free_port() != taken


def test_unreadable_range_file_means_the_linux_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_low() == ports.DEFAULT_EPHEMERAL_LOW
    (tmp_path / "range").write_text("20000\t40000\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "range")
    assert ports.ephemeral_low() == 20000
