"""``elasticctl``: read and steer a running elasticd run through etcd.

    elasticctl [--config FILE] [--etcd ENDPOINTS] [--run-id ID] [--key-prefix P]
               [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--user NAME] COMMAND

    status [--json]                  the run's state, round, members, world size, last step,
                                     and each node's last failed worker (command, exit code,
                                     last output lines)
    events [--limit N] [--json]      the run's bounded event log (oldest first)
    checkpoints [--url URL] [--verify]
                                     committed checkpoints, known-good flags, file checks
                                     (storage only: with --url or --config, no etcd needed)
    scale --min N --max M            new node bounds (1 <= N <= M <= 65536); the group
                                     re-forms at a step boundary
    pause | resume                   hold training at the next step boundary / go on
    rewind --to-step N               rewind to the committed known-good checkpoint of step N
                                     (a diverged run restarts from it); the checkpoints are
                                     read from --config's storage, else the run status's URL
    audit [--url URL] [--json]       the samples each checkpoint's chain says the run consumed,
                                     checked against the run's sampler across every restart,
                                     resize and rewind (0 ok, 1 divergence: the first one is
                                     printed, 2 nothing to audit; storage only, like checkpoints)
    report --log FILE... --out PNG   loss and grad norm over steps, with events marked

Where the run is: ``--config`` reads the job's config file as the daemon does (its ``run_id``
and ``etcd`` section, with the same ``ELASTICD_*`` environment overrides, so inside a pod
``elasticctl --config /etc/elasticd/config.yaml status`` finds the etcd, its TLS files and the
user and password the daemon uses); a run on the embedded etcd is found through the endpoint
file its daemon writes under ``run_dir`` (``./runs/demo`` unless configured) while it runs.
Flags override the file. Without either the target is ``127.0.0.1:2379``, run ``demo``. The
password is never a flag (it would show in the process list): ``etcd.password`` in the file or
``ELASTICD_ETCD__PASSWORD``.

Control requests are written to the run's control key in etcd, which every daemon watches;
they take effect at the next step boundary. Each is also recorded in the run's event log as a
``control_request`` event with who asked (``by``: user@host). Bad usage: one line on stderr,
exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon.config import MAX_NODES, DaemonConfig
from daemon.embedded_etcd import published_endpoint
from elastic.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager
from elastic.config import build, check_name, layered
from elastic.rendezvous import EtcdConfig, EtcdRendezvousError, RunStore, connect
from ops import goodput

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_ENDPOINT = "127.0.0.1:2379"


class NoEmbeddedEtcd(Exception):
    """The job runs on an embedded etcd, and no daemon of it is running now."""


@dataclasses.dataclass(frozen=True)
class Target:
    """The run elasticctl acts on, resolved once from the config file, environment and flags."""

    run_id: str
    etcd: EtcdConfig
    checkpoint: CheckpointConfig | None = None  # the job's, when --config names one
    no_etcd: str | None = None  # why there is no etcd to reach (embedded, not running)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elasticctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="the job's config file (run_id, etcd)")
    parser.add_argument(
        "--etcd",
        default=None,
        help=f"comma-separated etcd endpoints (default: from --config, else {DEFAULT_ENDPOINT})",
    )
    parser.add_argument("--run-id", default=None, help="default: from --config, else demo")
    parser.add_argument("--key-prefix", default=None, help="default: from --config, else /elasticd")
    parser.add_argument("--tls-ca", default=None, help="PEM file of the CA that signed etcd's cert")
    parser.add_argument("--tls-cert", default=None, help="client certificate (PEM), with --tls-key")
    parser.add_argument("--tls-key", default=None, help="client key (PEM), with --tls-cert")
    parser.add_argument(
        "--user", default=None, help="etcd user; password from ELASTICD_ETCD__PASSWORD"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status")
    status.add_argument("--json", action="store_true")
    events = sub.add_parser("events")
    events.add_argument("--limit", type=int, default=50)
    events.add_argument("--json", action="store_true")
    ckpt = sub.add_parser("checkpoints")
    ckpt.add_argument(
        "--url", default=None, help="checkpoint.url (default: from --config, else run status)"
    )
    ckpt.add_argument("--verify", action="store_true", help="check files against manifests")
    ckpt.add_argument("--json", action="store_true")
    scale = sub.add_parser("scale")
    scale.add_argument("--min", type=int, required=True, dest="min_nodes")
    scale.add_argument("--max", type=int, required=True, dest="max_nodes")
    sub.add_parser("pause")
    sub.add_parser("resume")
    rewind = sub.add_parser(
        "rewind",
        help="rewind to a committed checkpoint; restarts a diverged run from it",
    )
    rewind.add_argument("--to-step", type=int, required=True)
    audit = sub.add_parser(
        "audit", help="check the data the run consumed against its sampler (docs/data.md)"
    )
    audit.add_argument(
        "--url", default=None, help="checkpoint.url (default: from --config, else run status)"
    )
    audit.add_argument("--json", action="store_true")
    report = sub.add_parser("report")
    report.add_argument("--log", nargs="+", required=True, help="JSON-lines logs of the run")
    report.add_argument("--out", required=True, help="PNG file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":
        from ops.report import write_report

        return write_report(args.log, args.out)
    try:
        args.target = target(args, os.environ)
        return _COMMANDS[args.command](args)
    except ValueError as exc:
        print(f"elasticctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (EtcdRendezvousError, CheckpointError, NoEmbeddedEtcd) as exc:
        print(f"elasticctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def target(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    """Run id, etcd settings and (with --config) the checkpoint config: the config file and
    environment as the daemon reads them, then the flags. A ConfigError (a ValueError) names
    the key and value."""
    document = layered(args.config, environ=environ)
    etcd_doc = dict(document.get("etcd") or {})
    if args.etcd is not None:  # endpoints and user are validated together with the file's
        etcd_doc["endpoints"] = [e.strip() for e in args.etcd.split(",") if e.strip()]
    if args.user is not None:
        if etcd_doc.get("password") is None:
            raise ValueError(f"--user={args.user}: set ELASTICD_ETCD__PASSWORD (or etcd.password)")
        etcd_doc["user"] = args.user
    document["etcd"] = etcd_doc
    job = build(DaemonConfig, document)
    run_id = job.run_id if args.run_id is None else args.run_id
    check_name("--run-id", run_id)
    flags = _etcd_flags(args)
    no_etcd = None
    if not job.etcd.endpoints:  # the daemon runs an embedded etcd, if any
        embedded = published_endpoint(Path(job.run_dir))
        if embedded is None and args.config is not None:
            no_etcd = (
                f"etcd.endpoints=[] in {args.config}: the run's embedded etcd is not running "
                f"(no endpoint file under run_dir={job.run_dir!r}); start elasticd first"
            )
        flags["endpoints"] = (embedded or DEFAULT_ENDPOINT,)
    etcd = dataclasses.replace(job.etcd, **{k: v for k, v in flags.items() if v is not None})
    checkpoint = job.checkpoint if args.config is not None else None
    return Target(run_id, etcd, checkpoint, no_etcd)


def _etcd_flags(args: argparse.Namespace) -> dict[str, Any]:
    """EtcdConfig fields given on the command line (None: not given)."""
    return {
        "key_prefix": args.key_prefix,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
    }


def _store(args: argparse.Namespace) -> RunStore:
    run: Target = args.target
    if run.no_etcd is not None:
        raise NoEmbeddedEtcd(run.no_etcd)
    return RunStore(connect(run.etcd), run_id=run.run_id, key_prefix=run.etcd.key_prefix)


def cmd_status(args: argparse.Namespace) -> int:
    store = _store(args)
    status = store.get_status()
    if status is None:
        print(f"elasticctl: no status for run {args.target.run_id!r}", file=sys.stderr)
        return EXIT_FAILED
    status["members"] = _members(status, store.members())
    per_node_goodput = goodput.member_ledgers(status.get("members") or {}, now_unix=time.time())
    for node, ledger in per_node_goodput.items():  # as of now, not of each node's last write
        status["members"][node]["goodput"] = ledger
    if per_node_goodput:
        status["goodput"] = goodput.combine(per_node_goodput.values())
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
    rows = [
        (k, status.get(k))
        for k in (
            "state",
            "round",
            "world_size",
            "last_step",
            "min_nodes",
            "max_nodes",
            "checkpoint_url",
        )
    ]
    print(_table(["field", "value"], rows))
    members = status.get("members") or {}
    if members:
        print()
        print(
            _table(
                ["node", "state", "round", "group_rank", "last_step"],
                [
                    (n, i.get("state"), i.get("round"), i.get("group_rank"), i.get("last_step"))
                    for n, i in sorted(members.items())
                ],
            )
        )
    for line in failure_lines(members):
        print(line)
    if per_node_goodput:
        print()
        print("\n".join(goodput.lines(per_node_goodput)))
    return EXIT_OK


def _members(status: Mapping[str, Any], records: Mapping[str, Any]) -> dict[str, Any]:
    """Live nodes' records with their round and group rank (ranks follow the order of the
    round's ``nodes``; a node outside the round has neither)."""
    ranks = {name: rank for rank, name in enumerate(status.get("nodes") or [])}
    return {
        node: {
            **info,
            "round": status.get("round") if node in ranks else None,
            "group_rank": ranks.get(node),
        }
        for node, info in records.items()
    }


