"""zpgpool_plone: an example Plone 6 add-on whose views use zpgpool."""

#: The tables the post-install handler creates (setuphandlers.py).
#: ``zpgpool_plone_vote``'s unique constraint is checked at COMMIT, so a
#: duplicate fails PostgreSQL's vote rather than the statement.
SCHEMA = """
CREATE TABLE IF NOT EXISTS zpgpool_plone_content (
    uid text PRIMARY KEY,
    path text NOT NULL,
    title text NOT NULL
);
CREATE TABLE IF NOT EXISTS zpgpool_plone_note (
    id serial PRIMARY KEY,
    key text NOT NULL,
    uid text NOT NULL,
    attempt integer NOT NULL,
    thread text NOT NULL,
    backend_pid integer NOT NULL
);
CREATE TABLE IF NOT EXISTS zpgpool_plone_vote (
    token text,
    CONSTRAINT zpgpool_plone_vote_token UNIQUE (token)
        DEFERRABLE INITIALLY DEFERRED
);
CREATE TABLE IF NOT EXISTS zpgpool_plone_counter (
    name text PRIMARY KEY,
    n integer NOT NULL DEFAULT 0
);
"""

#: The pool the add-on's content and rows go through (configure.zcml).
POOL = 'plone'
