"""``elasticd``: ``run`` (the per-node supervisor) and ``prepare-data`` (tokenize a corpus).

Configuration is resolved here, once: defaults < YAML < ``ELASTICD_*`` env < ``--set``.
Exit codes (:class:`elastic.protocol.ExitCode`): 0 done or drained, 1 failed (crash loop),
2 bad configuration or usage, 3 diverged.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from elastic import jsonlog
from elastic.config import ConfigError
from elastic.protocol import ExitCode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elasticd", description=__doc__)
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
    from daemon.config import resolve, security_warnings
    from daemon.supervisor import Supervisor

    try:
        config, document = resolve(args.config, environ=os.environ, sets=args.sets)
    except ConfigError as exc:
        print(f"elasticd: invalid config: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    jsonlog.configure(run_id=config.run_id)
    for line in security_warnings(config):
        jsonlog.get("daemon.cli").warning("config_warning", detail=line)
    return Supervisor(config, document, node_id=args.node_id, environ=dict(os.environ)).run()


if __name__ == "__main__":
    sys.exit(main())
