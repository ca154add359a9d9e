"""One error hierarchy for the whole project.

Every error abflow raises on purpose is an ``AbflowError`` whose message says
what is wrong and, where it can, what to do. Three kinds cover what a caller
needs to decide: ``NotFound`` (the thing named does not exist), ``Conflict``
(the request is well formed but the current state refuses it) and ``Invalid``
(the input breaks a rule). The HTTP API maps them once to 404, 409 and 422;
the CLI prints the message and exits non-zero.
"""

from __future__ import annotations


class AbflowError(Exception):
    """Base of every error abflow raises on purpose."""


class NotFound(AbflowError, LookupError):
    """The experiment, rollout or other thing named does not exist."""


class Conflict(AbflowError):
    """The request is well formed, but the current state refuses it."""


class Invalid(AbflowError, ValueError):
    """The input breaks a rule; the message names the field."""


class ExperimentNotFound(NotFound):
    def __init__(self, experiment_id: str, hint: str = "") -> None:
        self.experiment_id = experiment_id
        super().__init__(f"no experiment {experiment_id!r}" + (f"; {hint}" if hint else ""))


class ExperimentExists(Conflict):
    def __init__(self, experiment_id: str) -> None:
        self.experiment_id = experiment_id
        super().__init__(f"experiment {experiment_id!r} already exists")
