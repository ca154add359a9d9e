"""The pure kernel: imports nothing else of the project and does no I/O.

``config`` (the experiment config and its validation), ``buckets`` (hashing,
variant choice and layer buckets), ``windowing`` (time windows and the latency
histogram), ``text`` (tables and JSON-safe values), ``errors`` (the one error
hierarchy). Every other package builds on it.
"""
