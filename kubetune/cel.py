"""CRD validation rules (CEL, `x-kubernetes-validations`) declared on the spec model, next to the Python check.

The spec model is the one source of validation. What pydantic states as constraints (ge, le, min_length,
Literal, pattern) reaches the CRD's OpenAPI schema by itself; what a validator function checks is stated
once more as a CEL rule, in the same Annotated type as the function, so both travel together:

    Uri = Annotated[str, AfterValidator(_uri), Cel("!self.contains('://') || ...", "scheme is not supported")]

The API server reports a failed rule at the field it sits on (`spec.output.uri: Invalid value: ...:
scheme is not supported`), so messages need not repeat the path. `kubetune.crd` lifts rules off the
schemas Kubernetes cannot type (int-or-string, preserve-unknown-fields) onto the parent object, with a
fieldPath, so every rule has a typed home.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RULES = "x-kubernetes-validations"


@dataclass(frozen=True)
class Cel:
    rule: str
    message: str
    max_length: int | None = None  # a bound the validator enforces, stated for the schema (CEL cost estimation)

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = dict(handler(core_schema))
        schema.setdefault(RULES, []).append({"rule": self.rule, "message": self.message})
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        return schema


def object_rule(rule: str, message: str) -> dict[str, Any]:
    """json_schema_extra for a model whose validator checks several fields together."""
    return {RULES: [{"rule": rule, "message": message}]}
