"""The packaged contracts (chaos/contracts/) against the minimum shapes other tools rely on.

A packaged schema may say more than the shared one (descriptions, defaults) but must accept every
document the shared one accepts and keep every key it requires: a superset, not a copy. The
checker below compares the two schemas structurally, for the keywords the contracts use; a
keyword it does not know fails the test rather than passing unread."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from chaos.scenario import CONTRACTS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "contracts"

ANNOTATIONS = {"$schema", "$id", "title", "description", "default", "examples", "$comment"}


def _types(schema: dict[str, Any]) -> set[str] | None:
    t = schema.get("type")
    if t is None:
        return None
    types = {t} if isinstance(t, str) else set(t)
    return types | {"integer"} if "number" in types else types


def narrowings(ours: Any, shared: Any, where: str = "$") -> list[str]:
    """Where `ours` rejects something `shared` accepts (or drops a key `shared` requires)."""
    if ours is True or not set(ours) - ANNOTATIONS:
        return []
    if shared is True or not set(shared) - ANNOTATIONS:
        return [f"{where}: constrains what the shared schema leaves open"]
    if ours is False:
        return [f"{where}: rejects everything"]
    found: list[str] = []
    unknown = set(shared) - ANNOTATIONS - _CHECKED
    if unknown:
        found.append(f"{where}: the checker does not know {sorted(unknown)}")
    extra = set(ours) - ANNOTATIONS - set(shared) - {"properties"}
    if extra:
        found.append(f"{where}: adds constraints {sorted(extra)}")
    st, ot = _types(shared), _types(ours)
    if ot is not None and (st is None or not st <= ot):
        found.append(f"{where}: type {sorted(ot)} does not cover {sorted(st or _ALL)}")
    if "enum" in ours and ("enum" not in shared or not set(map(json.dumps, shared["enum"])) <=
                           set(map(json.dumps, ours["enum"]))):
        found.append(f"{where}: enum {ours['enum']} narrower than {shared.get('enum', 'any')}")
    if set(ours.get("required", [])) != set(shared.get("required", [])):
        found.append(f"{where}: requires {ours.get('required', [])}, shared requires "
                     f"{shared.get('required', [])}")
    for bound, looser in (("minimum", min), ("exclusiveMinimum", min), ("minLength", min),
                          ("maximum", max), ("exclusiveMaximum", max)):
        if bound in ours and (bound not in shared or looser(ours[bound], shared[bound]) !=
                              ours[bound]):
            found.append(f"{where}: {bound} {ours[bound]} tighter than {shared.get(bound)}")
    if shared.get("additionalProperties", True) is not False and \
            ours.get("additionalProperties", True) is False:
        found.append(f"{where}: refuses keys the shared schema allows")
    for name, sub in shared.get("properties", {}).items():
        if name not in ours.get("properties", {}):
            if ours.get("additionalProperties", True) is not True:
                found.append(f"{where}.{name}: missing")
            continue
        found += narrowings(ours["properties"][name], sub, f"{where}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(shared.get(key), dict):
            found += narrowings(ours.get(key, {}), shared[key], f"{where}.{key}")
    for key in ("oneOf", "anyOf", "allOf"):
        if json.dumps(ours.get(key)) != json.dumps(shared.get(key)):
            found.append(f"{where}: {key} differs")
    return found


_ALL = {"object", "array", "string", "number", "integer", "boolean", "null"}
_CHECKED = {"type", "enum", "required", "properties", "items", "additionalProperties", "minimum",
            "exclusiveMinimum", "maximum", "exclusiveMaximum", "minLength", "oneOf", "anyOf",
            "allOf"}


def _shared(name: str) -> dict[str, Any]:
    path = SHARED / f"{name}.schema.json"
    if not path.exists():
        pytest.skip("shared/contracts is not beside this checkout")
    return json.loads(path.read_text())


def _packaged(name: str) -> dict[str, Any]:
    return json.loads((CONTRACTS / f"{name}.schema.json").read_text())


@pytest.mark.parametrize("name", ["scenario", "report"])
def test_packaged_contract_accepts_all_the_shared_one_accepts(name: str) -> None:
    assert narrowings(_packaged(name), _shared(name)) == []


@pytest.mark.parametrize("name", ["scenario", "report"])
def test_the_superset_check_catches_a_narrowed_contract(name: str) -> None:
    """Each way of narrowing a schema is seen: closing it, requiring more, shrinking a type."""
    shared = _shared(name)
    closed = {**shared, "additionalProperties": False}
    stricter = {**shared, "required": [*shared["required"], "something_new"]}
    first = next(iter(shared["properties"]))
    retyped = {**shared, "properties": {**shared["properties"], first: {"type": "null"}}}
    for narrowed in (closed, stricter, retyped):
        assert narrowings(narrowed, shared), narrowed


def test_a_narrowed_fault_kind_is_caught() -> None:
    """The packaged scenario schema once listed six fault kinds where the shared one takes any."""
    shared = _shared("scenario")
    narrowed = json.loads(json.dumps(shared))
    narrowed["properties"]["faults"]["items"]["properties"]["kind"] = {
        "enum": ["kill_node", "add_node"]}
    assert any("kind" in n for n in narrowings(narrowed, shared))


def test_shipped_scenarios_validate_against_both() -> None:
    shared = _shared("scenario")
    for path in sorted((ROOT / "chaos" / "scenarios").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        jsonschema.validate(doc, shared)
        jsonschema.validate(doc, _packaged("scenario"))
