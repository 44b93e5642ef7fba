"""``elasticd``: ``run`` (the per-node supervisor) and ``prepare-data`` (tokenize a corpus).

Configuration is resolved here, once: defaults < YAML < ``ELASTICD_*`` env < ``--set``.
Exit codes (:class:`elastic.protocol.ExitCode`): 0 done or drained, 1 failed (crash loop),
2 bad configuration or usage, 3 diverged.

Bad input is one line on stderr and exit code 2, with nothing written: a usage error
(``elasticd: usage: ...``) or a configuration error (``elasticd: invalid config: KEY=VALUE:
...``), including what this node needs to start that can be checked before it starts
(:func:`daemon.config.check_start`). Anything else that ends the daemon is one line
``elasticd: <ExceptionType>: <message>`` on stderr and exit code 1; its traceback goes to
the JSON log on stdout (event ``failed``), never to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from elastic import jsonlog
from elastic.config import ConfigError, one_line
from elastic.protocol import ExitCode
from elastic.version import package_version


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"elasticd: usage: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(ExitCode.CONFIG)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elasticd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"elasticd {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="supervise training on this node")
    run.add_argument("--config", required=True, help="YAML job configuration")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        dest="sets",
        metavar="KEY=VALUE",
        help="override one key (dotted path), e.g. --set train.steps=100",
    )
    run.add_argument("--node-id", default=None, help="this node's name (default: hostname-pid)")
    sub.add_parser(
        "prepare-data",
        help="tokenize text/JSONL into shards (python -m model.prepare)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare-data"]:
        # The daemon never imports the workload; the data tool is the workload's own CLI.
        os.execv(sys.executable, [sys.executable, "-m", "model.prepare", *argv[1:]])
    args = _parser().parse_args(argv)
    # Before grpc loads (through the etcd client): its fork notices are not JSON lines, and
    # the daemon forks a worker per local rank every round.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    jsonlog.configure()
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"elasticd: invalid config: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except Exception as exc:
        # The process ends here, so nothing is left to keep safe: one line for the operator,
        # the traceback in the JSON log.
        jsonlog.get("daemon.cli").error("failed", error=type(exc).__name__, exc_info=True)
        print(f"elasticd: {type(exc).__name__}: {one_line(str(exc))}", file=sys.stderr)
        return ExitCode.FAILED


def _run(args: argparse.Namespace) -> int:
    from daemon import scheduling
    from daemon.config import resolve_to_start, security_warnings
    from daemon.supervisor import Supervisor

    # Everything that can be refused is refused here, before the supervisor writes a file.
    config, document = resolve_to_start(
        args.config, environ=os.environ, sets=args.sets, node_id=args.node_id
    )
    jsonlog.bind(run_id=config.run_id)
    for line in security_warnings(config):
        jsonlog.get("daemon.cli").warning("config_warning", detail=line)
    scheduling.as_daemon()  # before any thread or child starts: they inherit it
    return Supervisor(config, document, node_id=args.node_id, environ=dict(os.environ)).run()


if __name__ == "__main__":
    sys.exit(main())
