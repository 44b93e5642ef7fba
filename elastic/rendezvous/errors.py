"""Errors of ``elastic.rendezvous``: one root, ``temporary`` says whether a retry may help.

The daemon reads ``temporary`` to decide between retrying and giving up. Messages name the etcd
endpoint(s) and the cause. No torch here: the etcd client, the run store and ``elasticctl``
import this module, and a CLI that only reads etcd must not pay for importing torch. Callers
that only know torch (torchrun's agent) meet these errors only through
``EtcdRendezvousHandler``, whose methods re-class them as torch's rendezvous errors too
(:mod:`elastic.rendezvous.torch_errors`): an ``EtcdUnavailableError`` raised there is also a
``RendezvousConnectionError``.
"""

from __future__ import annotations

from typing import ClassVar


class EtcdRendezvousError(Exception):
    """Root of every error raised by this package."""

    temporary: ClassVar[bool] = False


class EtcdConnectionError(EtcdRendezvousError):
    """etcd could not be reached or refused us; ``endpoint`` is what was tried."""

    def __init__(self, message: str, *, endpoint: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class EtcdUnavailableError(EtcdConnectionError):
    """No endpoint answered within the connect timeout; retrying later may succeed."""

    temporary: ClassVar[bool] = True


class EtcdTlsError(EtcdConnectionError):
    """The TLS handshake failed (missing or untrusted certificate); retrying will not help."""


class EtcdAuthError(EtcdConnectionError):
    """etcd rejected the user/password or the request's permissions."""


class EtcdLeaseNotFoundError(EtcdRendezvousError):
    """The lease expired or was revoked; the owner grants a new one."""

    temporary: ClassVar[bool] = True


class EtcdRequestError(EtcdRendezvousError):
    """etcd answered with an error that is neither connectivity nor auth (a bug or a limit)."""


class EtcdStateError(EtcdRendezvousError):
    """A value read from etcd is corrupt (not the JSON or state bytes we wrote)."""


class NodeIdTaken(EtcdRendezvousError):
    """Another live process holds this node id's key (its lease is alive): two daemons with one
    ``--node-id`` would overwrite each other's membership, and the second one's exit would
    delete the first one's key."""

    def __init__(self, node_id: str, holder: dict[str, object]) -> None:
        state = holder.get("state", "?")
        super().__init__(
            f"node id {node_id!r} is held by a live daemon (state {state}, lease alive): "
            "give every node its own --node-id, or stop the other one first"
        )
        self.node_id = node_id


class RoundTimeout(EtcdRendezvousError):
    """No round with this node in it formed within the join timeout; retrying later may work."""

    temporary: ClassVar[bool] = True
