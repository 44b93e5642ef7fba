"""Which run ``elasticctl`` acts on: the job's config file and ``ELASTICD_*`` environment as
the daemon reads them (its ``run_id`` and ``etcd`` section; a run on the embedded etcd through
the endpoint file its daemon writes under ``run_dir``), then the flags. Resolved once per
invocation; a bad value is a ``ValueError`` naming the key and the value (exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.config import DaemonConfig
from daemon.embedded_etcd import published_endpoint
from elastic.checkpoint import CheckpointConfig
from elastic.config import build, check_name, layered
from elastic.rendezvous import EtcdConfig, RunStore, connect

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

    def store(self) -> RunStore:
        """A connected ``RunStore`` for the run (``NoEmbeddedEtcd`` when there is none)."""
        if self.no_etcd is not None:
            raise NoEmbeddedEtcd(self.no_etcd)
        return RunStore(connect(self.etcd), run_id=self.run_id, key_prefix=self.etcd.key_prefix)


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
