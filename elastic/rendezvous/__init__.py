"""etcd v3 rendezvous for torch.distributed.elastic, node leases, watches and run state.

Public API (see docs/rendezvous.md for the key layout and the daemon's usage):

- ``EtcdConfig``, ``connect(config) -> EtcdClient``: the etcd adapter (failover, TLS, auth).
- ``create_handler(config_or_client, run_id=..., min_nodes=..., max_nodes=...)``: torch's
  ``RendezvousHandler`` interface on the group's round protocol (``EtcdStore`` per round).
- ``NodeLease``, ``NodeWatch``, ``NodeEvent``: node liveness and arrival/departure events.
- ``RunStore``: run status, control requests, bounded event log.
- ``InMemoryEtcd``: the same ``KeyValueClient`` contract in memory, for unit tests.
- Errors: ``EtcdRendezvousError`` and subclasses of torch's rendezvous errors.
- torchrun: ``--rdzv-backend etcd3`` via ``elastic.rendezvous.torchrun:handler_factory``.
"""

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
from elastic.rendezvous.handler import EtcdRendezvousHandler, create_handler
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValueClient
from elastic.rendezvous.memory import InMemoryEtcd
from elastic.rendezvous.nodes import NodeEvent, NodeLease, NodeWatch
from elastic.rendezvous.run_store import RunStore
from elastic.rendezvous.store import EtcdStore

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
