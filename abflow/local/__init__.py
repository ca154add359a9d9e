"""The local stack on a laptop without Docker: the embedded broker and PostgreSQL (``stack``), and
what `abflow up` runs on them (``run``). Top layer, beside the CLI."""
