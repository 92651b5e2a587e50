"""service_runtime.web.Blueprint: request schemas are built once, not once per request."""

from __future__ import annotations

from flask import Flask
from flask.views import MethodView
from flask_smorest import Api
from marshmallow import Schema, fields

from service_runtime.web import Blueprint


class _Counted(Schema):
    built = 0
    name = fields.String(required=True)

    def __init__(self, *args, **kwargs) -> None:
        type(self).built += 1
        super().__init__(*args, **kwargs)


def _app() -> Flask:
    app = Flask(__name__)
    app.config.update(API_TITLE="t", API_VERSION="v1", OPENAPI_VERSION="3.0.3")
    blp = Blueprint("t", __name__)

    @blp.route("/echo")
    class Echo(MethodView):
        @blp.arguments(_Counted)
        @blp.response(200)
        def post(self, body: dict) -> dict:
            return body

    Api(app).register_blueprint(blp)
    return app


def test_a_schema_class_is_instantiated_once_for_every_request() -> None:
    _Counted.built = 0
    client = _app().test_client()
    built_at_start = _Counted.built  # the decorator's own instance (and the spec's)
    for name in ("a", "b", "c"):
        answer = client.post("/echo", json={"name": name})
        assert answer.status_code == 200
        assert answer.get_json() == {"name": name}
    assert _Counted.built == built_at_start


def test_the_shared_instance_still_reports_each_request_s_own_errors() -> None:
    client = _app().test_client()
    missing = client.post("/echo", json={})
    wrong = client.post("/echo", json={"name": 3})
    assert missing.status_code == wrong.status_code == 422
    assert missing.get_json()["errors"]["json"] == {"name": ["Missing data for required field."]}
    assert wrong.get_json()["errors"]["json"] == {"name": ["Not a valid string."]}
