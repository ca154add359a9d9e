"""PostgreSQL: the experiment registry, window aggregates, sink offsets and the views operators read."""
