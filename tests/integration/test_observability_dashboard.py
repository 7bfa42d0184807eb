"""The local tracing dashboard as `make dashboard-up` / `dashboard-down` run it (infra.stack)."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from infra import stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed"),
]


def test_dashboard_up_twice_is_harmless_and_down_stops(tmp_path: Path) -> None:
    stack_dir = tmp_path / "stack"
    port = stack.free_port()
    try:
        first = stack.dashboard_up(stack_dir, port)
        assert first["state"] == "started" and first["url"] == f"http://127.0.0.1:{port}"
        assert first["spans_endpoint"] == f"http://127.0.0.1:{port}/api/v2/spans"
        second = stack.dashboard_up(stack_dir, port)
        assert second["state"] == "already running" and second["pid"] == first["pid"]
        assert stack.dashboard_status(stack_dir)["ready"]
        # It collects what OpenTelemetry's Zipkin exporter sends and serves its UI.
        with urllib.request.urlopen(f"{first['url']}/api/v2/services", timeout=10) as reply:
            assert json.loads(reply.read()) == []
        with urllib.request.urlopen(f"{first['url']}/zipkin/", timeout=10) as page:
            assert b"zipkin" in page.read().lower()
        assert not stack.port_is_free(port)
    finally:
        stopped = stack.dashboard_down(stack_dir)
    assert stopped == "stopped"
    assert stack.dashboard_status(stack_dir)["state"] == "stopped"
    assert stack.dashboard_down(stack_dir) == "not running"
    assert stack.port_is_free(port)


def test_a_taken_dashboard_port_is_reported(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(stack.StackError, match=rf"port {taken} \(Zipkin\).*ZIPKIN_PORT"):
            stack.dashboard_up(tmp_path / "stack", taken)
