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
handler would receive the event class; zope.interface caches that answer.
"""
import zope.component
import zope.event
from zope.interface import implementedBy
from zope.interface import implementer

from zpgpool import interfaces


_seen = None          # a copy of zope.event.subscribers when last looked at
_plain = False        # whether a subscriber other than zope.component's exists
_specs = {}           # event class -> its implementedBy specification


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
    spec = _specs.get(factory)
    if spec is None:
        spec = _specs[factory] = implementedBy(factory)
    return bool(zope.component.getSiteManager().adapters.subscriptions(
        (spec,), None))


def notify(factory, *args):
    """Build an event with ``factory(*args)`` and publish it, but only when
    somebody would receive it.

    Called by the pool; what a subscriber raises reaches the pool's caller.
    """
    if listening(factory):
        zope.event.notify(factory(*args))


class _PoolEvent:

    def __init__(self, pool):
        self.pool = pool

    def _details(self):
        # What the repr shows after the pool's name; the pool's DSN is
        # left out on purpose, an event repr ends up in logs.
        return ""

    def __repr__(self):
        return "<%s pool=%r%s>" % (
            type(self).__name__, getattr(self.pool, "name", None),
            self._details())


class _ConnectionEvent(_PoolEvent):

    def __init__(self, pool, connection):
        super().__init__(pool)
        self.connection = connection


@implementer(interfaces.IConnectionCreated)
class ConnectionCreated(_ConnectionEvent):
    """The pool opened a new connection; see ``IConnectionCreated``."""

    def __init__(self, pool, connection, connect_time):
        super().__init__(pool, connection)
        self.connect_time = connect_time

    def _details(self):
        return " connect_time=%.3f" % self.connect_time


@implementer(interfaces.IConnectionCheckedOut)
class ConnectionCheckedOut(_ConnectionEvent):
    """A caller got a connection; see ``IConnectionCheckedOut``."""

    def __init__(self, pool, connection, wait_time):
        super().__init__(pool, connection)
        self.wait_time = wait_time

    def _details(self):
        return " wait_time=%.3f" % self.wait_time


@implementer(interfaces.IConnectionReturned)
class ConnectionReturned(_ConnectionEvent):
    """A connection came back and was kept; see ``IConnectionReturned``."""


@implementer(interfaces.IConnectionDiscarded)
class ConnectionDiscarded(_ConnectionEvent):
    """The pool closed a connection for good; see
    ``IConnectionDiscarded``."""

    def __init__(self, pool, connection, reason):
        super().__init__(pool, connection)
        self.reason = reason

    def _details(self):
        return " reason=%r" % (self.reason,)


@implementer(interfaces.IPoolExhausted)
class PoolExhausted(_PoolEvent):
    """A caller has to wait for a connection; see ``IPoolExhausted``."""

    def __init__(self, pool, waiting):
        super().__init__(pool)
        self.waiting = waiting

    def _details(self):
        return " waiting=%d" % self.waiting


@implementer(interfaces.IPoolClosed)
class PoolClosed(_PoolEvent):
    """The pool was closed; see ``IPoolClosed``."""
