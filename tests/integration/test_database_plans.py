"""The database answers the platform's point operations from the `_id` index.

FerretDB v1's SQLite backend, as released, scanned whole tables for them (infra/ferretdb
has the patches); a real MongoDB uses its `_id` index.  Both are checked through the
server's own `explain`, so a rebuilt FerretDB without the patches fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
from mongoengine.connection import get_db

from services.kernel.config import Settings

pytestmark = pytest.mark.integration

# The filters the event store, the relay and the projections send (see their adapters).
POINT_FILTERS = [
    {"_id": "agent-7"},
    {"_id": "agent-7", "version": {"$lt": 12}},  # apply an event once
    {"_id": "agent-7", "version": 7},  # replace the version seen
]


def plan(explained: dict[str, Any]) -> str:
    return str(explained.get("queryPlanner"))


@pytest.mark.parametrize("query", POINT_FILTERS, ids=["_id", "_id+version<", "_id+version"])
def test_point_operations_use_the_id_index(mongo: Settings, query: dict[str, Any]) -> None:
    views = get_db()["plans"]
    views.insert_many([{"_id": f"agent-{i}", "version": i} for i in range(50)])

    explained = get_db().command("explain", {"find": "plans", "filter": query})

    if "ferretdbVersion" in explained.get("serverInfo", {}):
        assert explained["filterPushdown"] is True
        assert "USING INDEX plans_" in plan(explained) and "__id_" in plan(explained), plan(explained)
    else:
        assert "COLLSCAN" not in plan(explained), plan(explained)
    assert [d["_id"] for d in views.find(query)] == ["agent-7"]


def test_other_conditions_still_filter_the_indexed_document(mongo: Settings) -> None:
    views = get_db()["plans"]
    views.insert_many([{"_id": "agent-1", "version": 5}, {"_id": "agent-2", "version": 1}])

    assert views.find_one({"_id": "agent-1", "version": {"$lt": 5}}) is None
    assert views.update_one({"_id": "agent-1", "version": {"$lt": 5}}, {"$set": {"state": "busy"}}).matched_count == 0
    assert views.update_one({"_id": "agent-1", "version": {"$lt": 6}}, {"$set": {"state": "busy"}}).modified_count == 1
    assert views.find_one({"_id": "agent-1"}) == {"_id": "agent-1", "version": 5, "state": "busy"}
