"""The kernel's batch runner: unknown event types are skipped with a warning, anything
else retries the whole batch, and a record's context carries its span and Faust event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1.envelope_pb2 import EventEnvelope
from faust.streams import current_event
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.agents.events import AGENT, REGISTRY
from services.kernel import faust_app
from services.kernel.envelope import Metadata, wrap
from services.kernel.faust_app import Record

META = Metadata(correlation_id="c", causation_id="k", producer="test")


def envelope(sequence: int) -> EventEnvelope:
    event = pb.AgentStateChanged(agent_id="a1", transition=pb.LOG_IN)
    return wrap(event, registry=REGISTRY, aggregate_type=AGENT, aggregate_id="a1", sequence=sequence, meta=META)


def test_unknown_types_are_skipped_and_failures_retry_the_batch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    records = [Record(envelope(1)), Record(envelope(2)), Record(envelope(3))]
    records[1].envelope.event_type = "agents.SomethingNew"
    handed: list[list[int]] = []

    async def handle(batch: Sequence[Record]) -> None:
        handed.append([r.envelope.sequence for r in batch])
        if len(handed) < 3:
            raise ConnectionError("database down")

    async def no_wait(_: float) -> None:
        pass

    monkeypatch.setattr(faust_app.asyncio, "sleep", no_wait)
    with caplog.at_level(logging.WARNING, logger=faust_app.__name__):
        asyncio.run(faust_app._handle_batch_with_retry(REGISTRY.decode, handle, records))

    assert handed == [[1, 3]] * 3  # retried whole until handled; the unknown one never reaches the handler
    assert [r.skipped for r in records] == ["", "UnknownEventType", ""]
    assert isinstance(records[0].payload, pb.AgentStateChanged)
    assert sum("unknown type agents.SomethingNew" in r.getMessage() for r in caplog.records) == 1


def test_a_records_context_is_its_span_and_its_faust_event() -> None:
    tracer = TracerProvider().get_tracer("test")
    span = tracer.start_span("process")

    class Event:  # what Faust's tables read of the current event (and weakly referenced)
        message = SimpleNamespace(partition=2)

    event: Any = Event()
    record = Record(envelope(1), span, event)
    assert current_event() is None
    with record.current():
        assert trace.get_current_span() is span
        assert current_event() is event
    assert current_event() is None and trace.get_current_span() is not span
    span.end()
