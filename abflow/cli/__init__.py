"""The ``abflow`` command line: one small module per group of commands.

The CLI sits on top of every other layer; it parses options, calls the
packages below, and prints. Errors below it are ``AbflowError``s, shown as
one line with a non-zero exit (``common.AbflowGroup``).
"""

from __future__ import annotations

import click

from abflow.cli import experiments, reports, rollouts, services, simulate, stack
from abflow.cli.common import AbflowGroup


@click.group(cls=AbflowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="abflow")
def main() -> None:
    """abflow: A/B tests and bandits between ML model variants on a live event stream.

    Kafka and PostgreSQL come from ABFLOW_KAFKA_BOOTSTRAP and ABFLOW_DATABASE_URL;
    when those are unset, commands use the local stack that `abflow up` started.
    """


for module in (stack, experiments, reports, rollouts, services, simulate):
    for command in module.COMMANDS:
        main.add_command(command)

__all__ = ["main"]
