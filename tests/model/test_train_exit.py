"""model.train.run_main: every way out of a worker is an exit code (then ``exit_now``)."""

from __future__ import annotations

import pytest

from elastic.protocol import ExitCode
from model import train


def test_an_escaping_error_is_printed_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(argv: object = None) -> int:
        raise RuntimeError("async save step 6: KeyError")

    monkeypatch.setattr(train, "main", broken)
    assert train.run_main([]) == ExitCode.FAILED == 1
    assert "RuntimeError: async save step 6: KeyError" in capsys.readouterr().err


def test_argparse_exits_keep_their_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert train.run_main(["--no-such-flag"]) == 2
    assert train.run_main(["--help"]) == 0
    assert "python -m model.train" in capsys.readouterr().out
