"""The environment of a Python that a test starts in a process of its own.

Several tests run ``sys.executable`` in a subprocess (``-c SCRIPT``,
``-m zpgpool``, Zope's runwsgi and zconsole) and the child must import what
the tests import: zpgpool, transaction, ZODB, Zope, the example product.
In a virtualenv the child finds them in its site-packages by itself.
Under zc.buildout it does not: ``bin/test`` gets its eggs from the
``sys.path`` its generated script sets up, and a child started with the
same interpreter has none of that.  ``python_env()`` hands the parent's
import path down in PYTHONPATH, so both ways of running the suite give
the child the same modules as the test.

Only for children that run this very interpreter: another Python (a
virtualenv a test creates, say) must not get this path.
"""
import os
import sys


def python_env(**extra):
    """Return a copy of ``os.environ`` for a child ``sys.executable`` that
    imports what this process imports, with ``extra`` variables added."""
    # Absolute, because the child may run in another directory; '' (the
    # current directory) is left out for the same reason.
    path = [os.path.abspath(entry) for entry in sys.path if entry]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.update(extra)
    return env
