"""Settings come from environment variables, with safe local defaults."""

from __future__ import annotations

from services.kernel.config import load_settings


def test_projection_and_checkpoint_settings_come_from_the_environment() -> None:
    defaults = load_settings({})
    assert (defaults.projection_batch_s, defaults.projection_nice, defaults.routing_checkpoint_s) == (0.25, 10, 10.0)
    given = load_settings(
        {
            "CENTRALINO_PROJECTION_BATCH_S": "0.05",
            "CENTRALINO_PROJECTION_NICE": "0",
            "CENTRALINO_ROUTING_CHECKPOINT_S": "2",
        }
    )
    assert (given.projection_batch_s, given.projection_nice, given.routing_checkpoint_s) == (0.05, 0, 2.0)


def test_event_topics_keep_their_records_forever_unless_told() -> None:
    assert load_settings({}).event_retention_ms == -1
    assert load_settings({"CENTRALINO_EVENT_RETENTION_MS": "2592000000"}).event_retention_ms == 2_592_000_000
