"""Request-validation pieces more than one service's API uses.

Every string a request carries goes through `Text` (directly, or through `key_field`), so that
nothing PostgreSQL cannot store (U+0000, an unpaired surrogate) gets past the schema as a 500.
Every amount goes through `amount_field`, bounded by contracts/limits.py.
"""

from __future__ import annotations

import re
from typing import Any

from flask_smorest import abort
from flask_smorest.pagination import PaginationParameters
from marshmallow import ValidationError, fields, validate

from contracts.ids import canonical_uuid

KEY_REGEX = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"  # as documented (JSON Schema, ECMA regex)
# Python's "$" also matches before a final newline, "\Z" does not: "apple\n" is no key.
KEY_PATTERN = re.compile(KEY_REGEX[:-1] + r"\Z")
KEY_RULE = "1-64 characters: letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
UNSTORABLE_TEXT = "Contains a character that cannot be stored (U+0000 or an unpaired surrogate)."
# Documented on free-text fields (JSON Schema, ECMA regex): no U+0000.
NO_NUL_PATTERN = "^[^\\u0000]*$"


def storable(value: str) -> bool:
    """PostgreSQL text is UTF-8 without NUL: no U+0000 and no lone surrogate (not encodable)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Text(fields.String):
    """A string PostgreSQL can store; anything else is a field error (422), not a 500."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not storable(text):
            raise ValidationError(UNSTORABLE_TEXT)
        return text


def text_field(**kwargs: Any) -> Text:
    """Free text (a name): any storable string, documented as such."""
    metadata = {"pattern": NO_NUL_PATTERN, **kwargs.pop("metadata", {})}
    return Text(metadata=metadata, **kwargs)


def key_field(**kwargs: Any) -> Text:
    """A sku or customer id: short, printable, safe in URLs."""
    return Text(
        validate=validate.Regexp(KEY_PATTERN, error=KEY_RULE),
        metadata={"pattern": KEY_REGEX, **kwargs.pop("metadata", {})},
        **kwargs,
    )


def amount_field(minimum: int, maximum: int, **kwargs: Any) -> fields.Integer:
    """Money or a quantity: an integer (never a numeric string) within its documented bound."""
    return fields.Integer(strict=True, validate=validate.Range(min=minimum, max=maximum), **kwargs)


# -- path parameters: checked in the views (422 with the field, like bodies), documented exactly


def key_path(name: str) -> dict:
    """OpenAPI doc of a key path parameter (flask-smorest would say "any string")."""
    schema = {"type": "string", "pattern": KEY_REGEX, "minLength": 1, "maxLength": 64}
    return {"in": "path", "name": name, "required": True, "schema": schema}


def uuid_path(name: str) -> dict:
    schema = {"type": "string", "format": "uuid"}
    return {"in": "path", "name": name, "required": True, "schema": schema}


def check_path_key(name: str, value: str) -> str:
    """Path parameters get the same field errors as bodies (422), not a 404 or a 500."""
    if not KEY_PATTERN.match(value):
        abort(422, message="Invalid path parameter.", errors={"path": {name: [KEY_RULE]}})
    return value


def check_path_uuid(name: str, value: str) -> str:
    try:
        return canonical_uuid(value)
    except ValueError:
        abort(
            422, message="Invalid path parameter.", errors={"path": {name: ["Not a valid UUID."]}}
        )


_MAX_OFFSET = 2**62  # past any real table; keeps a huge ?page= inside PostgreSQL's bigint


def page_window(pagination: PaginationParameters) -> tuple[int, int]:
    """(limit, offset) for SQL from flask-smorest's pagination parameters."""
    return pagination.page_size, min(pagination.first_item, _MAX_OFFSET)
