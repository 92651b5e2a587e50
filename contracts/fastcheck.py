"""A fast acceptance check compiled from the marshmallow contracts (the contracts stay there).

`compile_schema(schema)` turns a marshmallow Schema into a plain function that answers one
question: is this JSON payload certainly valid? It understands the field types and validators
the contracts use (String, strict Integer, UUID, List, Nested; Length, Range, OneOf; unknown
fields RAISE/EXCLUDE/INCLUDE) and refuses to compile anything else (hooks, other fields or
validators, subclasses that change how a value is read): such a schema has no fast path.

It is a one-sided check. True means marshmallow would accept the payload too; False means
"not sure", and the caller runs marshmallow, whose verdict and error messages are the ones
that count (contracts/events.py). So a wrong answer could only ever cost time, never let an
invalid event through, as long as True is never given for what marshmallow rejects: the unit
tests hold the two against each other on valid and invalid payloads of every event.

Why: marshmallow's load costs about 50 µs for an OrderPlaced; this check about 3 µs, on the
path of every event a consumer handles and every event a service emits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import EXCLUDE, INCLUDE, RAISE, Schema, fields, validate

from contracts.ids import is_uuid

Check = Callable[[Any], bool]


class Unsupported(Exception):
    """A schema, field or validator this compiler does not understand: no fast path."""


# The methods through which a field reads a value: a subclass that defines one of its own
# behaves differently from its base, so it has no fast path.
_READING = ("deserialize", "_deserialize", "_validated", "_validate", "_validate_missing")
_BASES = (fields.String, fields.Integer, fields.UUID, fields.List, fields.Nested)


def compile_schema(schema: Schema, unknown: str | None = None) -> Check:
    """The fast acceptance check of `schema`'s load; raises Unsupported."""
    if any(schema._hooks.values()):  # pre_load, validates, validates_schema...
        raise Unsupported(f"{type(schema).__name__} has hooks")
    if schema.many:
        raise Unsupported(f"{type(schema).__name__} is many=True")
    unknown = unknown or schema.unknown
    if unknown not in (RAISE, EXCLUDE, INCLUDE):
        raise Unsupported(f"unknown={unknown!r}")
    checks: list[tuple[str, bool, Check]] = []
    for name, field in schema.load_fields.items():
        key = field.data_key if field.data_key is not None else name
        checks.append((key, bool(field.required), _compile_field(field)))
    keys = frozenset(key for key, _required, _check in checks)
    strict = unknown == RAISE

    def check(data: Any) -> bool:
        if type(data) is not dict:
            return False
        if strict and not keys.issuperset(data):
            return False
        for key, required, check_value in checks:
            if key in data:
                if not check_value(data[key]):
                    return False
            elif required:
                return False
        return True

    return check


def _base_of(field: fields.Field) -> type:
    for cls in type(field).__mro__:
        if cls in _BASES:
            return cls
        if any(name in vars(cls) for name in _READING):
            break
    raise Unsupported(f"field {type(field).__name__}")


def _compile_field(field: fields.Field) -> Check:
    base = _base_of(field)
    # None is read as None when allowed, and is an error otherwise: not sure either way
    value_check = _compile_value(base, field)
    validators = [_compile_validator(v) for v in field.validators]
    if not validators:
        return value_check
    if len(validators) == 1:  # the usual case: no loop to set up per value
        (valid,) = validators
        return lambda value: value_check(value) and valid(value)

    def check(value: Any) -> bool:
        if not value_check(value):
            return False
        # a loop, not all(<generator>): the generator costs more than the checks
        for valid in validators:  # noqa: SIM110
            if not valid(value):
                return False
        return True

    return check


def _compile_value(base: type, field: Any) -> Check:
    if base is fields.String:
        return lambda value: type(value) is str
    if base is fields.Integer:
        # strict or not, an int is read as itself (bool is refused by marshmallow 4: not ours)
        return lambda value: type(value) is int
    if base is fields.UUID:
        return is_uuid
    if base is fields.List:
        inner = _compile_field(field.inner)

        def is_list(value: Any) -> bool:
            if type(value) is not list:
                return False
            for item in value:  # noqa: SIM110 (as above)
                if not inner(item):
                    return False
            return True

        return is_list
    if base is fields.Nested:
        if field.many:
            raise Unsupported("Nested(many=True)")
        return compile_schema(field.schema, field.unknown)
    raise Unsupported(f"field {base.__name__}")


def _compile_validator(validator: Any) -> Check:
    kind = type(validator)
    if kind is validate.Length:
        low, high, equal = validator.min, validator.max, validator.equal

        def length(value: Any) -> bool:
            n = len(value)
            if equal is not None:
                return n == equal
            return (low is None or n >= low) and (high is None or n <= high)

        return length
    if kind is validate.Range:
        low, high = validator.min, validator.max
        low_in, high_in = validator.min_inclusive, validator.max_inclusive

        def in_range(value: Any) -> bool:
            if low is not None and (value < low if low_in else value <= low):
                return False
            return high is None or (value <= high if high_in else value < high)

        return in_range
    if kind is validate.OneOf:
        choices = list(validator.choices)
        try:
            allowed = frozenset(choices)
        except TypeError:
            raise Unsupported("OneOf with unhashable choices") from None
        # a str equal to a choice is in the set; anything else is left to marshmallow
        return lambda value: type(value) is str and value in allowed
    raise Unsupported(f"validator {kind.__name__}")
