"""The OpenAPI schema describes every body, and the config model names the field that is wrong.
Built from the app without starting it: no database or broker needed."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pydantic import ValidationError

from abflow.core.config import parse_config
from abflow.settings import ApiKeys, Settings
from bandit_service.api import create_app
from bandit_service.api.models import ExperimentConfigIn

SPEC = create_app(dataclasses.replace(Settings.from_env(), api_keys=ApiKeys(admin=("key",)))).openapi()
OPERATIONS = [(method.upper(), path, op) for path, ops in SPEC["paths"].items() for method, op in ops.items()]
OPEN = {("GET", "/ping"), ("GET", "/healthz"), ("GET", "/metrics")}


@pytest.mark.parametrize("method, path, op", OPERATIONS, ids=[f"{m} {p}" for m, p, _ in OPERATIONS])
def test_every_operation_documents_its_bodies(method, path, op):
    success = [r for code, r in op["responses"].items() if code.startswith("2")]
    assert len(success) == 1
    content = success[0].get("content", {})
    assert content, "no response body documented"
    for media in content.values():
        assert media.get("schema") not in (None, {}), "an empty response schema"
    if method == "POST" and "requestBody" in op:
        assert op["requestBody"]["content"]["application/json"]["schema"] not in (None, {})
    if (method, path) not in OPEN and "{experiment_id}" in path:
        assert "404" in op["responses"], "unknown experiments are 404: say so"
    if (method, path) not in OPEN:
        assert {"401", "403"} <= set(op["responses"]), "it needs a key of a role: say so"


def test_the_experiment_config_body_has_a_schema_with_every_field():
    schema = SPEC["components"]["schemas"]["ExperimentConfigIn"]
    assert {"experiment_id", "strategy", "variants", "metrics", "analysis", "rollout", "layer", "traffic",
            "shadows"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_config_errors_name_the_field_path():
    data = {"experiment_id": "x", "strategy": "UCB1",
            "variants": [{"name": "A"}, {"name": "B", "initial_weight": "heavy"}]}
    with pytest.raises(ValidationError) as wrong_type:
        ExperimentConfigIn.model_validate(data)
    assert ("variants", 1, "initial_weight") in [e["loc"] for e in wrong_type.value.errors()]
    with pytest.raises(ValidationError) as unknown:
        ExperimentConfigIn.model_validate({**data, "variants": [{"name": "A", "colour": "red"}]})
    assert ("variants", 0, "colour") in [e["loc"] for e in unknown.value.errors()]


def test_the_model_passes_on_exactly_what_was_sent():
    """Absent keys stay absent, so the defaults are the config's own (one place decides them)."""
    sent = {"experiment_id": "x", "strategy": "UCB1", "variants": [{"name": "A"}, {"name": "B"}]}
    assert ExperimentConfigIn.model_validate(sent).as_config_data() == sent
    assert parse_config(ExperimentConfigIn.model_validate(sent).as_config_data()) == parse_config(sent)


# Schemas the framework adds (FastAPI's validation error shapes), not ours.
FRAMEWORK_SCHEMAS = {"HTTPValidationError", "ValidationError"}


def test_every_body_in_the_schema_has_examples_that_its_model_accepts():
    from bandit_service.api import models

    schemas = set(SPEC["components"]["schemas"]) - FRAMEWORK_SCHEMAS
    assert {"ExperimentConfigIn", "AssignRequest", "ErrorOut", "ReportOut"} <= schemas
    for name in sorted(schemas):
        examples = SPEC["components"]["schemas"][name].get("examples")
        assert examples, f"{name} has no example"
        model = getattr(models, name)
        for example in examples:
            model.model_validate_json(json.dumps(example))  # raises when the example is wrong
    # The config's examples are also configs that parse_config accepts.
    for example in SPEC["components"]["schemas"]["ExperimentConfigIn"]["examples"]:
        parse_config(ExperimentConfigIn.model_validate(example).as_config_data())
