"""``python -P -m elastic.worker.standby -- COMMAND...``: a warm worker process for any loop.

The daemon keeps a pool of these ahead of the next round (``daemon.workers.StandbyPool``).
Each imports torch and the distributed modules (seconds of CPU per process), prints the
protocol's ``standby_ready`` line, then blocks on stdin for the round's environment
(:func:`elastic.protocol.standby_order`). Then it runs ``COMMAND`` as Python would run it:

- ``python [-P|-u|-B|...] -m MODULE ARGS`` and ``python [...] SCRIPT ARGS``, where ``python``
  is this interpreter: in this process, with ``sys.argv`` and ``sys.path[0]`` set as Python
  sets them (nothing prepended under ``-P``), so the imports are already warm;
- anything else (another interpreter, a binary, a shell script): ``exec``, cold.

Either way the process then leaves with the command's exit code (``SystemExit``'s; 1 for an
escaping error, whose root cause goes to ``TORCHELASTIC_ERROR_FILE``) after the ``atexit``
handlers, without the interpreter's teardown (:func:`leave`).

Under ``-P`` (the bundled trainer's default command) a user's ``model.py`` or ``elastic.py``
in the working directory can shadow nothing: the launcher itself runs with ``-P``, and the
worker API it imported is already in ``sys.modules``.
"""

from __future__ import annotations

import atexit
import os
import runpy
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from elastic.protocol import ExitCode, read_standby_order, standby_ready_line
from elastic.worker.dist import exit_now

# Interpreter flags that change nothing here (or that we honour: -P), taking no argument.
_PLAIN_FLAGS = frozenset({"-u", "-B", "-O", "-OO", "-s", "-E", "-q", "-P", "-I"})
_FLAGS_WITH_ARG = frozenset({"-X", "-W"})


@dataclass(frozen=True)
class PythonCommand:
    module: str | None  # -m MODULE
    script: str | None  # SCRIPT path
    args: tuple[str, ...]
    safe_path: bool  # -P or -I: nothing prepended to sys.path


def parse_python(command: Sequence[str], *, executable: str) -> PythonCommand | None:
    """``command`` as a run of this interpreter, or None when it must be exec'd."""
    if not command or not _same_interpreter(command[0], executable):
        return None
    rest = list(command[1:])
    safe = False
    while rest and rest[0].startswith("-") and rest[0] != "-m":
        flag = rest.pop(0)
        if flag in _FLAGS_WITH_ARG and rest:
            rest.pop(0)
        elif flag not in _PLAIN_FLAGS:
            return None  # -c, -i, combined flags...: let the real interpreter handle them
        safe = safe or flag in ("-P", "-I")
    if len(rest) >= 2 and rest[0] == "-m":
        return PythonCommand(rest[1], None, tuple(rest[2:]), safe)
    if rest and rest[0] != "-m":  # a bare ``-m``: the interpreter's own usage error
        return PythonCommand(None, rest[0], tuple(rest[1:]), safe)
    return None


def _same_interpreter(name: str, executable: str) -> bool:
    found = shutil.which(name)
    return found is not None and os.path.realpath(found) == os.path.realpath(executable)


def warm_up() -> None:
    """Import what every round's workers import on their critical path."""
    import torch
    import torch._dynamo
    import torch.distributed.checkpoint
    import torch.distributed.fsdp  # noqa: F401

    import elastic.worker  # noqa: F401


def run_python(command: PythonCommand) -> None:
    if command.module is not None:
        sys.argv = [command.module, *command.args]
        if not command.safe_path:
            sys.path.insert(0, os.getcwd())
        runpy.run_module(command.module, run_name="__main__", alter_sys=True)
        return
    assert command.script is not None
    sys.argv = [command.script, *command.args]
    if not command.safe_path:
        sys.path.insert(0, os.path.dirname(os.path.abspath(command.script)))
    runpy.run_path(command.script, run_name="__main__")


def main(argv: Sequence[str]) -> int:
    """The launcher; once the command ran, the process leaves through :func:`leave`."""
    args = list(argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -P -m elastic.worker.standby -- COMMAND...", file=sys.stderr)
        return int(ExitCode.CONFIG)
    started = time.monotonic()
    warm_up()
    print(standby_ready_line(time.monotonic() - started), flush=True)
    env = read_standby_order(sys.stdin.readline())
    if env is None:
        return int(ExitCode.OK)  # the daemon closed its pool
    os.environ.update(env)
    python = parse_python(args, executable=sys.executable)
    if python is None:
        os.execvpe(args[0], args, os.environ)
    leave(run_recorded(python))


def run_recorded(python: PythonCommand) -> int:
    """Run the command; its exit code (``SystemExit``'s, or FAILED for an escaping error)."""
    # torch's @record writes the root cause to TORCHELASTIC_ERROR_FILE (the daemon's
    # worker_exit line reads it), then re-raises.
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        record(run_python)(python)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return int(ExitCode.FAILED)
    except BaseException:  # reported here; the exit code says it failed
        traceback.print_exc()
        return int(ExitCode.FAILED)
    return int(ExitCode.OK)


def leave(code: int) -> NoReturn:
    """Exit after the loop's ``atexit`` handlers, without the interpreter's teardown: gloo's
    destructors race with peers exiting at the same moment (SIGABRT "terminate called without
    an active exception", seen in ~4 of 70 two-rank exits of examples/byo/own_loop.py)."""
    atexit._run_exitfuncs()
    exit_now(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
