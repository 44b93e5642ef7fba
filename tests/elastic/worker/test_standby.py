"""The generic standby launcher: which commands it can run warm, in its own process."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from elastic.worker.standby import PythonCommand, parse_python

PYTHON = sys.executable


def parse(*command: str) -> PythonCommand | None:
    return parse_python(list(command), executable=PYTHON)


def test_a_module_run_with_safe_path_is_run_warm() -> None:
    assert parse(PYTHON, "-P", "-m", "model.train", "--config", "x") == PythonCommand(
        module="model.train", script=None, args=("--config", "x"), safe_path=True
    )


def test_a_script_run_is_run_warm() -> None:
    assert parse(PYTHON, "-u", "script.py", "a", "b") == PythonCommand(
        module=None, script="script.py", args=("a", "b"), safe_path=False
    )


def test_flags_with_an_argument_are_skipped_with_it() -> None:
    parsed = parse(PYTHON, "-X", "dev", "-W", "ignore", "-I", "-m", "pkg.mod")
    assert parsed == PythonCommand(module="pkg.mod", script=None, args=(), safe_path=True)


def test_the_interpreter_may_be_named_by_path_lookup() -> None:
    found = shutil.which("python")
    if found is None or os.path.realpath(found) != os.path.realpath(PYTHON):
        pytest.skip("`python` on PATH is another interpreter")
    assert parse("python", "-m", "pkg") == PythonCommand("pkg", None, (), False)


@pytest.mark.parametrize(
    "command",
    [
        ["/bin/sh", "-c", "exec python -m model.train"],  # another program
        ["ls", "-l"],  # a binary
        ["no-such-interpreter-on-path", "-m", "x"],
        [PYTHON, "-c", "print(1)"],  # -c: the real interpreter handles it
        [PYTHON, "-uB", "script.py"],  # combined flags
        [PYTHON, "-i", "script.py"],
        [PYTHON],  # a REPL
        [PYTHON, "-m"],  # -m without a module
        [],
    ],
)
def test_anything_else_is_left_to_exec(command: list[str]) -> None:
    assert parse(*command) is None
