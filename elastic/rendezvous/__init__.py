"""etcd v3 rendezvous for torch.distributed.elastic, node leases, watches and run state.

Public API (see docs/rendezvous.md for the key layout and the daemon's usage):

- ``EtcdConfig``, ``connect(config) -> EtcdClient``: the etcd adapter (failover, TLS, auth).
- ``create_handler(config_or_client, run_id=..., min_nodes=..., max_nodes=...)``: torch's
  ``RendezvousHandler`` interface on the group's round protocol (``EtcdStore`` per round).
- ``NodeLease``, ``NodeWatch``, ``NodeEvent``: node liveness and arrival/departure events.
- ``RunStore``: run status, control requests, bounded event log.
- ``InMemoryEtcd``: the same ``KeyValueClient`` contract in memory, for unit tests.
- Errors: ``EtcdRendezvousError`` and subclasses; through the handler also torch's
  rendezvous errors (``torch_errors``).
- torchrun: ``--rdzv-backend etcd3`` via ``elastic.rendezvous.torchrun:handler_factory``.

Importing the package does not import torch: the torch-bound names (the handler and the c10d
store) load on first use, so the etcd client, ``RunStore`` and ``elasticctl`` stay light.
"""

from typing import TYPE_CHECKING, Any

from elastic.rendezvous.config import EtcdConfig
from elastic.rendezvous.errors import (
    EtcdAuthError,
    EtcdConnectionError,
    EtcdLeaseNotFoundError,
    EtcdRendezvousError,
    EtcdRequestError,
    EtcdStateError,
    EtcdTlsError,
    EtcdUnavailableError,
    NodeIdTaken,
)
from elastic.rendezvous.etcd_client import EtcdClient, connect
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValueClient
from elastic.rendezvous.memory import InMemoryEtcd
from elastic.rendezvous.nodes import NodeEvent, NodeLease, NodeWatch
from elastic.rendezvous.run_store import RunStore

if TYPE_CHECKING:
    from elastic.rendezvous.handler import EtcdRendezvousHandler, create_handler
    from elastic.rendezvous.store import EtcdStore

_LAZY = {
    "EtcdRendezvousHandler": "elastic.rendezvous.handler",
    "create_handler": "elastic.rendezvous.handler",
    "EtcdStore": "elastic.rendezvous.store",
}


def __getattr__(name: str) -> Any:
    """The torch-bound names, imported on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "EtcdAuthError",
    "EtcdClient",
    "EtcdConfig",
    "EtcdConnectionError",
    "EtcdLeaseNotFoundError",
    "EtcdRendezvousError",
    "EtcdRendezvousHandler",
    "EtcdRequestError",
    "EtcdStateError",
    "EtcdStore",
    "EtcdTlsError",
    "EtcdUnavailableError",
    "InMemoryEtcd",
    "KeyValueClient",
    "NodeEvent",
    "NodeIdTaken",
    "NodeLease",
    "NodeWatch",
    "RunKeys",
    "RunStore",
    "connect",
    "create_handler",
]
