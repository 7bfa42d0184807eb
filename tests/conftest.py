"""One fixture layer for real infrastructure.

The session starts its own Kafka and MongoDB-wire database (testcontainers where a
Docker engine answers, the project's local processes otherwise) on free ports, so
tests never touch a stack left running by `make infra-up`.  Each test gets its own
namespace: fresh topics, consumer groups and database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.kernel.config import Settings


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from infra.stack import ephemeral_stack

    with ephemeral_stack(tmp_path_factory.mktemp("stack")) as endpoints:
        yield endpoints


@pytest.fixture
def settings(stack: dict[str, str], tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap=stack["kafka_bootstrap"],
        mongo_url=stack["mongo_url"],
        namespace=f"t{uuid.uuid4().hex[:12]}",
        state_dir=tmp_path / "state",
        relay_interval_s=0.2,
    )


@pytest.fixture
def mongo(settings: Settings) -> Iterator[Settings]:
    """mongoengine connected to this test's own database, dropped afterwards."""
    from services.kernel import mongo as kernel_mongo

    client = kernel_mongo.connect(settings)
    try:
        yield settings
    finally:
        kernel_mongo.drop_databases(client, settings)
        kernel_mongo.disconnect()