def failure_lines(members: Mapping[str, Any]) -> list[str]:
    """Per node with a ``last_failure`` in its status: the command, exit code and last output
    lines of its newest failed worker (a loop's traceback is usually all there is to see)."""
    lines: list[str] = []
    for node, info in sorted(members.items()):
        failure = info.get("last_failure") if isinstance(info, Mapping) else None
        if not isinstance(failure, Mapping):
            continue
        lines += [
            "",
            f"last failure on {node}: local rank {failure.get('local_rank')}, "
            f"exit code {failure.get('returncode')}",
            f"  command: {shlex.join(str(a) for a in failure.get('command') or [])}",
            *(f"  | {text}" for text in failure.get("output_tail") or []),
        ]
    return lines


def cmd_events(args: argparse.Namespace) -> int:
    events = _store(args).events(limit=args.limit)
    if args.json:
        print(json.dumps(events, indent=2))
        return EXIT_OK
    for event in events:
        rest = {k: v for k, v in event.items() if k not in ("seq", "ts", "event", "node")}
        print(
            f"{event.get('seq', ''):>6} {event.get('ts', '')} {event.get('node', '-'):<14} "
            f"{event.get('event', ''):<18} {json.dumps(rest, sort_keys=True)}"
        )
    return EXIT_OK


