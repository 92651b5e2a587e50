"""Request-validation pieces more than one service's API uses."""

from __future__ import annotations

import re

from flask_smorest import abort
from flask_smorest.pagination import PaginationParameters
from marshmallow import fields, validate

KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
KEY_RULE = "1-64 characters: letters, digits, '.', '_', ':' or '-', starting with a letter or digit"


def key_field(**kwargs) -> fields.String:
    """A sku or customer id: short, printable, safe in URLs."""
    return fields.String(validate=validate.Regexp(KEY_PATTERN, error=KEY_RULE), **kwargs)


def cents_field(**kwargs) -> fields.Integer:
    return fields.Integer(strict=True, validate=validate.Range(min=0, max=2**31 - 1), **kwargs)


def count_field(minimum: int = 0, **kwargs) -> fields.Integer:
    return fields.Integer(
        strict=True, validate=validate.Range(min=minimum, max=2**31 - 1), **kwargs
    )


def check_path_key(name: str, value: str) -> str:
    """Path parameters get the same field errors as bodies (422), not a 404 or a 500."""
    if not KEY_PATTERN.match(value):
        abort(422, message="Invalid path parameter.", errors={"path": {name: [KEY_RULE]}})
    return value


def check_path_uuid(name: str, value: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        abort(
            422, message="Invalid path parameter.", errors={"path": {name: ["Not a valid UUID."]}}
        )


_MAX_OFFSET = 2**62  # past any real table; keeps a huge ?page= inside PostgreSQL's bigint


def page_window(pagination: PaginationParameters) -> tuple[int, int]:
    """(limit, offset) for SQL from flask-smorest's pagination parameters."""
    return pagination.page_size, min(pagination.first_item, _MAX_OFFSET)
