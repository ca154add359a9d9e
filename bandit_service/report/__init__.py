"""The experiment report: ``build`` (the pure analysis over a ``ReportInput``, and the loader that
reads one from PostgreSQL), ``evidence`` (metric cells and guardrail evidence shared with rollouts),
``render`` (terminal text and a self-contained HTML page with plots)."""
