"""The platform's metric instruments, named by OpenTelemetry semantic conventions.

Where the conventions have a metric (RPC durations, messages sent and consumed,
processing duration) it is used as specified; the platform's own measures live
under `centralino.*`.  Instruments come from the global meter provider that
`setup_tracing` installs; tests pass a meter of their own.

Asynchronous instruments (consumer lag, routing queue sizes) are registered once
per process by `register_observers`; any number of sources feed them later, so a
Faust app or the routing service only has to add a callback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation

METER_NAME = "centralino"
# Seconds, as the conventions advise for durations (the SDK default buckets are for milliseconds).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# Projection lag spans broker outages and replays: seconds to hours.
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class _Instruments(Protocol):
    @classmethod
    def create(cls: type[InstrumentsT], meter: Meter) -> InstrumentsT: ...


InstrumentsT = TypeVar("InstrumentsT", bound=_Instruments)
_created: dict[tuple[type, Meter], object] = {}
_created_lock = threading.Lock()


def meter(provider: metrics.MeterProvider | None = None) -> Meter:
    return metrics.get_meter(METER_NAME, meter_provider=provider)


def instruments(kind: type[InstrumentsT], on: Meter | None = None) -> InstrumentsT:
    """The instruments of `kind` on a meter, created on first use.

    Created once: the SDK warns about (and ignores) a second instrument of the same name.
    """
    chosen = on if on is not None else meter()
    with _created_lock:
        found = _created.get((kind, chosen))
        if found is None:
            found = _created[(kind, chosen)] = kind.create(chosen)
    return found  # type: ignore[return-value]


@dataclass(frozen=True)
class RpcMetrics:
    """`rpc.server.call.duration` / `rpc.client.call.duration`: rate, errors and latency per RPC.

    The count of a histogram is the request rate; `error.type` on a data point
    marks the failed calls.
    """

    server_duration: Histogram
    client_duration: Histogram

    @classmethod
    def create(cls, meter: Meter) -> RpcMetrics:
        return cls(
            server_duration=meter.create_histogram(
                "rpc.server.call.duration",
                unit="s",
                description="Measures the duration of an incoming Remote Procedure Call (RPC).",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            ),
            client_duration=meter.create_histogram(
                "rpc.client.call.duration",
                unit="s",
                description="Measures the duration of an outgoing Remote Procedure Call (RPC).",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            ),
        )


@dataclass(frozen=True)
class PublishMetrics:
    """What the outbox relay puts on Kafka."""

    sent: Counter
    outbox_lag: Histogram

    @classmethod
    def create(cls, meter: Meter) -> PublishMetrics:
        return cls(
            sent=meter.create_counter(
                "messaging.client.sent.messages",
                unit="{message}",
                description="Number of messages producer attempted to send to the broker.",
            ),
            outbox_lag=meter.create_histogram(
                "centralino.outbox.lag",
                unit="s",
                description="Time from an event being stored to the broker acknowledging it.",
                explicit_bucket_boundaries_advisory=LAG_BUCKETS,
            ),
        )


@dataclass(frozen=True)
class ProjectionMetrics:
    """What each Faust agent consumes and how far its read model trails the events."""

    consumed: Counter
    process_duration: Histogram
    projection_lag: Histogram

    @classmethod
    def create(cls, meter: Meter) -> ProjectionMetrics:
        return cls(
            consumed=meter.create_counter(
                "messaging.client.consumed.messages",
                unit="{message}",
                description="Number of messages that were delivered to the application.",
            ),
            process_duration=meter.create_histogram(
                "messaging.process.duration",
                unit="s",
                description="Duration of processing operation.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            ),
            projection_lag=meter.create_histogram(
                "centralino.projection.lag",
                unit="s",
                description="Time from an event occurring to its read-model write.",
                explicit_bucket_boundaries_advisory=LAG_BUCKETS,
            ),
        )


class Observed:
    """The callback of one asynchronous instrument, gathering what its sources observe."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], Iterable[Observation]]] = []
        self._lock = threading.Lock()

    def add(self, source: Callable[[], Iterable[Observation]]) -> Callable[[], None]:
        """Add a source; returns the function that removes it again."""
        with self._lock:
            self._sources.append(source)

        def remove() -> None:
            with self._lock:
                if source in self._sources:
                    self._sources.remove(source)

        return remove

    def __call__(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._sources)
        observations: list[Observation] = []
        for source in sources:
            observations.extend(source())
        return observations


CONSUMER_LAG = Observed()
ROUTING_QUEUES = Observed()


def register_observers(meter: Meter) -> None:
    """Create the asynchronous instruments (once per meter provider)."""
    meter.create_observable_gauge(
        "centralino.kafka.consumer.lag",
        callbacks=[CONSUMER_LAG],
        unit="{message}",
        description="Messages in a partition not yet processed by a consumer group (high watermark - next offset).",
    )
    meter.create_observable_up_down_counter(
        "centralino.routing.queue.size",
        callbacks=[ROUTING_QUEUES],
        unit="{interaction}",
        description="Interactions waiting in a routing queue.",
    )


class ConsumerLag:
    """Lag per topic partition of one consumer group: high watermark minus the next offset to process.

    The consumer reports what it processed and, from time to time, the partitions'
    high watermarks; a partition nothing was processed from yet counts from the
    consumer's fetch position.
    """

    def __init__(self, group: str) -> None:
        self.group = group
        self.topics: set[str] = set()  # the event topics watched; Faust's own topics are left out
        self._highwater: dict[tuple[str, int], int] = {}
        self._next: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def processed(self, topic: str, partition: int, next_offset: int, highwater: int | None) -> None:
        with self._lock:
            self._next[(topic, partition)] = next_offset
            if highwater is not None:
                self._highwater[(topic, partition)] = highwater

    def refreshed(self, assigned: Mapping[tuple[str, int], tuple[int | None, int | None]]) -> None:
        """`assigned`: {(topic, partition): (high watermark, fetch position)} of the current assignment."""
        with self._lock:
            for key in set(self._highwater) - set(assigned):  # revoked: another worker reports it now
                self._highwater.pop(key, None)
                self._next.pop(key, None)
            for key, (highwater, position) in assigned.items():
                if key[0] not in self.topics:
                    continue
                if highwater is not None:
                    self._highwater[key] = highwater
                if key not in self._next and position is not None:
                    self._next[key] = position

    def lags(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return {
                key: max(highwater - self._next[key], 0)
                for key, highwater in self._highwater.items()
                if key in self._next
            }

    def observe(self) -> list[Observation]:
        return [
            Observation(
                lag,
                {
                    "messaging.system": "kafka",
                    "messaging.consumer.group.name": self.group,
                    "messaging.destination.name": topic,
                    "messaging.destination.partition.id": str(partition),
                },
            )
            for (topic, partition), lag in sorted(self.lags().items())
        ]


def observe_routing_queue_sizes(sizes: Callable[[], Mapping[str, int]]) -> Callable[[], None]:
    """For the routing service: report `sizes()` ({queue name: waiting interactions}) as
    `centralino.routing.queue.size`.  Queue names must not carry personal data.
    Returns the function that stops reporting them.
    """

    def source() -> list[Observation]:
        return [Observation(size, {"centralino.routing.queue": queue}) for queue, size in sizes().items()]

    return ROUTING_QUEUES.add(source)
