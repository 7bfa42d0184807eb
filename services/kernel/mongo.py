"""MongoDB connection (mongoengine) for any MongoDB-wire server, FerretDB included."""

from __future__ import annotations

import mongoengine
from pymongo import MongoClient

from services.kernel.config import Settings


def connect(settings: Settings) -> MongoClient:
    # Indexes are created explicitly by `ensure_indexes()` at start-up, not on first
    # use, so a slow index build never hides inside a request.
    return mongoengine.connect(
        db=settings.mongo_db,
        host=settings.mongo_url,
        alias="default",
        uuidRepresentation="standard",
        tz_aware=True,
        serverSelectionTimeoutMS=5000,
    )


def disconnect() -> None:
    mongoengine.disconnect(alias="default")
