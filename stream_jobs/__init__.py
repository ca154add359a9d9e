"""The stream worker: a Faust app (``app``) that reads batches of events from Kafka and applies each
exactly once to PostgreSQL (``sink``), after validating and windowing them (``aggregate``), sorting
them out (``classify``: replayed, invalid, duplicate, counted), checking offsets and dedup ids
(``checkpoint``) and sending what cannot be counted to the dead letters (``dead_letters``).
It never imports ``bandit_service``: the two meet only in PostgreSQL."""
