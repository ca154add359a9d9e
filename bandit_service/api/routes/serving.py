"""What a serving process calls: assign a unit, publish invocation and conversion events."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter

from bandit_service.api.deps import SERVING, State
from bandit_service.api.errors import DATABASE_DOWN
from bandit_service.api.models import (
    ERRORS,
    NOT_FOUND,
    AssignRequest,
    AssignResponse,
    ConversionRequest,
    EventAccepted,
    InvocationRequest,
)
from bandit_service.assignment import assign
from producers.contracts import CONVERSION, INVOCATION, InvalidEvent, check_clock, event_from_dict
from storage.registry import get_experiment

router = APIRouter(prefix="/experiments", tags=["serving"], dependencies=SERVING, responses={**ERRORS, **NOT_FOUND})


@router.post("/{experiment_id}/assign")
async def assign_unit(experiment_id: str, body: AssignRequest, state: State) -> AssignResponse:
    """The unit's sticky variant: drawn from the current weights on first sight, then stored."""
    async with state.assign_pool.connection() as conn:
        result = await assign(conn, experiment_id, body.unit_id)
    state.metrics.assignments.labels(experiment_id, result.variant, str(result.new).lower()).inc()
    return AssignResponse(experiment_id=experiment_id, unit_id=body.unit_id, variant=result.variant,
                          propensity=result.propensity, allocation_version=result.allocation_version,
                          new=result.new, in_experiment=result.in_experiment)


def _variants(state: State, experiment_id: str) -> frozenset[str]:
    """The experiment's variants; while PostgreSQL is down, those it had when last read, so that
    events go on reaching Kafka (the stream checks them again). Unknown then: 503."""
    try:
        variants = frozenset(v.name for v in get_experiment(state.engine, experiment_id).variants)
    except DATABASE_DOWN:
        if experiment_id in state.known_variants:
            return state.known_variants[experiment_id]
        raise
    state.known_variants[experiment_id] = variants
    return variants


def _publish(state: State, experiment_id: str, kind: str, fields: dict) -> EventAccepted:
    if fields["variant"] not in _variants(state, experiment_id):
        raise InvalidEvent("unknown_variant", f"experiment {experiment_id!r} has no variant {fields['variant']!r}",
                           field="variant")
    data = {k: v for k, v in fields.items() if v is not None}
    data.setdefault("event_id", str(uuid.uuid4()))
    data.setdefault("timestamp", time.time())
    data["experiment_id"] = experiment_id
    event = event_from_dict(kind, data)
    # The stream's own clock checks: an event it would dead-letter is refused here, with the reason.
    check_clock(event.timestamp, time.time(), state.settings.max_future_seconds, state.settings.max_lateness_seconds)
    state.publisher.publish(event)
    state.publisher.poll(0)
    return EventAccepted(event_id=event.event_id, accepted=True)


@router.post("/{experiment_id}/invocations", status_code=202)
def invocation(experiment_id: str, body: InvocationRequest, state: State) -> EventAccepted:
    """Publish an invocation event (what the SDK's Publisher does, for services that are not in Python)."""
    return _publish(state, experiment_id, INVOCATION, body.model_dump())


@router.post("/{experiment_id}/conversions", status_code=202)
def conversion(experiment_id: str, body: ConversionRequest, state: State) -> EventAccepted:
    """Publish a conversion event; send your own ``event_id`` to make retries count once."""
    return _publish(state, experiment_id, CONVERSION, body.model_dump())
