"""``elasticctl``: read and steer a running elasticd run through etcd.

    elasticctl [GLOBAL FLAGS] COMMAND [FLAGS]      (global flags also after the command)

    status [-w [--interval S] [--count N]]
                                     state, round, world size, step of total, ETA, loss,
                                     tokens/s, step time, newest checkpoint and its age, node
                                     bounds; each node's state and last failure; goodput.
                                     -w: print again every S seconds (2) until Ctrl-C, or N times
    events [--limit N]               the run's bounded event log (oldest first)
    checkpoints [--url URL] [--verify]
                                     committed checkpoints: step, world size, known-good, size,
                                     age, file checks (storage only: with --url or --config,
                                     no etcd needed)
    scale --min N --max M [--wait]   new node bounds (1 <= N <= M <= 65536); the group re-forms
                                     at a step boundary
    pause | resume [--wait]          hold training at the next step boundary / go on
    rewind --to-step N [--wait]      rewind to the committed known-good checkpoint of step N
                                     (a diverged run restarts from it); the checkpoints are
                                     read from --config's storage, else the run status's URL
    audit [--url URL]                the samples each checkpoint's chain says the run consumed,
                                     checked against the run's sampler across every restart,
                                     resize and rewind (0 ok, 1 divergence: the first one is
                                     printed, 2 nothing to audit; storage only, like checkpoints)
    report --log FILE... --out PNG   loss and grad norm over steps, with events marked
    completion bash|zsh|tcsh         the shell completion script (bash: source <(elasticctl
                                     completion bash))

Global flags: ``--config FILE``, ``--etcd ENDPOINTS``, ``--run-id ID``, ``--key-prefix P``,
``--tls-ca PEM``, ``--tls-cert PEM --tls-key PEM``, ``--user NAME``, and ``-o json`` (or
``--json``): every command prints one JSON document instead of text (``status -w``: one per
line). ``--version`` prints the installed version.

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
``control_request`` event with who asked (``by``: user@host). ``--wait [--timeout S]`` returns
once the group applied it (ops/waiting.py says how that is told), else exit code 1 with one
line saying what it still waits for. Bad usage: one line on stderr, exit code 2.

``--help``, ``--version``, ``completion`` and ``status`` do not import torch.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from daemon.config import MAX_NODES
from elastic.checkpoint import CheckpointConfig, CheckpointError
from elastic.config import one_line
from elastic.rendezvous import EtcdRendezvousError, RunStore
from elastic.version import package_version
from ops import human, status_view, waiting
from ops.status_view import failure_lines
from ops.target import NoEmbeddedEtcd, Target, target

__all__ = ["failure_lines", "main", "requester", "target"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
SHELLS = ("bash", "zsh", "tcsh")
FILE_FLAGS = ("config", "tls_ca", "tls_cert", "tls_key", "log", "out")  # complete file names
WATCH_SECONDS = 2.0
WAIT_TIMEOUT_SECONDS = 300.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"elasticctl: usage: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _global_flags(*, suppress: bool) -> _Parser:
    """The flags every command takes, before or after its name. Under a command they default to
    SUPPRESS, so one given there overrides one given before it and an absent one changes
    nothing (kubectl's flags-anywhere)."""
    parent = _Parser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    flags = parent.add_argument_group("global flags (before or after the command)")
    flags.add_argument(
        "--config", metavar="FILE", default=default, help="the job's config file (run_id, etcd)"
    )
    flags.add_argument(
        "--etcd", metavar="ENDPOINTS", default=default, help="comma-separated etcd endpoints"
    )
    flags.add_argument(
        "--run-id", metavar="ID", default=default, help="default: from --config, else demo"
    )
    flags.add_argument(
        "--key-prefix",
        metavar="PREFIX",
        default=default,
        help="default: from --config, else /elasticd",
    )
    flags.add_argument(
        "--tls-ca", metavar="PEM", default=default, help="PEM file of the CA of etcd's cert"
    )
    flags.add_argument(
        "--tls-cert",
        metavar="PEM",
        default=default,
        help="client certificate (PEM), with --tls-key",
    )
    flags.add_argument(
        "--tls-key", metavar="PEM", default=default, help="client key (PEM), with --tls-cert"
    )
    flags.add_argument(
        "--user",
        metavar="NAME",
        default=default,
        help="etcd user; password: ELASTICD_ETCD__PASSWORD",
    )
    flags.add_argument(
        "-o", "--output", choices=("text", "json"), default=default, help="text (default) or json"
    )
    flags.add_argument(
        "--json",
        action="store_const",
        const="json",
        dest="output",
        default=default,
        help="same as -o json",
    )
    return parent


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="elasticctl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_flags(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"elasticctl {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    flags = _global_flags(suppress=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=[flags]
        )
        return made

    status = command("status", "the run's state, progress, nodes and goodput")
    status.add_argument("-w", "--watch", action="store_true", help="print again until Ctrl-C")
    status.add_argument(
        "--interval", metavar="SECONDS", type=float, default=WATCH_SECONDS, help="seconds, with -w"
    )
    status.add_argument(
        "--count", metavar="N", type=int, default=None, help="with -w: stop after N prints"
    )
    events = command("events", "the run's event log, oldest first")
    events.add_argument("--limit", type=int, default=50)
    for name, help_text in (
        ("checkpoints", "committed checkpoints (storage only)"),
        ("audit", "check the data the run consumed against its sampler (docs/data.md)"),
    ):
        storage = command(name, help_text)
        storage.add_argument(
            "--url", default=None, help="checkpoint.url (default: from --config, else run status)"
        )
    sub.choices["checkpoints"].add_argument(
        "--verify", action="store_true", help="check files against manifests"
    )
    scale = command("scale", "new node bounds; the group re-forms at a step boundary")
    scale.add_argument("--min", type=int, required=True, dest="min_nodes")
    scale.add_argument("--max", type=int, required=True, dest="max_nodes")
    command("pause", "hold training at the next step boundary")
    command("resume", "go on after a pause")
    rewind = command("rewind", "rewind to a committed checkpoint; restarts a diverged run from it")
    rewind.add_argument("--to-step", type=int, required=True)
    for name in ("scale", "pause", "resume", "rewind"):
        control = sub.choices[name]
        control.add_argument("--wait", action="store_true", help="return once it was applied")
        control.add_argument(
            "--timeout", type=float, default=WAIT_TIMEOUT_SECONDS, help="seconds, with --wait"
        )
    report = command("report", "loss and grad norm over steps, events marked (PNG)")
    report.add_argument("--log", nargs="+", required=True, help="JSON-lines logs of the run")
    report.add_argument("--out", required=True, help="PNG file to write")
    completion = command("completion", "print the shell completion script")
    completion.add_argument("shell", choices=SHELLS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        if args.command in _LOCAL:  # nothing to find: no config, no etcd
            return _LOCAL[args.command](args, parser)
        args.target = target(args, os.environ)
        return _COMMANDS[args.command](args)
    except ValueError as exc:
        print(f"elasticctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (EtcdRendezvousError, CheckpointError, NoEmbeddedEtcd) as exc:
        print(f"elasticctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag and its value for numbers out of range."""
    if getattr(args, "interval", 1.0) <= 0:
        raise ValueError(f"--interval={args.interval}: must be > 0 seconds")
    count = getattr(args, "count", None)
    if count is not None and (count < 1 or not args.watch):
        raise ValueError(f"--count={count}: must be >= 1, with -w/--watch")
    if getattr(args, "timeout", 1.0) <= 0:
        raise ValueError(f"--timeout={args.timeout}: must be > 0 seconds")
    if getattr(args, "limit", 0) < 0:
        raise ValueError(f"--limit={args.limit}: must be >= 0")


def _json(args: argparse.Namespace) -> bool:
    return bool(args.output == "json")


def _emit(args: argparse.Namespace, document: Any, text: str) -> None:
    print(json.dumps(document, indent=2, sort_keys=True) if _json(args) else text)


# ----------------------------------------------------------------- reading
def cmd_status(args: argparse.Namespace) -> int:
    store: RunStore = args.target.store()
    if not args.watch:
        return _status_frame(args, store, watching=False)
    frames = 0
    try:
        while True:
            _status_frame(args, store, watching=True)
            frames += 1
            if args.count is not None and frames >= args.count:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:  # how a watch ends
        return EXIT_OK


def _status_frame(args: argparse.Namespace, store: RunStore, *, watching: bool) -> int:
    """One print of the status; a run with no status yet is an error unless watching."""
    now = time.time()
    status = status_view.gather(store, now_unix=now)
    if status is None:
        missing = f"no status for run {args.target.run_id!r}"
        if not watching:
            print(f"elasticctl: {missing}", file=sys.stderr)
            return EXIT_FAILED
        status, text = {"run_id": args.target.run_id, "state": None}, f"{missing} (yet)"
    else:
        text = status_view.render(status, now_unix=now)
    if watching and _json(args):
        print(json.dumps(status, sort_keys=True), flush=True)  # JSON lines
    elif watching:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        lead = CLEAR_SCREEN if sys.stdout.isatty() else "\n"
        print(f"{lead}{args.target.run_id} at {stamp}\n\n{text}", flush=True)
    else:
        _emit(args, status, text)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    events = args.target.store().events(limit=args.limit)
    now = time.time()
    lines = []
    for event in events:
        rest = {k: v for k, v in event.items() if k not in ("seq", "ts", "event", "node")}
        ts = event.get("ts")
        when = human.age(ts, now_unix=now) if isinstance(ts, (int, float)) else ""
        lines.append(
            f"{event.get('seq', ''):>6} {when:>12} {event.get('node', '-'):<14} "
            f"{event.get('event', ''):<18} {json.dumps(rest, sort_keys=True)}"
        )
    _emit(args, events, "\n".join(lines))
    return EXIT_OK


def _checkpoints(args: argparse.Namespace, url: str | None = None) -> Any:
    """The run's checkpoints: at ``url``, else the job's (--config), else the run status's.
    (``CheckpointManager`` imports torch: only the commands that read checkpoints load it.)"""
    from elastic.checkpoint import CheckpointManager

    run: Target = args.target
    config = CheckpointConfig(url=url) if url else run.checkpoint
    if config is None:
        url = (run.store().get_status() or {}).get("checkpoint_url")
        if not url:
            raise ValueError("--url: not given and the run status has no checkpoint_url")
        config = CheckpointConfig(url=url)
    return CheckpointManager(config, run_id=run.run_id, rank=0, world_size=1)


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """Reads storage only: with --url or --config it needs no etcd (a finished run, an outage)."""
    manager = _checkpoints(args, args.url)
    listed = [(m, manager.verify(m) if args.verify else []) for m in manager.list()]
    now = time.time()
    rows = [
        (
            m.step,
            m.world_size,
            human.yes_no(m.known_good),
            human.size(m.size_bytes),
            human.age(m.time_unix, now_unix=now),
            "; ".join(problems) or ("ok" if args.verify else ""),
        )
        for m, problems in listed
    ]
    header = ["step", "world_size", "known_good", "size", "age", "verify"]
    _emit(args, [_checkpoint_json(m, p) for m, p in listed], human.table(header, rows))
    return EXIT_FAILED if any(problems for _, problems in listed) else EXIT_OK


def _checkpoint_json(manifest: Any, problems: list[str]) -> dict[str, Any]:
    return {
        "step": manifest.step,
        "world_size": manifest.world_size,
        "known_good": manifest.known_good,
        "size_bytes": manifest.size_bytes,
        "time_unix": manifest.time_unix,
        "problems": problems,
    }


def cmd_audit(args: argparse.Namespace) -> int:
    """Reads storage only (manifests as JSON, nothing unpickled): ``ops/audit.py``."""
    from ops.audit import audit, format_text

    result = audit(_checkpoints(args, args.url))
    print(json.dumps(result.to_json(), indent=2) if _json(args) else format_text(result))
    return result.exit_code


# ----------------------------------------------------------------- steering
def requester(environ: Mapping[str, str] = os.environ) -> str:
    """``user@host`` of whoever runs elasticctl (recorded with every control request)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid), no env
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


Check = Callable[[RunStore, int], waiting.Progress]


def _request(
    args: argparse.Namespace, update: Mapping[str, Any], *, text: str, check: Check
) -> int:
    """Write a control request, record it (with who asked) in the run's event log, and with
    ``--wait`` poll ``check(store, seq)`` until it was applied: events after ``seq`` (the log's
    newest before the request was written) can be its outcome."""
    store: RunStore = args.target.store()
    before_seq = store.last_event_seq()  # a fast group may answer before our record lands
    document = store.put_control(update)
    by = requester()
    request = {"request": dict(update), "control_seq": document["seq"], "by": by}
    event_seq = store.append_event({"event": "control_request", **request})
    result: dict[str, Any] = {**request, "event_seq": event_seq}
    if not args.wait:
        _emit(args, result, f"{text} requested (control seq {document['seq']})")
        return EXIT_OK
    started = time.monotonic()
    progress = waiting.wait(lambda: check(store, before_seq), timeout_seconds=args.timeout)
    seconds = round(time.monotonic() - started, 1)
    result.update(applied=progress.done, detail=progress.detail, waited_seconds=seconds)
    if progress.done:
        took = f"{seconds:.1f} s" if seconds < 60 else human.duration(seconds)
        _emit(args, result, f"{text} applied: {progress.detail} ({took})")
        return EXIT_OK
    if _json(args):
        _emit(args, result, "")
    why = (
        progress.detail
        if progress.failed
        else f"not applied within {args.timeout:g} s: {progress.detail}"
    )
    print(f"elasticctl: {text}: {why}", file=sys.stderr)
    return EXIT_FAILED


def cmd_scale(args: argparse.Namespace) -> int:
    low, high = args.min_nodes, args.max_nodes
    if not 1 <= low <= high <= MAX_NODES:
        raise ValueError(f"--min={low} --max={high}: need 1 <= min <= max <= {MAX_NODES}")

    def check(store: RunStore, _: int) -> waiting.Progress:
        return waiting.scale_applied(
            store.latest_round(), min_nodes=low, max_nodes=high, live_nodes=len(store.members())
        )

    update = {"scale": {"min_nodes": low, "max_nodes": high}}
    return _request(args, update, text=f"scale to min {low}, max {high}", check=check)


def cmd_pause(args: argparse.Namespace) -> int:
    return _request(
        args,
        {"paused": True},
        text="pause",
        check=lambda store, _: waiting.pause_applied(store.events(limit=status_view.EVENTS_READ)),
    )


def cmd_resume(args: argparse.Namespace) -> int:
    return _request(
        args,
        {"paused": None},
        text="resume",
        check=lambda store, _: waiting.resume_applied(store.events(limit=status_view.EVENTS_READ)),
    )


def cmd_rewind(args: argparse.Namespace) -> int:
    """Only to a committed, known-good checkpoint: anything else would fail on every node."""
    step = args.to_step
    if step < 0:
        raise ValueError(f"--to-step={step}: must be >= 0")
    known_good = [m.step for m in _checkpoints(args).list() if m.known_good]
    if step not in known_good:
        newest = ", ".join(str(s) for s in sorted(known_good)[-5:]) or "none"
        raise ValueError(
            f"--to-step={step}: no known-good checkpoint at that step "
            f"(newest known-good steps: {newest})"
        )

    def check(store: RunStore, after_seq: int) -> waiting.Progress:
        events = store.events(limit=status_view.EVENTS_READ)
        return waiting.rewind_applied(events, after_seq=after_seq, to_step=step)

    return _request(args, {"rewind": {"to_step": step}}, text=f"rewind to step {step}", check=check)


# ----------------------------------------------------------------- local
def cmd_report(args: argparse.Namespace, _: argparse.ArgumentParser) -> int:
    from ops.report import write_report

    code = write_report(args.log, args.out)
    if code == EXIT_OK and _json(args):
        _emit(args, {"out": args.out, "logs": list(args.log)}, "")
    return code


def cmd_completion(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import shtab

    for action in _actions(parser):
        if action.dest in FILE_FLAGS:
            action.complete = shtab.FILE  # type: ignore[attr-defined]  # shtab's hook
    script = shtab.complete(parser, shell=args.shell)
    _emit(args, {"shell": args.shell, "script": script}, script)
    return EXIT_OK


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action of ``parser`` and of its commands."""
    found = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _actions(sub)
    return found


_LOCAL: dict[str, Callable[[argparse.Namespace, argparse.ArgumentParser], int]] = {
    "report": cmd_report,
    "completion": cmd_completion,
}
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": cmd_status,
    "events": cmd_events,
    "checkpoints": cmd_checkpoints,
    "scale": cmd_scale,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "rewind": cmd_rewind,
    "audit": cmd_audit,
}


if __name__ == "__main__":
    sys.exit(main())
