"""Our errors as torch's rendezvous errors, at the one place torch's callers meet them.

``elastic.rendezvous.errors`` stays free of torch (the etcd client and ``elasticctl`` import
it). torchrun's agent talks to ``EtcdRendezvousHandler`` only, and expects torch's types from
it, so the handler's methods run under :func:`torch_errors`: an error leaving them is re-classed
in place as a subclass of both its own type and torch's matching error. A caller that catches
``EtcdUnavailableError`` and one that catches ``RendezvousConnectionError`` both catch it; the
message, attributes (``endpoint``) and traceback are the original's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.distributed.elastic.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousStateError,
    RendezvousTimeoutError,
)

from elastic.rendezvous.errors import (
    EtcdConnectionError,
    EtcdRendezvousError,
    EtcdStateError,
    RoundTimeout,
)

# Most specific first: the first match picks torch's base.
_TORCH_BASES: tuple[tuple[type[EtcdRendezvousError], type[RendezvousError]], ...] = (
    (RoundTimeout, RendezvousTimeoutError),
    (EtcdConnectionError, RendezvousConnectionError),
    (EtcdStateError, RendezvousStateError),
    (EtcdRendezvousError, RendezvousError),
)


_CLASSES: dict[type[EtcdRendezvousError], type[EtcdRendezvousError]] = {}


def torch_class(cls: type[EtcdRendezvousError]) -> type[EtcdRendezvousError]:
    """``cls`` with torch's matching rendezvous error as a second base (same name), one per
    class (``except`` and ``isinstance`` see one type)."""
    if issubclass(cls, RendezvousError):
        return cls
    if cls not in _CLASSES:
        base = next(torch for ours, torch in _TORCH_BASES if issubclass(cls, ours))
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _CLASSES[cls] = type(cls.__name__, (cls, base), namespace)
    return _CLASSES[cls]


def as_torch(exc: EtcdRendezvousError) -> EtcdRendezvousError:
    """``exc`` itself, now also an instance of torch's matching error."""
    exc.__class__ = torch_class(type(exc))
    return exc


@contextlib.contextmanager
def torch_errors() -> Iterator[None]:
    """Run a block of torch's interface: our errors leave it as torch's too."""
    try:
        yield
    except EtcdRendezvousError as exc:
        as_torch(exc)
        raise
