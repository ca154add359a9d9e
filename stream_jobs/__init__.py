"""The stream worker. A record goes through these modules in order: the consumer thread reads
batches (``source``, reading holes again: ``positions``) of ``records``; each record is checked
(``validate``), the batch sorted out (``classify``: replayed, invalid, duplicate, counted) against
the partitions' dedup ids (``dedup``) and stored offsets (``checkpoint``), its units exposed and
their events attributed (``units``), summed per window (``windows``), and applied exactly once to
PostgreSQL (``sink``); what cannot be counted goes to the dead letters (``dead_letters``). ``app``
is the Faust wiring. It never imports ``bandit_service``: the two meet only in PostgreSQL."""
