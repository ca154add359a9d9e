"""PostgreSQL: the schema (``models``, ``migrations``) and every SQL statement of the project.

Two drivers, each for what it does best:

- **psycopg 3, plain SQL, on the hot paths**: the stream sink (``sink``: one
  transaction per batch of up to 10,000 events, ``executemany`` upserts), the
  API's assignment (``assignments``: one round trip per returning unit, on a
  pooled autocommit connection), the weight refresher and the rollout
  controller (``allocations``, ``rollouts``: LISTEN/NOTIFY and session-level
  advisory locks, which need a connection of their own held for hours). These
  run thousands of times a second or hold server-side state; an ORM's unit of
  work adds nothing there but latency.
- **SQLAlchemy** for the schema (``models``, Alembic ``migrations``), the
  registry (``registry``: experiments, their status, champions) and the reads of
  reports and commands (``queries``), where sessions, relationships and composed
  queries make the code shorter and the cost per call does not matter.
  ``queries`` also holds the few psycopg one-liners the hot paths share
  (NOTIFY and LISTEN on the aggregates channel, the health ping, refresh lags).

``db`` opens both (``engine_for``, ``connect``) from one database URL.
"""
