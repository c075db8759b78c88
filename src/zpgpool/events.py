"""Events a pool publishes through ``zope.event``.

The pool calls ``notify(EventClass, *args)`` rather than building the event
itself, so that an event nobody wants costs no object and no dispatch.
With zope.component's ZCML loaded, a ``<subscriber
for="zpgpool.interfaces.IConnectionCreated" handler="..."/>`` receives the
events the interfaces below describe.

"Nobody wants it" needs care: as soon as zope.component's event module is
imported (in any Zope site), ``zope.event.subscribers`` holds its
dispatcher for good, and building an event and dispatching it costs
microseconds -- too much for every checkout. So when that dispatcher is the
only subscriber, ``listening`` asks the current site manager whether any
handler would receive the event class, and keeps the answer until that
registry (or one it derives from) changes: asking again each time cost
more than the rest of a checkout.
"""
import dataclasses

import zope.component
import zope.event
from zope.interface import implementedBy
from zope.interface import implementer

from zpgpool import interfaces


_seen = None          # a copy of zope.event.subscribers when last looked at
_plain = False        # whether a subscriber other than zope.component's exists
_specs = {}           # event class -> its implementedBy specification
# event class -> (adapter registry, its generation, whether it has a
# handler): zope.interface counts a registry's changes, and those of the
# registries it derives from, in its _generation.
_answers = {}


def _component_dispatch():
    try:
        from zope.component.event import dispatch
    except ImportError:  # pragma: no cover - zope.component ships it
        return None
    return dispatch


def listening(factory):
    """Tell whether publishing a ``factory`` event would reach anybody."""
    global _seen, _plain
    subscribers = zope.event.subscribers
    if not subscribers:
        return False
    if subscribers != _seen:
        dispatch = _component_dispatch()
        _plain = any(s is not dispatch for s in subscribers)
        _seen = list(subscribers)
    if _plain:
        return True
    registry = zope.component.getSiteManager().adapters
    generation = getattr(registry, "_generation", None)
    known = _answers.get(factory)
    if known is not None and known[0] is registry \
            and known[1] == generation is not None:
        return known[2]
    spec = _specs.get(factory)
    if spec is None:
        spec = _specs[factory] = implementedBy(factory)
    answer = bool(registry.subscriptions((spec,), None))
    _answers[factory] = (registry, generation, answer)
    return answer


def notify(factory, *args):
    """Build an event with ``factory(*args)`` and publish it, but only when
    somebody would receive it.

    Called by the pool; what a subscriber raises reaches the pool's caller.
    """
    if listening(factory):
        zope.event.notify(factory(*args))


# How a repr shows an event's own facts, by their declared type.
_SHOWN = {float: "%.3f", int: "%d", str: "%r"}


def _event(provides):
    """Make the decorated class an event providing ``provides``: a
    dataclass of the fields it declares after its base's, compared (and
    hashed) by identity as before."""
    def make(cls):
        cls = dataclasses.dataclass(repr=False, eq=False)(cls)
        return implementer(provides)(cls)
    return make


@dataclasses.dataclass(repr=False, eq=False)
class _PoolEvent:

    pool: object

    def __repr__(self):
        # The pool by its name and the connection not at all: an event's
        # repr ends up in logs, and a DSN does not belong there.
        facts = "".join(
            " %s=%s" % (f.name, _SHOWN[f.type] % (getattr(self, f.name),))
            for f in dataclasses.fields(self)
            if f.name not in ("pool", "connection"))
        return "<%s pool=%r%s>" % (
            type(self).__name__, getattr(self.pool, "name", None), facts)


@dataclasses.dataclass(repr=False, eq=False)
class _ConnectionEvent(_PoolEvent):

    connection: object


@_event(interfaces.IConnectionCreated)
class ConnectionCreated(_ConnectionEvent):
    """The pool opened a new connection; see ``IConnectionCreated``."""

    connect_time: float


@_event(interfaces.IConnectionCheckedOut)
class ConnectionCheckedOut(_ConnectionEvent):
    """A caller got a connection; see ``IConnectionCheckedOut``."""

    wait_time: float


@_event(interfaces.IConnectionReturned)
class ConnectionReturned(_ConnectionEvent):
    """A connection came back and was kept; see ``IConnectionReturned``."""


@_event(interfaces.IConnectionDiscarded)
class ConnectionDiscarded(_ConnectionEvent):
    """The pool closed a connection for good; see
    ``IConnectionDiscarded``."""

    reason: str


@_event(interfaces.IPoolExhausted)
class PoolExhausted(_PoolEvent):
    """A caller has to wait for a connection; see ``IPoolExhausted``."""

    waiting: int


@_event(interfaces.IPoolClosed)
class PoolClosed(_PoolEvent):
    """The pool was closed; see ``IPoolClosed``."""
