"""The fast acceptance check compiled from the marshmallow contracts (contracts/fastcheck.py):
it never accepts what marshmallow refuses, it accepts the valid payloads (or it would be no
faster), and it refuses to compile what it does not understand."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates

from contracts.events import _FAST_CHECKS, EVENT_SCHEMAS
from contracts.fastcheck import Unsupported, compile_schema
from tests.unit.test_contracts import VALID

# values that break a field in every way a JSON payload can
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 10**30, 1.0, 1.5, "", "x", "x" * 65, "1",
    str(uuid.uuid4()), str(uuid.uuid4()).upper(), "{" + str(uuid.uuid4()) + "}",
    uuid.uuid4().hex, "not-a-uuid", [], [{}], {}, {"sku": "A"},
    "customer_request", "insufficient_stock", "payment_timeout",
]  # fmt: skip


def _marshmallow_accepts(schema: Schema, payload: Any) -> bool:
    try:
        schema.load(payload)
    except (ValidationError, TypeError, ValueError):
        return False
    return True


def _variants(payload: Any) -> list[Any]:
    """The payload with one value (at any depth) replaced, removed, or a key added."""
    out: list[Any] = []
    if isinstance(payload, dict):
        for key in payload:
            for odd in ODD_VALUES:
                out.append({**payload, key: odd})
            out.append({k: v for k, v in payload.items() if k != key})
            for inner in _variants(payload[key]):
                out.append({**payload, key: inner})
        out.append({**payload, "extra": 1})
    elif isinstance(payload, list):
        out += [[], payload * 30, [*payload, None], [*payload, {}]]
        for index, item in enumerate(payload):
            for inner in _variants(item):
                changed = copy.copy(payload)
                changed[index] = inner
                out.append(changed)
    return out


def test_every_contract_compiles():
    assert set(_FAST_CHECKS) == set(EVENT_SCHEMAS)


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_the_valid_examples_take_the_fast_path(event_type):
    assert _FAST_CHECKS[(event_type, 1)](VALID[event_type])


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_the_fast_path_never_accepts_what_marshmallow_refuses(event_type):
    schema, fast = EVENT_SCHEMAS[(event_type, 1)], _FAST_CHECKS[(event_type, 1)]
    variants = _variants(VALID[event_type])
    assert len(variants) > 50
    accepted = 0
    for payload in variants:
        if fast(payload):
            accepted += 1
            assert _marshmallow_accepts(schema, payload), payload
    assert accepted  # some variants are valid (another valid sku, uuid...): taken fast too


def test_what_it_does_not_understand_has_no_fast_path():
    class Hooked(Schema):
        name = fields.String()

        @validates("name")
        def check_name(self, value, **_kwargs):
            pass

    class OtherField(Schema):
        when = fields.DateTime()

    class OtherValidator(Schema):
        name = fields.String(validate=validate.Regexp("^a"))

    class Reading(fields.String):
        def _deserialize(self, value, attr, data, **kwargs):
            return value

    class Subclassed(Schema):
        name = Reading()

    for schema in (Hooked(), OtherField(), OtherValidator(), Subclassed()):
        with pytest.raises(Unsupported):
            compile_schema(schema)


def test_unknown_fields_follow_the_schema():
    class Loose(Schema):
        class Meta:
            unknown = EXCLUDE

        name = fields.String(required=True, validate=validate.Length(min=1, max=3))

    check = compile_schema(Loose())
    assert check({"name": "ab", "other": 1})
    assert not check({"name": ""})
    assert not check({"name": "abcd"})
    assert not check({})


def test_uuid_text_canonical_or_not_is_read_as_uuid_parsing_reads_it():
    from contracts.ids import canonical_uuid, is_uuid

    canonical = "6b1f1bd8-0a4e-4e55-a9c1-2c86d1ef1b0c"
    for text in (canonical, canonical.upper(), "{" + canonical + "}", canonical.replace("-", "")):
        assert is_uuid(text)
        assert canonical_uuid(text) == canonical
    for text in ("", "not-a-uuid", canonical[:-1], canonical + "0", canonical.replace("b", "g")):
        assert not is_uuid(text)
        with pytest.raises(ValueError):
            canonical_uuid(text)
    assert not is_uuid(None) and not is_uuid(7)
