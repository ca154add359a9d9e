"""The stream worker: Faust agents that validate, window and aggregate events into PostgreSQL."""
