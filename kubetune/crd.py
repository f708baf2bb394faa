"""The FineTuneJob CustomResourceDefinition, generated from the pydantic models in kubetune.spec.

`manifests/crd.yaml` is this module's output (`kubetune crd > manifests/crd.yaml`); a test fails when
they drift. The schema is structural (every node typed, no $ref), so the API server prunes and
validates it. Two spec fields accept two JSON types ('auto' or a number / a bool, or a string or a
list); Kubernetes has `x-kubernetes-int-or-string` for the first kind and nothing for the second, so
those are `x-kubernetes-preserve-unknown-fields` and the operator validates them with the same model.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from kubetune.cel import RULES
from kubetune.spec import API_GROUP, API_VERSION, KIND, PLURAL, FineTuneJobSpec, FineTuneJobStatus

Schema = dict[str, Any]

_KEEP = {
    "type", "description", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "required", "format", "x-kubernetes-list-type", "x-kubernetes-list-map-keys", RULES,
}


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return node


def structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Convert one pydantic JSON-schema node into a structural OpenAPI v3 schema node."""
    node = _resolve(node, defs)
    description = node.get("description")
    out: Schema
    if "anyOf" in node:
        options = [_resolve(o, defs) for o in node["anyOf"]]
        non_null = [o for o in options if o.get("type") != "null"]
        nullable = len(non_null) < len(options)
        if len(non_null) == 1:
            out = structural({**non_null[0], **({"description": description} if description else {})}, defs)
        else:
            types = {o.get("type") for o in non_null}
            if types == {"integer", "string"}:
                out = {"x-kubernetes-int-or-string": True}
            else:
                out = {"x-kubernetes-preserve-unknown-fields": True}
            if description:
                out["description"] = description
            if RULES in node:
                out[RULES] = node[RULES]
        if nullable:
            out["nullable"] = True
        return out

    out = {k: v for k, v in node.items() if k in _KEEP}
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:
        out.update(minimum=node["exclusiveMinimum"], exclusiveMinimum=True)
    if "exclusiveMaximum" in node:
        out.update(maximum=node["exclusiveMaximum"], exclusiveMaximum=True)
    kind = node.get("type")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        if "properties" in node:
            out["properties"] = {k: structural(v, defs) for k, v in node["properties"].items()}
            _lift_rules(out)
        elif isinstance(node.get("additionalProperties"), dict):
            value = _resolve(node["additionalProperties"], defs)
            if "anyOf" in value:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out["additionalProperties"] = structural(value, defs)
    elif kind == "array":
        out["items"] = structural(node.get("items", {"type": "string"}), defs)
    return out


def _lift_rules(obj: Schema) -> None:
    """Move CEL rules off untyped properties (int-or-string, preserve-unknown-fields) onto the object that
    holds them, where `self` is typed; each keeps its field in fieldPath, so errors still name the field."""
    for name, prop in obj["properties"].items():
        if "type" in prop or RULES not in prop:
            continue
        for rule in prop.pop(RULES):
            body = re.sub(r"\bself\b", f"self.{name}", rule["rule"])
            obj.setdefault(RULES, []).append(
                {"rule": f"!has(self.{name}) || ({body})", "message": rule["message"], "fieldPath": f".{name}"})


def model_schema(model: Any) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def crd() -> dict[str, Any]:
    spec = model_schema(FineTuneJobSpec)
    spec["description"] = "A QLoRA/LoRA supervised fine-tune: base model, dataset, LoRA and training settings, output."
    status = model_schema(FineTuneJobStatus)
    status["description"] = "Written by the kubetune operator."
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "GPU", "type": "string", "jsonPath": ".status.gpu", "description": "GPU class x count"},
        {"name": "VRAM", "type": "string", "jsonPath": ".status.vram", "description": "Planner's estimate per GPU"},
        {"name": "Step", "type": "string", "jsonPath": ".status.step"},
        {"name": "Loss", "type": "string", "jsonPath": ".status.loss"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}", "labels": {"app.kubernetes.io/name": "kubetune"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ftj"],
                "categories": ["kubetune", "ml"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "FineTuneJob: fine-tune an open-weight LLM with QLoRA/LoRA.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kubetune crd` from kubetune/spec.py. Do not edit; regenerate.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