def _checkpoints(args: argparse.Namespace, url: str | None = None) -> CheckpointManager:
    """The run's checkpoints: at ``url``, else the job's (--config), else the run status's."""
    run: Target = args.target
    config = CheckpointConfig(url=url) if url else run.checkpoint
    if config is None:
        url = (_store(args).get_status() or {}).get("checkpoint_url")
        if not url:
            raise ValueError("--url: not given and the run status has no checkpoint_url")
        config = CheckpointConfig(url=url)
    return CheckpointManager(config, run_id=run.run_id, rank=0, world_size=1)


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """Reads storage only: with --url or --config it needs no etcd (a finished run, an outage)."""
    manager = _checkpoints(args, args.url)
    listed = [(m, manager.verify(m) if args.verify else []) for m in manager.list()]
    if args.json:
        print(json.dumps([_checkpoint_json(m, problems) for m, problems in listed], indent=2))
    else:
        rows = [
            (
                m.step,
                m.world_size,
                m.known_good,
                m.size_bytes,
                "; ".join(problems) or ("ok" if args.verify else ""),
            )
            for m, problems in listed
        ]
        print(_table(["step", "world_size", "known_good", "size_bytes", "verify"], rows))
    return EXIT_FAILED if any(problems for _, problems in listed) else EXIT_OK


def _checkpoint_json(manifest: Any, problems: list[str]) -> dict[str, Any]:
    return {
        "step": manifest.step,
        "world_size": manifest.world_size,
        "known_good": manifest.known_good,
        "size_bytes": manifest.size_bytes,
        "problems": problems,
    }


def cmd_audit(args: argparse.Namespace) -> int:
    """Reads storage only (manifests as JSON, nothing unpickled): ``ops/audit.py``."""
    from ops.audit import audit, format_text

    result = audit(_checkpoints(args, args.url))
    print(json.dumps(result.to_json(), indent=2) if args.json else format_text(result))
    return result.exit_code


def requester(environ: Mapping[str, str] = os.environ) -> str:
    """``user@host`` of whoever runs elasticctl (recorded with every control request)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid), no env
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _control(args: argparse.Namespace, update: Mapping[str, Any]) -> dict[str, Any]:
    """Write a control request and record it, with who asked, in the run's event log."""
    store = _store(args)
    document = store.put_control(update)
    store.append_event(
        {
            "event": "control_request",
            "request": dict(update),
            "control_seq": document["seq"],
            "by": requester(),
        }
    )
    return document


def cmd_scale(args: argparse.Namespace) -> int:
    if not 1 <= args.min_nodes <= args.max_nodes <= MAX_NODES:
        raise ValueError(
            f"--min={args.min_nodes} --max={args.max_nodes}: need 1 <= min <= max <= {MAX_NODES}"
        )
    doc = _control(args, {"scale": {"min_nodes": args.min_nodes, "max_nodes": args.max_nodes}})
    print(f"scale requested: min {args.min_nodes}, max {args.max_nodes} (control seq {doc['seq']})")
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    _control(args, {"paused": True})
    print("pause requested: training holds at the next step boundary")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    _control(args, {"paused": None})
    print("resume requested")
    return EXIT_OK


def cmd_rewind(args: argparse.Namespace) -> int:
    """Only to a committed, known-good checkpoint: anything else would fail on every node."""
    if args.to_step < 0:
        raise ValueError(f"--to-step={args.to_step}: must be >= 0")
    known_good = [m.step for m in _checkpoints(args).list() if m.known_good]
    if args.to_step not in known_good:
        newest = ", ".join(str(s) for s in sorted(known_good)[-5:]) or "none"
        raise ValueError(
            f"--to-step={args.to_step}: no known-good checkpoint at that step "
            f"(newest known-good steps: {newest})"
        )
    _control(args, {"rewind": {"to_step": args.to_step}})
    print(f"rewind to step {args.to_step} requested")
    return EXIT_OK


_COMMANDS = {
    "status": cmd_status,
    "events": cmd_events,
    "checkpoints": cmd_checkpoints,
    "scale": cmd_scale,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "rewind": cmd_rewind,
    "audit": cmd_audit,
}


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
