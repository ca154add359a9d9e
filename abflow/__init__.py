"""abflow: A/B tests and multi-armed bandits between ML model variants on a live event stream.

This package holds the two ends of the layers: ``core`` (the pure kernel every
other package builds on), ``settings`` (the environment, read once) and, on
top of everything, ``cli`` (the ``abflow`` command) and ``local`` (the stack
``abflow up`` runs on a laptop).
"""
