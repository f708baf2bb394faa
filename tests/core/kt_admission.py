"""What kube-apiserver does with a custom resource before storing it, for one CRD, as a test helper.

`admit(crd, obj)` returns the error lines the API server would answer a create with (`[]`: admitted),
under strict field validation (kubectl's default since 1.27, and what GitOps tools send):

1. the version must be served and the kind must match; metadata.name must be a DNS-1123 subdomain and
   metadata.namespace a DNS-1123 label;
2. nulls are pruned where the schema is not nullable (so a null required field is missing);
3. the structural schema: types (integer, number, string, boolean, object, array, int-or-string,
   preserve-unknown-fields), enum, minimum/maximum (exclusive too), min/maxLength, pattern,
   min/maxItems, required, and unknown fields (an error under strict validation);
4. every `x-kubernetes-validations` rule on nodes whose schema validation passed, evaluated with
   cel-python (the same CEL language; `self` bound to the node's value), reported at the node or at its
   `fieldPath` with the rule's message, as kube-apiserver words it: `<path>: Invalid value: ...: <message>`.

Transition rules (oldSelf) and CEL cost limits are not evaluated (creates only; cost is checked by
test_cel_rules_are_bounded).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import celpy

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV = celpy.Environment()
TRANSITION = re.compile(r"\boldSelf\b")


@cache
def program(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule))


def admit(crd: dict[str, Any], obj: Any) -> list[str]:
    spec = crd["spec"]
    if not isinstance(obj, dict):
        return ["document: must be an object"]
    served = {f"{spec['group']}/{v['name']}": v for v in spec["versions"] if v.get("served")}
    version = served.get(obj.get("apiVersion"))  # type: ignore[arg-type]
    if version is None:
        return [f"apiVersion: no matches for kind {obj.get('kind')!r} in version {obj.get('apiVersion')!r}"]
    if obj.get("kind") != spec["names"]["kind"]:
        return [f"kind: Invalid value: {obj.get('kind')!r}: must be {spec['names']['kind']}"]
    errors: list[str] = []
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        errors.append("metadata.name: Required value: name or generateName is required")
    else:
        name = meta["name"]
        if not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN.match(name):
            errors.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of "
                          "lower case alphanumeric characters, '-' or '.'")
        namespace = meta.get("namespace", "default")
        if not isinstance(namespace, str) or len(namespace) > 63 or not DNS_LABEL.match(namespace):
            errors.append(f"metadata.namespace: Invalid value: {namespace!r}: a lowercase RFC 1123 label must "
                          "consist of lower case alphanumeric characters or '-'")
    schema = version["schema"]["openAPIV3Schema"]
    validate(schema, {k: v for k, v in obj.items() if k != "metadata"}, "", errors)  # metadata: checked above
    return errors


def _type_ok(schema: dict[str, Any], value: Any) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    kind = schema.get("type")
    if kind is None:
        return True  # preserve-unknown-fields without a type: anything
    return {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[kind]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def validate(schema: dict[str, Any], value: Any, path: str, errors: list[str]) -> None:
    before = len(errors)
    if not _type_ok(schema, value):
        expected = "integer or string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
        errors.append(f"{path}: Invalid value: {value!r}: must be of type {expected}")
        return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(f'"{v}"' for v in schema["enum"])
        errors.append(f"{path}: Unsupported value: {value!r}: supported values: {allowed}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and (value <= low if schema.get("exclusiveMinimum") else value < low):
            errors.append(f"{path}: Invalid value: {value!r}: should be greater than "
                          f"{'' if schema.get('exclusiveMinimum') else 'or equal to '}{low}")
        if high is not None and (value >= high if schema.get("exclusiveMaximum") else value > high):
            errors.append(f"{path}: Invalid value: {value!r}: should be less than "
                          f"{'' if schema.get('exclusiveMaximum') else 'or equal to '}{high}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: Invalid value: {value!r}: should be at least {schema['minLength']} chars long")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: Too long: may not be longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: Invalid value: {value!r}: should match '{schema['pattern']}'")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: Invalid value: should have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: Too many: must have at most {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                validate(schema["items"], item, f"{path}[{i}]", errors)
    if isinstance(value, dict) and schema.get("type") == "object":
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields")
        for key in list(value):
            sub = (properties or {}).get(key) or (extra if isinstance(extra, dict) else None)
            if value[key] is None and not (sub or {}).get("nullable"):
                value = {k: v for k, v in value.items() if k != key}  # pruned, as kube-apiserver does
            elif sub is None and not keep:
                errors.append(f'{_join(path, key)}: unknown field "{_join(path, key)}"')
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{_join(path, key)}: Required value")
        for key, item in value.items():
            sub = (properties or {}).get(key) or (extra if isinstance(extra, dict) else None)
            if sub is not None and item is not None:
                validate(sub, item, _join(path, key), errors)
    if len(errors) == before:
        for rule in schema.get("x-kubernetes-validations", []):
            if TRANSITION.search(rule["rule"]):
                continue  # a transition rule: kube-apiserver evaluates it on updates only
            where = path + rule.get("fieldPath", "")
            try:
                ok = program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
            except Exception as exc:  # an evaluation error fails the rule, as in kube-apiserver
                errors.append(f"{where}: Invalid value: {value!r}: {rule['message']} (error: {exc})")
                continue
            if isinstance(ok, Exception) or not bool(ok):
                errors.append(f"{where}: Invalid value: \"{schema.get('type', 'object')}\": {rule['message']}")
