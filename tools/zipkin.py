"""Reading traces back from Zipkin's own HTTP API, and photographing them in its UI.

Used by `make trace-screenshot` and by the observability tests, so both judge a
trace by the same rules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Span = dict[str, Any]


def get_trace(base_url: str, trace_id: str, timeout_s: float = 5.0) -> list[Span]:
    """GET /api/v2/trace/{id}: the spans Zipkin has of that trace ([] if none yet)."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/api/v2/trace/{trace_id}", timeout=timeout_s) as reply:
            return list(json.loads(reply.read()))
    except urllib.error.HTTPError as error:
        if error.code == 404:  # not (yet) collected
            return []
        raise


def find_traces(base_url: str, service_name: str, limit: int = 10, timeout_s: float = 5.0) -> list[list[Span]]:
    """GET /api/v2/traces?serviceName=...: the latest traces a service took part in."""
    url = f"{base_url.rstrip('/')}/api/v2/traces?serviceName={service_name}&limit={limit}"
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return list(json.loads(reply.read()))


@dataclass
class TraceView:
    """A trace as a tree, by the names Zipkin gives (it lower-cases span names)."""

    spans: list[Span]
    by_id: dict[str, Span] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {span["id"]: span for span in self.spans}

    @property
    def services(self) -> set[str]:
        return {span.get("localEndpoint", {}).get("serviceName", "") for span in self.spans}

    def where(
        self, *, service: str = "", kind: str = "", name: str = "", tags: Mapping[str, str] | None = None
    ) -> list[Span]:
        """Spans matching all the given criteria (name is compared case-insensitively)."""
        return [
            span
            for span in self.spans
            if (not service or span.get("localEndpoint", {}).get("serviceName") == service)
            and (not kind or span.get("kind") == kind)
            and (not name or span.get("name", "").lower() == name.lower())
            and all(span.get("tags", {}).get(key) == value for key, value in (tags or {}).items())
        ]

    def parent(self, span: Span) -> Span | None:
        parent_id = span.get("parentId")
        return self.by_id.get(parent_id) if parent_id else None

    def children(self, span: Span) -> list[Span]:
        return [child for child in self.spans if child.get("parentId") == span["id"]]

    def render(self) -> str:
        """The tree as text: service, kind, name, duration."""
        lines: list[str] = []

        def walk(span: Span, depth: int) -> None:
            service = span.get("localEndpoint", {}).get("serviceName", "?")
            kind = span.get("kind", "INTERNAL")
            millis = span.get("duration", 0) / 1000
            lines.append(f"{'  ' * depth}{service}  {kind:<8} {span.get('name')}  {millis:.1f} ms")
            for child in sorted(self.children(span), key=lambda s: s.get("timestamp", 0)):
                walk(child, depth + 1)

        roots = [span for span in self.spans if self.parent(span) is None]
        for root in sorted(roots, key=lambda s: s.get("timestamp", 0)):
            walk(root, 0)
        return "\n".join(lines)


@dataclass(frozen=True)
class Hop:
    """One expected step of a journey: a span, and the step it must be a child of."""

    label: str
    service: str
    kind: str
    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    parent: str = ""  # label of the parent hop


def match_journey(view: TraceView, hops: Iterable[Hop]) -> dict[str, Span]:
    """Find each hop as a child of its parent hop; returns {label: span}, missing hops left out."""
    found: dict[str, Span] = {}
    for hop in hops:
        candidates = view.where(service=hop.service, kind=hop.kind, name=hop.name, tags=hop.tags)
        if hop.parent:
            parent = found.get(hop.parent)
            candidates = [c for c in candidates if parent is not None and c.get("parentId") == parent["id"]]
        if candidates:
            found[hop.label] = candidates[0]
    return found


def wait_for_trace(
    base_url: str, trace_id: str, complete: Callable[[TraceView], bool], timeout_s: float = 60.0
) -> tuple[TraceView, float]:
    """Poll Zipkin until `complete(trace)`; returns the trace and the seconds it took."""
    started = time.monotonic()
    view = TraceView([])
    while time.monotonic() - started < timeout_s:
        view = TraceView(get_trace(base_url, trace_id))
        if complete(view):
            return view, time.monotonic() - started
        time.sleep(0.25)
    raise TimeoutError(f"trace {trace_id} incomplete in Zipkin after {timeout_s:.0f}s; it has:\n{view.render()}")


def ui_url(base_url: str, trace_id: str) -> str:
    return f"{base_url.rstrip('/')}/zipkin/traces/{trace_id}"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no Chromium on PATH (Debian: apt-get install chromium)")


def screenshot(url: str, png: Path, *, width: int = 1400, height: int = 1200, timeout_s: float = 90.0) -> Path:
    """Headless Chromium's picture of `url` once its scripts had time to render."""
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            # The UI is a single-page app: let it fetch the trace and draw before the picture.
            "--virtual-time-budget=15000",
            f"--screenshot={png.resolve()}",
            url,
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout_s)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot to {png}")
    return png
