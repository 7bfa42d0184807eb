"""Integration tests of infra/stack.py: the local Kafka + FerretDB stack.

They start real processes, always on free ports (never 9092/9093/27017), with
their data under pytest's tmp_path, and stop them again.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from infra import stack

pytestmark = pytest.mark.integration

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")


@pytest.fixture
def no_external(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make up() start its own services whatever the caller's environment says."""
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("MONGO_URL", raising=False)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@needs_java
def test_up_twice_is_harmless_and_down_stops(tmp_path: Path, no_external: None) -> None:
    stack_dir = tmp_path / "stack"
    kafka_port, controller_port, mongo_port = stack.free_ports(3)
    try:
        first = stack.up(stack_dir, kafka_port, controller_port, mongo_port)
        assert first["kafka"]["state"] == "started"
        assert first["ferretdb"]["state"] == "started"
        assert first["kafka_bootstrap"] == f"127.0.0.1:{kafka_port}"
        assert first["mongo_url"] == f"mongodb://127.0.0.1:{mongo_port}/"
        assert (stack_dir / "kafka" / "kafka.pid").is_file()
        assert (stack_dir / "ferretdb" / "ferretdb.log").is_file()

        second = stack.up(stack_dir, kafka_port, controller_port, mongo_port)
        assert second["kafka"]["state"] == "already running"
        assert second["ferretdb"]["state"] == "already running"
        assert second["kafka"]["pid"] == first["kafka"]["pid"]
        assert second["ferretdb"]["pid"] == first["ferretdb"]["pid"]

        report = stack.status(stack_dir)
        assert report["kafka"]["state"] == "running" and report["kafka"]["ready"]
        assert report["ferretdb"]["state"] == "running" and report["ferretdb"]["ready"]
    finally:
        stopped = stack.down(stack_dir)

    assert stopped == {"kafka": "stopped", "ferretdb": "stopped"}
    assert _gone(first["kafka"]["pid"])
    assert _gone(first["ferretdb"]["pid"])
    assert not (stack_dir / "kafka" / "kafka.pid").exists()
    assert stack.status(stack_dir)["kafka"]["state"] == "stopped"
    assert stack.down(stack_dir) == {"kafka": "not running", "ferretdb": "not running"}


def test_taken_port_is_reported(tmp_path: Path, no_external: None) -> None:
    stack_dir = tmp_path / "stack"
    kafka_port, controller_port = stack.free_ports(2)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        try:
            with pytest.raises(stack.StackError, match=rf"port {taken} \(FerretDB\).*MONGO_PORT"):
                stack.up(stack_dir, kafka_port, controller_port, taken)
            with pytest.raises(stack.StackError, match=rf"port {taken} \(Kafka\).*KAFKA_PORT"):
                stack.up(stack_dir, taken, controller_port, stack.free_port())
        finally:
            stack.down(stack_dir)
    # The check comes before anything is started.
    assert not (stack_dir / "kafka" / "kafka.pid").exists()


def test_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CENTRALINO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert stack.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CENTRALINO_CACHE")
    assert stack.cache_dir() == tmp_path / "xdg" / "centralino"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert stack.cache_dir() == Path.home() / ".cache" / "centralino"


def _java_commands_under(root: Path) -> list[list[bytes]]:
    """The command lines of the running JVMs whose arguments name a path under `root`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"java") and any(str(root).encode() in arg for arg in argv):
            found.append(argv)
    return found


@needs_java
def test_ephemeral_stack_without_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_JVM_PERFORMANCE_OPTS", raising=False)
    with stack.ephemeral_stack(tmp_path, use_docker=False) as info:
        stack.probe_kafka(info["kafka_bootstrap"])
        stack.probe_mongo(info["mongo_url"])
        host, port = info["kafka_bootstrap"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) not in (9092, 9093)
        brokers = [argv for argv in _java_commands_under(tmp_path) if b"kafka.Kafka" in argv]
        assert len(brokers) == 1 and b"-XX:TieredStopAtLevel=1" in brokers[0]  # a test session's: C1 only
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()


def test_ferretdb_patches_refuse_a_source_they_do_not_fit(tmp_path: Path) -> None:
    """A FerretDB bump whose source moved must fail the build, not build it unpatched."""
    target = tmp_path / "internal" / "backends" / "sqlite" / "metadata" / "metadata.go"
    target.parent.mkdir(parents=True)
    target.write_text("package metadata\n")

    with pytest.raises(stack.StackError, match="0001-"):
        stack._patch_ferretdb(tmp_path, stack.ferretdb_patches())


def test_ferretdb_build_names_its_patches(tmp_path: Path) -> None:
    patch = tmp_path / "0001-x.patch"
    patch.write_text("one")
    first = stack.ferretdb_build([patch])
    patch.write_text("two")

    assert stack.ferretdb_build(()) == stack.FERRETDB_VERSION
    assert first.startswith(stack.FERRETDB_VERSION + "-") and stack.ferretdb_build([patch]) != first


def test_kafka_jit_follows_how_long_the_broker_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def command(short_lived: bool) -> list[str]:
        node = stack.KafkaNode(tmp_path / "kafka", 1, 2, short_lived=short_lived)
        node._java, node._libs = "java", tmp_path  # what install() would find
        return node._command()

    monkeypatch.delenv("KAFKA_JVM_PERFORMANCE_OPTS", raising=False)
    short = command(short_lived=True)  # a test session's: C1 only
    assert short.index("-XX:TieredStopAtLevel=1") < short.index("kafka.Kafka")
    assert not any(arg.startswith("-XX:") for arg in command(short_lived=False))  # the JVM's defaults
    monkeypatch.setenv("KAFKA_JVM_PERFORMANCE_OPTS", "-XX:+UseG1GC  -XX:MaxGCPauseMillis=20")
    for short_lived in (True, False):
        chosen = command(short_lived)
        assert "-XX:TieredStopAtLevel=1" not in chosen
        assert chosen[chosen.index("-XX:+UseG1GC") + 1] == "-XX:MaxGCPauseMillis=20"
    monkeypatch.setenv("KAFKA_JVM_PERFORMANCE_OPTS", "")  # set and empty: the JVM's defaults
    assert not any(arg.startswith("-XX:") for arg in command(short_lived=True))
