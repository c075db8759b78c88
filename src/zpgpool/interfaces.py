"""The contract of zpgpool: the pool and the events it publishes.

Nothing in this module runs; it only describes.  Code that needs a pool asks
the component registry for an ``IConnectionPool`` utility, and code that
wants to watch a pool subscribes to the events below.
"""
from zope.interface import Attribute
from zope.interface import Interface


class IPoolEvent(Interface):
    """Something happened to a pool."""

    pool = Attribute("The pool (an IConnectionPool) the event is about.")


class IConnectionCreated(IPoolEvent):
    """The pool opened a new connection to the server."""

    connection = Attribute("The new psycopg2 connection.")
    connect_time = Attribute("Seconds the connect took, as a float.")


class IConnectionCheckedOut(IPoolEvent):
    """The pool handed a connection to a caller."""

    connection = Attribute("The psycopg2 connection handed out.")
    wait_time = Attribute(
        "Seconds the caller waited for it, as a float (0.0 when a connection"
        " was free at once).")


class IConnectionReturned(IPoolEvent):
    """A caller gave a connection back and the pool kept it."""

    connection = Attribute("The psycopg2 connection given back.")


class IConnectionDiscarded(IPoolEvent):
    """The pool closed a connection and will not use it again."""

    connection = Attribute("The psycopg2 connection that was closed.")
    reason = Attribute(
        "Why, as a short text an operator can read, for example"
        " 'broken', 'max_lifetime' or 'max_idle'.")


class IPoolExhausted(IPoolEvent):
    """A caller found every connection busy and has to wait."""

    waiting = Attribute("How many callers are waiting, this one included.")


class IPoolClosed(IPoolEvent):
    """The pool was closed and hands out no more connections."""


class IConnectionPool(Interface):
    """A pool of PostgreSQL connections (first draft, see below)."""
