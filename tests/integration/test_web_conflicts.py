"""A deadlock or serialization failure in a request is a conflict, not an outage: the request
runs again, and if it keeps conflicting the client gets 409, never 503 "database unavailable".

The errors are raised by the real PostgreSQL (RAISE ... USING ERRCODE), so psycopg maps them as
it would a real deadlock (DeadlockDetected, a subclass of OperationalError).
"""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import Blueprint

from service_runtime.web import CONFLICT_RETRIES, create_service_app, db_pool
from tests.tokens import authorize

_RAISE = "DO $$ BEGIN RAISE EXCEPTION 'staged' USING ERRCODE = %s; END $$"


def _app(pool, sqlstate: str, failures: int):
    runs = {"count": 0, "committed": 0}
    blp = Blueprint("staged", __name__)

    @blp.route("/staged")
    class Staged(MethodView):
        def post(self):
            runs["count"] += 1
            with db_pool().connection() as conn, conn.transaction():
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS t (x int)")
                if runs["count"] <= failures:
                    conn.execute(_RAISE.replace("%s", f"'{sqlstate}'"))
            runs["committed"] += 1
            return {"runs": runs["count"]}

    app = create_service_app("inventory", "Staged", [blp], pool=pool, config={"TESTING": True})
    return authorize(app.test_client()), runs


def test_a_deadlocked_request_runs_again_and_succeeds(pool):
    client, runs = _app(pool, "40P01", failures=CONFLICT_RETRIES - 1)
    response = client.post("/staged")
    assert response.status_code == 200, response.json
    assert runs == {"count": CONFLICT_RETRIES, "committed": 1}


def test_a_request_that_keeps_conflicting_gets_409_not_503(pool):
    client, runs = _app(pool, "40001", failures=100)
    response = client.post("/staged")
    assert response.status_code == 409
    assert response.json["code"] == 409
    assert "conflict" in response.json["message"]
    assert "unavailable" not in response.json["message"]
    assert runs == {"count": CONFLICT_RETRIES, "committed": 0}


def test_a_real_outage_is_still_503(pool):
    client, runs = _app(pool, "57P01", failures=100)  # admin_shutdown: the server went away
    response = client.post("/staged")
    assert response.status_code == 503
    assert runs["count"] == 1  # an outage is not retried inside the request
