"""An example Zope product whose browser views use zpgpool.

``configure.zcml`` declares three pools and registers the views of
``views.py`` on the Zope application root.  ``SCHEMA`` is the SQL the
``@@example-setup`` view runs to create the tables the views use.
"""

#: The tables of the example, created by ``@@example-setup``.
SCHEMA = """
CREATE TABLE IF NOT EXISTS example_note (
    id serial PRIMARY KEY,
    key text NOT NULL,
    text text,
    attempt integer NOT NULL,
    thread text NOT NULL,
    backend_pid integer NOT NULL
);
CREATE TABLE IF NOT EXISTS example_vote (
    token text NOT NULL,
    CONSTRAINT example_vote_token_unique UNIQUE (token)
        DEFERRABLE INITIALLY DEFERRED
);
CREATE TABLE IF NOT EXISTS example_counter (
    name text PRIMARY KEY,
    n integer NOT NULL
);
"""
