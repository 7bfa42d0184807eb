"""Local Kafka + FerretDB stack (and a Zipkin tracing dashboard) for development and tests, without Docker.

Used by the Makefile (``python -m infra.stack {install,up,down,status}``) and by
the test-suite (:func:`ephemeral_stack`).

* Kafka runs as a single KRaft node (broker + controller) from the Apache jars,
  which Maven resolves from ``infra/kafka/pom.xml`` into the cache.
* FerretDB (MongoDB wire protocol on SQLite) is built from its Go module into the
  cache.
* Zipkin, the tracing dashboard (``dashboard-up``/``dashboard-down``), runs from its
  self-contained server jar, which Maven copies from ``infra/zipkin/pom.xml`` into the
  cache.  It is optional: services run the same without it.

Only the standard library is imported at module level; kafka-python, pymongo,
docker and testcontainers are imported inside the functions that need them, so
``python -m infra.stack install`` runs on a bare interpreter.  Importing this
module has no side effects.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = [
    "FERRETDB_VERSION",
    "KAFKA_VERSION",
    "ZIPKIN_VERSION",
    "FerretNode",
    "KafkaNode",
    "StackError",
    "ZipkinNode",
    "cache_dir",
    "dashboard_down",
    "dashboard_status",
    "dashboard_up",
    "docker_available",
    "down",
    "ensure_ferretdb",
    "ensure_kafka",
    "ensure_zipkin",
    "ephemeral_dashboard",
    "ephemeral_stack",
    "free_port",
    "free_ports",
    "main",
    "port_is_free",
    "probe_kafka",
    "probe_mongo",
    "probe_zipkin",
    "status",
    "up",
]

KAFKA_VERSION = "3.9.2"
SCALA_VERSION = "2.13"
FERRETDB_VERSION = "v1.24.2"
FERRETDB_MODULE = "github.com/FerretDB/FerretDB"
# Patches applied to FerretDB's source before building it: infra/ferretdb/*.patch, in
# order. v1 is no longer maintained upstream, and its SQLite backend scanned whole tables
# for `_id` lookups and for `_id` beside other conditions; each patch says why it is safe.
FERRETDB_PATCH_DIR = Path(__file__).resolve().parent / "ferretdb"
ZIPKIN_VERSION = "3.5.1"

HOST = "127.0.0.1"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
DEFAULT_MONGO_PORT = 27017
DEFAULT_ZIPKIN_PORT = 9411

READY_TIMEOUT = 60.0  # seconds until a started service must answer
STOP_TIMEOUT = 20.0  # seconds between SIGTERM and SIGKILL
# JIT options for a broker that lives minutes (a test session): see kafka_jvm_options.
KAFKA_SHORT_LIVED_JVM = ("-XX:TieredStopAtLevel=1",)
FORMAT_TIMEOUT = 60.0  # Kafka storage format (one JVM start)
MAVEN_TIMEOUT = 20 * 60.0
GO_TIMEOUT = 30 * 60.0

_INSTALL_HINTS = {
    "java": "a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)",
    "mvn": "Apache Maven (Debian: apt-get install maven)",
    "go": "a Go toolchain >= 1.22 (https://go.dev/doc/install)",
}

# Children spawned by this interpreter, so liveness checks can reap them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """A failure of the local stack, with a message meant for a human."""


def _say(message: str) -> None:
    print(f"stack: {message}", flush=True)


# --------------------------------------------------------------------------- #
# Cache and installation
# --------------------------------------------------------------------------- #


def cache_dir() -> Path:
    """``$CENTRALINO_CACHE``, else ``$XDG_CACHE_HOME/centralino``, else ``~/.cache/centralino``."""
    explicit = os.environ.get("CENTRALINO_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "centralino"
    return Path.home() / ".cache" / "centralino"


def _require(tool: str) -> str:
    if tool == "java":
        java_home = os.environ.get("JAVA_HOME")
        if java_home:
            candidate = Path(java_home) / "bin" / "java"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(tool)
    if found is None:
        raise StackError(
            f"`{tool}` was not found on PATH; the local stack needs "
            f"{_INSTALL_HINTS.get(tool, tool)}. Install it and retry."
        )
    return found


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _run(
    cmd: Sequence[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a command to completion; return its stdout, raise StackError on failure."""
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{what} did not finish within {timeout:.0f} s") from exc
    except OSError as exc:
        raise StackError(f"{what} could not be run: {exc}") from exc
    if proc.returncode != 0:
        output = _tail((proc.stdout or "") + "\n" + (proc.stderr or ""))
        raise StackError(f"{what} failed (exit {proc.returncode}):\n{output}")
    return proc.stdout


def _publish_dir(tmp: Path, final: Path, complete: Path) -> None:
    """Atomically move a fully written directory ``tmp`` to ``final``."""
    if final.exists():
        # A leftover without the completion marker: move it aside, then drop it.
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        with suppress(OSError):
            final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        if not complete.exists():  # not a concurrent installer winning the race
            raise


def kafka_home() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}"


def ensure_kafka() -> Path:
    """Return the directory of Kafka's jars, resolving them with Maven if needed."""
    libs = kafka_home() / "libs"
    marker = libs / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar"
    if marker.is_file():
        return libs
    mvn = _require("mvn")
    pom = Path(__file__).resolve().parent / "kafka" / "pom.xml"
    if not pom.is_file():
        raise StackError(f"{pom} is missing; it lists the Kafka jars to download")
    home = kafka_home()
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=home))
    try:
        _say(f"downloading Kafka {KAFKA_VERSION} with Maven into {libs} (once) ...")
        _run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-Dkafka.version={KAFKA_VERSION}",
                f"-DoutputDirectory={tmp}",
                f"-Dmaven.repo.local={cache_dir() / 'm2'}",
            ],
            what="Maven (downloading the Kafka jars)",
            timeout=MAVEN_TIMEOUT,
        )
        if not (tmp / marker.name).is_file():
            raise StackError(f"Maven finished but {marker.name} was not downloaded into {tmp}")
        _publish_dir(tmp, libs, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return libs


def ferretdb_patches() -> list[Path]:
    return sorted(FERRETDB_PATCH_DIR.glob("*.patch"))


def ferretdb_build(patches: Sequence[Path]) -> str:
    """The version built: FerretDB's, and a digest of the patches, so a changed patch rebuilds."""
    if not patches:
        return FERRETDB_VERSION
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return f"{FERRETDB_VERSION}-{digest.hexdigest()[:8]}"


def ferretdb_path(patches: Sequence[Path] | None = None) -> Path:
    build = ferretdb_build(ferretdb_patches() if patches is None else patches)
    return cache_dir() / f"ferretdb-{build}" / "ferretdb"


def _make_writable(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o700)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o600)


def _patch_ferretdb(src: Path, patches: Sequence[Path]) -> None:
    git = _require("git")
    for patch in patches:
        # `git apply` outside a repository is a strict `patch`: all of it applies, or nothing.
        _run([git, "apply", "-p1", str(patch)], what=f"git apply {patch.name} (FerretDB)", timeout=60, cwd=src)


def ensure_ferretdb(patches: Sequence[Path] | None = None) -> Path:
    """Return the FerretDB binary, building it from its Go module if needed, with our
    patches (or those given: `()` builds FerretDB as released, for comparisons)."""
    patches = ferretdb_patches() if patches is None else patches
    binary = ferretdb_path(patches)
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    go = _require("go")
    home = binary.parent
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=home))
    try:
        _say(f"building FerretDB {ferretdb_build(patches)} into {binary} (once, about a minute) ...")
        env = dict(os.environ, GOWORK="off", GOFLAGS="")
        out = _run(
            [go, "mod", "download", "-json", f"{FERRETDB_MODULE}@{FERRETDB_VERSION}"],
            what="go mod download (FerretDB source)",
            timeout=GO_TIMEOUT,
            cwd=work,
            env=env,
        )
        try:
            info = json.loads(out)
        except ValueError as exc:
            raise StackError(f"unexpected output from go mod download: {out[:500]}") from exc
        if info.get("Error") or not info.get("Dir"):
            raise StackError(f"go mod download failed: {info.get('Error') or 'no Dir in its output'}")
        src = work / "src"
        shutil.copytree(info["Dir"], src, symlinks=True)
        _make_writable(src)
        _patch_ferretdb(src, patches)
        version_file = src / "build" / "version" / "version.txt"
        version_file.parent.mkdir(parents=True, exist_ok=True)
        version_file.write_text(FERRETDB_VERSION)
        built = work / "ferretdb"
        _run(
            [go, "build", "-trimpath", "-o", str(built), "./cmd/ferretdb"],
            what="go build (FerretDB)",
            timeout=GO_TIMEOUT,
            cwd=src,
            env=dict(env, GOFLAGS="-mod=mod", CGO_ENABLED="0"),
        )
        os.replace(built, binary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return binary


def zipkin_jar() -> Path:
    return cache_dir() / f"zipkin-{ZIPKIN_VERSION}" / f"zipkin-server-{ZIPKIN_VERSION}-exec.jar"


def ensure_zipkin() -> Path:
    """Return Zipkin's self-contained server jar (UI included), copying it with Maven if needed."""
    jar = zipkin_jar()
    if jar.is_file():
        return jar
    mvn = _require("mvn")
    pom = Path(__file__).resolve().parent / "zipkin" / "pom.xml"
    if not pom.is_file():
        raise StackError(f"{pom} is missing; it names the Zipkin server jar to download")
    jar.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".jar-", dir=jar.parent))
    try:
        _say(f"downloading Zipkin {ZIPKIN_VERSION} with Maven into {jar.parent} (once) ...")
        _run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy",
                f"-Dzipkin.version={ZIPKIN_VERSION}",
                f"-Doutput.directory={tmp}",
                f"-Dmaven.repo.local={cache_dir() / 'm2'}",
            ],
            what="Maven (downloading the Zipkin server jar)",
            timeout=MAVEN_TIMEOUT,
        )
        downloaded = tmp / jar.name
        if not downloaded.is_file():
            raise StackError(f"Maven finished but {jar.name} was not downloaded into {tmp}")
        os.replace(downloaded, jar)  # atomic: a concurrent installer sees a whole jar or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return jar


# --------------------------------------------------------------------------- #
# Ports and processes
# --------------------------------------------------------------------------- #


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free right now."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def port_is_free(port: int, host: str = HOST) -> bool:
    """True if a server could bind ``host:port`` now (as Java and Go servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    try:  # reap it if it is an exited child of ours that we lost track of
        reaped, _status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> str | None:
    """The command line of ``pid``, or None where /proc is not available."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return "" if Path("/proc/self/cmdline").exists() else None
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.1)
    return not _pid_alive(pid)


@contextmanager
def _quiet_kafka_logs() -> Iterator[None]:
    """Silence kafka-python's connection errors while a broker is booting."""
    names = ("kafka", "kafka.conn", "kafka.client_async", "kafka.admin.client", "kafka.cluster")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_address(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    if "://" in first:
        first = first.split("://", 1)[1]
    host, _, port = first.rpartition(":")
    try:
        return host.strip("[]") or HOST, int(port)
    except ValueError as exc:
        raise StackError(f"cannot parse Kafka bootstrap address {bootstrap!r}") from exc


def probe_kafka(bootstrap: str, timeout: float = 5.0) -> dict[str, Any]:
    """One real metadata round trip to Kafka; return describe_cluster() or raise."""
    host, port = _first_address(bootstrap)
    with socket.create_connection((host, port), timeout=min(timeout, 2.0)):
        pass
    from kafka.admin import KafkaAdminClient

    ms = max(int(timeout * 1000), 1000)
    with _quiet_kafka_logs():
        client = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="centralino-stack-probe",
            request_timeout_ms=ms,
            api_version_auto_timeout_ms=min(ms, 5000),
            reconnect_backoff_max_ms=1000,
        )
        try:
            info = client.describe_cluster()
        finally:
            client.close()
    if not info.get("brokers"):
        raise StackError(f"Kafka at {bootstrap} answered but lists no brokers yet")
    return info


def probe_mongo(url: str, timeout: float = 5.0) -> None:
    """``ping`` a MongoDB-compatible server, or raise."""
    from pymongo import MongoClient

    ms = max(int(timeout * 1000), 500)
    client: Any = MongoClient(url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms)
    try:
        client.admin.command("ping")
    finally:
        client.close()


def probe_zipkin(url: str, timeout: float = 5.0) -> None:
    """Zipkin's own health check must say UP, or raise."""
    import urllib.request

    with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
        health = json.loads(response.read())
    if health.get("status") != "UP":
        raise StackError(f"Zipkin at {url} reports {health.get('status')!r}")


def _wait_for(probe: Any, address: str, label: str, timeout: float, alive: Any = None, log_tail: Any = None) -> None:
    """Retry ``probe(address, t)`` until it succeeds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        if alive is not None and not alive():
            tail = log_tail() if log_tail is not None else ""
            raise StackError(f"{label} exited while starting. Last lines of its log:\n{tail}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            probe(address, max(min(remaining, 5.0), 0.5))
            return
        except Exception as exc:  # any failure means "not ready yet"
            last = exc
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    message = f"{label} at {address} was not ready within {timeout:.0f} s (last error: {last!r})"
    if log_tail is not None:
        message += f". Last lines of its log:\n{log_tail()}"
    raise StackError(message)


class _Node:
    """A server process owned by a data directory (pidfile, log, state)."""

    name = "node"
    label = "Node"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()

    # -- files -------------------------------------------------------------
    @property
    def pidfile(self) -> Path:
        return self.data_dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    @property
    def statefile(self) -> Path:
        return self.data_dir / f"{self.name}.json"

    # -- to be provided by subclasses ---------------------------------------
    def ports(self) -> dict[str, tuple[int, str]]:
        """{description: (port, env var that overrides it)}"""
        raise NotImplementedError

    @property
    def address(self) -> str:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def install(self) -> None:
        """Make sure the program is installed (download/build once into the cache)."""

    def _prepare(self) -> None:
        """Install and configure before the process is spawned."""
        self.install()

    def _probe(self, address: str, timeout: float) -> None:
        raise NotImplementedError

    def _signature(self) -> str:
        """A string the command line of our process contains."""
        raise NotImplementedError

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        """Adopt the ports recorded by the process that is running."""

    # -- process handling ----------------------------------------------------
    def read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def pid(self) -> int | None:
        """The pid of our live process from the pidfile, else None."""
        pid = self.read_pid()
        if pid is None or not _pid_alive(pid):
            return None
        if pid in _CHILDREN:  # spawned by us; may not have exec'd yet
            return pid
        cmdline = _cmdline(pid)
        if cmdline is not None and self._signature() not in cmdline:
            return None  # the pid was reused by an unrelated process
        return pid

    def is_running(self) -> bool:
        return self.pid is not None

    def read_state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.statefile.read_text()))
        except (OSError, ValueError, TypeError):
            return {}

    def adopt_running(self) -> None:
        """Take the ports of the running process (it may differ from the requested ones)."""
        self._apply_state(self.read_state())

    def check_ports(self) -> None:
        if self.is_running():
            return
        for what, (port, env_var) in self.ports().items():
            if not port_is_free(port):
                raise StackError(
                    f"port {port} ({what}) on {HOST} is taken by another process; stop it or set {env_var}"
                )

    def _clear_files(self) -> None:
        for path in (self.pidfile, self.statefile):
            with suppress(FileNotFoundError):
                path.unlink()

    def start(self) -> int:
        """Spawn the server unless ours is already running; return its pid."""
        pid = self.pid
        if pid is not None:
            self.adopt_running()
            return pid
        self._clear_files()
        self.check_ports()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        if self.logfile.exists():
            os.replace(self.logfile, self.logfile.with_name(self.logfile.name + ".1"))
        with open(self.logfile, "ab") as log:
            try:
                proc = subprocess.Popen(
                    self._command(),
                    cwd=self.data_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StackError(f"could not start {self.label}: {exc}") from exc
        _CHILDREN[proc.pid] = proc
        self.pidfile.write_text(f"{proc.pid}\n")
        state = {"pid": proc.pid, "address": self.address, "log": str(self.logfile)}
        state["ports"] = {what: port for what, (port, _env) in self.ports().items()}
        self.statefile.write_text(json.dumps(state, indent=2) + "\n")
        return proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return _tail(self.logfile.read_text(errors="replace"), lines)
        except OSError:
            return f"(no log at {self.logfile})"

    def ready(self, timeout: float = 3.0) -> bool:
        try:
            self._probe(self.address, timeout)
        except Exception:
            return False
        return True

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the server answers; raise StackError if it died or timed out."""
        pid = self.pid
        if pid is None:
            raise StackError(
                f"{self.label} is not running (did it exit?). "
                f"Last lines of its log ({self.logfile}):\n{self.log_tail()}"
            )
        _wait_for(
            self._probe,
            self.address,
            self.label,
            timeout,
            alive=lambda: _pid_alive(pid),
            log_tail=self.log_tail,
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM the process group, SIGKILL after ``timeout``; True if it was running."""
        pid = self.pid
        if pid is None:
            self._clear_files()
            return False
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            group = None

        def send(sig: signal.Signals) -> None:
            try:
                if group == pid:
                    os.killpg(group, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass

        send(signal.SIGTERM)
        if not _wait_exit(pid, timeout):
            _say(f"{self.label} (pid {pid}) ignored SIGTERM for {timeout:.0f} s; killing it")
            send(signal.SIGKILL)
            if not _wait_exit(pid, 5.0):
                raise StackError(f"{self.label} (pid {pid}) survived SIGKILL")
        _CHILDREN.pop(pid, None)
        self._clear_files()
        return True


def _kafka_cluster_id() -> str:
    """16 random bytes, base64url without padding (like Kafka's Uuid.randomUuid).

    An id starting with '-' would be read as an option by kafka-storage, so,
    like Kafka itself, draw again in that case.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaNode(_Node):
    """A single-node KRaft Kafka (broker + controller) on 127.0.0.1."""

    name = "kafka"
    label = "Kafka"

    def __init__(
        self,
        data_dir: Path,
        port: int = DEFAULT_KAFKA_PORT,
        controller_port: int = DEFAULT_CONTROLLER_PORT,
        *,
        heap: str = "512m",
        short_lived: bool = False,
    ) -> None:
        super().__init__(data_dir)
        self.port = int(port)
        self.controller_port = int(controller_port)
        self.heap = heap
        self.short_lived = short_lived  # JIT options: see kafka_jvm_options
        self._libs: Path | None = None
        self._java: str | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def address(self) -> str:
        return self.bootstrap

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dirs(self) -> Path:
        return self.data_dir / "data"

    def ports(self) -> dict[str, tuple[int, str]]:
        return {
            "Kafka": (self.port, "KAFKA_PORT"),
            "Kafka controller": (self.controller_port, "KAFKA_CONTROLLER_PORT"),
        }

    def _signature(self) -> str:
        return str(self.properties_file)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        ports = state.get("ports") or {}
        self.port = int(ports.get("Kafka", self.port))
        self.controller_port = int(ports.get("Kafka controller", self.controller_port))

    def server_properties(self) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        return "".join(f"{key}={value}\n" for key, value in props.items())

    def install(self) -> None:
        self._java = _require("java")
        self._libs = ensure_kafka()

    def _prepare(self) -> None:
        self.install()
        self.properties_file.write_text(self.server_properties())
        self.log_dirs.mkdir(parents=True, exist_ok=True)
        if (self.log_dirs / "meta.properties").exists():
            return
        cluster_id = _kafka_cluster_id()
        assert self._java is not None
        _run(
            [
                self._java,
                "-Xmx256m",
                "-cp",
                f"{self._libs}/*",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self.properties_file),
                "--ignore-formatted",
            ],
            what="Kafka storage format",
            timeout=FORMAT_TIMEOUT,
            cwd=self.data_dir,
        )

    def _command(self) -> list[str]:
        assert self._java is not None and self._libs is not None
        return [
            self._java,
            f"-Xmx{self.heap}",
            "-Djava.awt.headless=true",
            *kafka_jvm_options(self.short_lived),
            "-cp",
            f"{self._libs}/*",
            "kafka.Kafka",
            str(self.properties_file),
        ]

    def _probe(self, address: str, timeout: float) -> None:
        probe_kafka(address, timeout)


def kafka_jvm_options(short_lived: bool) -> list[str]:
    """The broker's JIT and GC options: `KAFKA_JVM_PERFORMANCE_OPTS` (as Kafka's own start
    scripts name it) if set, else the JVM's defaults, or for a broker that lives minutes
    (a test session's) the JIT's first tier only (C1).  On 2 cores shared with the
    services, C2 compiles the broker for minutes after each start at about a quarter of a
    core, and pays that back only later: after 4 minutes of warm-up the broker took 16% of
    a core at 25-40 interactions/s with C2 against 25-27% with C1, while a 3-minute test
    session runs 8% faster with C1 (`make bench`, `make test`, side by side)."""
    raw = os.environ.get("KAFKA_JVM_PERFORMANCE_OPTS")
    if raw is not None:
        return raw.split()
    return list(KAFKA_SHORT_LIVED_JVM) if short_lived else []


class FerretNode(_Node):
    """FerretDB (MongoDB wire protocol) on SQLite, on 127.0.0.1."""

    name = "ferretdb"
    label = "FerretDB"

    def __init__(self, data_dir: Path, port: int = DEFAULT_MONGO_PORT, patches: Sequence[Path] | None = None) -> None:
        super().__init__(data_dir)
        self.port = int(port)
        self.patches = patches  # None: ours (infra/ferretdb); () as released
        self._binary: Path | None = None

    @property
    def url(self) -> str:
        return f"mongodb://{HOST}:{self.port}/"

    @property
    def address(self) -> str:
        return self.url

    @property
    def db_dir(self) -> Path:
        return self.data_dir / "data"

    def ports(self) -> dict[str, tuple[int, str]]:
        return {"FerretDB": (self.port, "MONGO_PORT")}

    def _signature(self) -> str:
        return f"--state-dir={self.db_dir}"

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        ports = state.get("ports") or {}
        self.port = int(ports.get("FerretDB", self.port))

    def install(self) -> None:
        self._binary = ensure_ferretdb(self.patches)

    def _prepare(self) -> None:
        self.install()
        self.db_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        assert self._binary is not None
        return [
            str(self._binary),
            "--handler=sqlite",
            f"--sqlite-url=file:{self.db_dir}/",
            f"--listen-addr={HOST}:{self.port}",
            f"--state-dir={self.db_dir}",
            "--debug-addr=-",
            "--telemetry=disable",
            "--log-level=warn",
        ]

    def _probe(self, address: str, timeout: float) -> None:
        probe_mongo(address, timeout)


class ZipkinNode(_Node):
    """Zipkin (API, collector and UI on one port) with in-memory storage, on 127.0.0.1.

    Traces live as long as the process: it is a developer's dashboard, not a
    trace store.  The span limit keeps its heap bounded.
    """

    name = "zipkin"
    label = "Zipkin"

    def __init__(self, data_dir: Path, port: int = DEFAULT_ZIPKIN_PORT, *, heap: str = "384m") -> None:
        super().__init__(data_dir)
        self.port = int(port)
        self.heap = heap
        self._java: str | None = None
        self._jar: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        return self.url

    @property
    def spans_endpoint(self) -> str:
        """Where OTEL_EXPORTER_ZIPKIN_ENDPOINT must point."""
        return f"{self.url}/api/v2/spans"

    def ports(self) -> dict[str, tuple[int, str]]:
        return {"Zipkin": (self.port, "ZIPKIN_PORT")}

    def _signature(self) -> str:
        return f"-Dcentralino.node={self.data_dir}"

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        ports = state.get("ports") or {}
        self.port = int(ports.get("Zipkin", self.port))

    def install(self) -> None:
        self._java = _require("java")
        self._jar = ensure_zipkin()

    def _command(self) -> list[str]:
        assert self._java is not None and self._jar is not None
        return [
            self._java,
            f"-Xmx{self.heap}",
            # A dashboard needs no peak JIT; C1 only roughly halves the start-up time.
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            self._signature(),
            "-jar",
            str(self._jar),
            # One listener, on loopback only (Zipkin's default is every interface).
            f"--armeria.ports[0].port={self.port}",
            f"--armeria.ports[0].ip={HOST}",
            "--armeria.ports[0].protocols[0]=http",
            "--zipkin.storage.type=mem",
            "--zipkin.storage.mem.max-spans=200000",
            "--zipkin.collector.grpc.enabled=false",
        ]

    def _probe(self, address: str, timeout: float) -> None:
        probe_zipkin(address, timeout)


# --------------------------------------------------------------------------- #
# up / down / status
# --------------------------------------------------------------------------- #


def _nodes(
    stack_dir: Path,
    kafka_port: int = DEFAULT_KAFKA_PORT,
    controller_port: int = DEFAULT_CONTROLLER_PORT,
    mongo_port: int = DEFAULT_MONGO_PORT,
) -> tuple[KafkaNode, FerretNode]:
    stack_dir = Path(stack_dir).expanduser().resolve()
    return (
        KafkaNode(stack_dir / "kafka", kafka_port, controller_port),
        FerretNode(stack_dir / "ferretdb", mongo_port),
    )


def _external(explicit: str | None, env_var: str) -> str:
    if explicit is not None:
        return explicit
    return os.environ.get(env_var, "").strip()


def up(
    stack_dir: Path,
    kafka_port: int = DEFAULT_KAFKA_PORT,
    controller_port: int = DEFAULT_CONTROLLER_PORT,
    mongo_port: int = DEFAULT_MONGO_PORT,
    *,
    timeout: float = READY_TIMEOUT,
    kafka_bootstrap: str | None = None,
    mongo_url: str | None = None,
) -> dict[str, Any]:
    """Start Kafka and FerretDB in ``stack_dir`` (if not running) and wait until they answer.

    ``kafka_bootstrap`` / ``mongo_url`` name external services to use instead of
    starting ours; ``None`` means "read $KAFKA_BOOTSTRAP / $MONGO_URL", ``""``
    means "start ours regardless of the environment".  If startup fails, what
    this call started is stopped again.  Returns::

        {"kafka_bootstrap": "127.0.0.1:9092", "mongo_url": "mongodb://127.0.0.1:27017/",
         "kafka": {"state": "started" | "already running" | "external", "pid": ..., "log": ...},
         "ferretdb": {...}}
    """
    kafka, ferret = _nodes(stack_dir, kafka_port, controller_port, mongo_port)
    externals = {
        "kafka": _external(kafka_bootstrap, "KAFKA_BOOTSTRAP"),
        "ferretdb": _external(mongo_url, "MONGO_URL"),
    }
    plan: list[tuple[str, _Node, str]] = [
        ("kafka", kafka, externals["kafka"]),
        ("ferretdb", ferret, externals["ferretdb"]),
    ]

    # 1. Validate before starting anything.
    to_start: list[_Node] = []
    for _key, node, external in plan:
        if external:
            continue
        if node.is_running():
            node.adopt_running()
        else:
            node.check_ports()
            to_start.append(node)
    wanted = [port for node in to_start for port, _env in node.ports().values()]
    if len(wanted) != len(set(wanted)):
        raise StackError(f"the stack's ports must differ from each other, got {wanted}")
    for node in to_start:  # downloads/builds once, before anything is started
        node.install()

    result: dict[str, Any] = {"stack_dir": str(Path(stack_dir).expanduser().resolve())}
    started: list[_Node] = []
    try:
        # 2. Start what is not running (installs on first use).
        for node in to_start:
            pid = node.start()
            started.append(node)
            _say(f"{node.label} starting (pid {pid}), log: {node.logfile}")
        # 3. Wait until everything answers.
        deadline = time.monotonic() + timeout
        for key, node, external in plan:
            remaining = max(deadline - time.monotonic(), 1.0)
            if external:
                kind = "Kafka" if key == "kafka" else "MongoDB"
                _say(f"using external {kind} at {external} (not starting {node.label})")
                probe = probe_kafka if key == "kafka" else probe_mongo
                _wait_for(probe, external, f"external {kind}", remaining)
                result[key] = {"state": "external", "address": external}
                address = external
            else:
                node.wait_ready(remaining)
                state = "started" if node in started else "already running"
                result[key] = {
                    "state": state,
                    "pid": node.pid,
                    "address": node.address,
                    "log": str(node.logfile),
                }
                address = node.address
                _say(
                    f"{node.label} {'ready' if state == 'started' else state} at {address} "
                    f"(pid {node.pid}), log: {node.logfile}"
                )
            result["kafka_bootstrap" if key == "kafka" else "mongo_url"] = address
    except BaseException:
        for node in reversed(started):
            with suppress(Exception):  # the original error matters more
                node.stop()
        raise
    return result


def down(stack_dir: Path) -> dict[str, str]:
    """Stop the Kafka and FerretDB that ``up`` started in ``stack_dir``."""
    kafka, ferret = _nodes(stack_dir)
    result: dict[str, str] = {}
    for key, node in (("ferretdb", ferret), ("kafka", kafka)):
        pid = node.pid
        if node.stop():
            _say(f"{node.label} stopped (pid {pid})")
            result[key] = "stopped"
        else:
            _say(f"{node.label} was not running")
            result[key] = "not running"
    return result


def status(stack_dir: Path) -> dict[str, dict[str, Any]]:
    """Report each service: state (running/stopped/external), pid, address, ready, log."""
    kafka, ferret = _nodes(stack_dir)
    result: dict[str, dict[str, Any]] = {}
    for key, node, env_var in (("kafka", kafka, "KAFKA_BOOTSTRAP"), ("ferretdb", ferret, "MONGO_URL")):
        info: dict[str, Any] = {"log": str(node.logfile)}
        external = os.environ.get(env_var, "").strip()
        pid = node.pid
        if pid is not None:
            node.adopt_running()
            info.update(state="running", pid=pid, address=node.address, ready=node.ready())
        elif external:
            probe = probe_kafka if key == "kafka" else probe_mongo
            try:
                probe(external, 3.0)
                ready = True
            except Exception:
                ready = False
            info.update(state="external", pid=None, address=external, ready=ready)
        else:
            info.update(state="stopped", pid=None, address=None, ready=False)
        result[key] = info
    return result


def dashboard_up(stack_dir: Path, port: int = DEFAULT_ZIPKIN_PORT, *, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Start Zipkin in ``stack_dir`` (if not running) and wait until it answers.

    Returns ``{"state": "started" | "already running", "pid", "url", "spans_endpoint", "log"}``.
    """
    node = ZipkinNode(Path(stack_dir).expanduser().resolve() / "zipkin", port)
    if node.is_running():
        node.adopt_running()
        state = "already running"
    else:
        node.check_ports()
        node.install()
        pid = node.start()
        _say(f"{node.label} starting (pid {pid}), log: {node.logfile}")
        state = "started"
    try:
        node.wait_ready(timeout)
    except BaseException:
        if state == "started":
            with suppress(Exception):
                node.stop()
        raise
    _say(f"{node.label} {'ready' if state == 'started' else state} at {node.url} (pid {node.pid})")
    return {
        "state": state,
        "pid": node.pid,
        "url": node.url,
        "spans_endpoint": node.spans_endpoint,
        "log": str(node.logfile),
    }


def dashboard_down(stack_dir: Path) -> str:
    """Stop the Zipkin ``dashboard_up`` started in ``stack_dir``: "stopped" or "not running"."""
    node = ZipkinNode(Path(stack_dir).expanduser().resolve() / "zipkin")
    pid = node.pid
    if node.stop():
        _say(f"{node.label} stopped (pid {pid})")
        return "stopped"
    return "not running"


def dashboard_status(stack_dir: Path) -> dict[str, Any]:
    node = ZipkinNode(Path(stack_dir).expanduser().resolve() / "zipkin")
    info: dict[str, Any] = {"log": str(node.logfile)}
    pid = node.pid
    if pid is None:
        info.update(state="stopped", pid=None, address=None, ready=False)
    else:
        node.adopt_running()
        info.update(state="running", pid=pid, address=node.url, ready=node.ready())
    return info


# --------------------------------------------------------------------------- #
# Ephemeral stack for tests
# --------------------------------------------------------------------------- #


def docker_available(timeout: float = 3.0) -> bool:
    """True if a Docker engine answers a ping (quickly; False on any problem)."""
    try:
        import docker

        client = docker.from_env(timeout=int(max(timeout, 1)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextmanager
def _docker_stack() -> Iterator[dict[str, str]]:
    try:
        from testcontainers.community.kafka import KafkaContainer
        from testcontainers.community.mongodb import MongoDbContainer
    except ImportError:  # older testcontainers layout
        from testcontainers.kafka import KafkaContainer  # type: ignore[no-redef]
        from testcontainers.mongodb import MongoDbContainer  # type: ignore[no-redef]

    with ExitStack() as stack:
        kafka = stack.enter_context(KafkaContainer().with_kraft())
        mongo = stack.enter_context(MongoDbContainer("mongo:7.0"))
        yield {
            "kafka_bootstrap": kafka.get_bootstrap_server(),
            "mongo_url": mongo.get_connection_url(),
        }


@contextmanager
def ephemeral_stack(
    root: Path, *, timeout: float = READY_TIMEOUT, use_docker: bool | None = None, short_lived: bool = True
) -> Iterator[dict[str, str]]:
    """A throw-away Kafka + MongoDB-compatible store for a test session.

    Uses testcontainers when a Docker engine answers (``use_docker=None``), else
    a KafkaNode and a FerretNode on free ports with their data in a new directory
    under ``root``.  Both are stopped on exit, also on exceptions.  A stack that
    ``up`` started is never touched.  Yields ``{"kafka_bootstrap", "mongo_url"}``.
    ``short_lived=False`` gives the broker a long-running one's JIT (a benchmark of
    the steady state): see kafka_jvm_options.
    """
    if use_docker is None:
        use_docker = docker_available()
    if use_docker:
        with _docker_stack() as info:
            yield info
        return

    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="stack-", dir=root))
    kafka_port, controller_port, mongo_port = free_ports(3)
    kafka = KafkaNode(base / "kafka", kafka_port, controller_port, short_lived=short_lived)
    ferret = FerretNode(base / "ferretdb", mongo_port)
    nodes: tuple[_Node, ...] = (kafka, ferret)
    started: list[_Node] = []
    try:
        for node in nodes:
            node.start()
            started.append(node)
        deadline = time.monotonic() + timeout
        for node in nodes:
            node.wait_ready(max(deadline - time.monotonic(), 1.0))
        yield {"kafka_bootstrap": kafka.bootstrap, "mongo_url": ferret.url}
    finally:
        errors = []
        for started_node in reversed(started):
            try:
                started_node.stop()
            except Exception as exc:
                errors.append(exc)
        if errors and sys.exc_info()[0] is None:
            raise errors[0]


@contextmanager
def ephemeral_dashboard(root: Path, *, timeout: float = READY_TIMEOUT) -> Iterator[ZipkinNode]:
    """A throw-away Zipkin on a free port with its files in a new directory under ``root``."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    node = ZipkinNode(Path(tempfile.mkdtemp(prefix="zipkin-", dir=root)), free_port())
    node.start()
    try:
        node.wait_ready(timeout)
        yield node
    finally:
        node.stop()


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError as exc:
        raise StackError(f"{name}={raw!r} is not a port number") from exc
    if not 0 < port < 65536:
        raise StackError(f"{name}={port} is out of range")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.stack",
        description="Local Kafka + FerretDB (and the Zipkin tracing dashboard) for Centralino (no Docker needed).",
        epilog=(
            "Environment: CENTRALINO_STACK_DIR, CENTRALINO_CACHE, KAFKA_PORT, "
            "KAFKA_CONTROLLER_PORT, MONGO_PORT, ZIPKIN_PORT; KAFKA_BOOTSTRAP / MONGO_URL use "
            "external services instead of starting ours. 'status' exits 3 if "
            "Kafka or the database is not running (the dashboard is optional). "
            "'down' stops the dashboard too."
        ),
    )
    parser.add_argument(
        "command", choices=["install", "up", "down", "status", "dashboard-up", "dashboard-down", "dashboard-install"]
    )
    parser.add_argument(
        "--stack-dir",
        type=Path,
        default=None,
        help="where data, logs and pidfiles go (default: $CENTRALINO_STACK_DIR or ./.stack)",
    )
    args = parser.parse_args(argv)
    stack_dir = args.stack_dir or Path(os.environ.get("CENTRALINO_STACK_DIR") or Path.cwd() / ".stack")

    try:
        if args.command == "install":
            _require("java")
            print(f"Kafka jars: {ensure_kafka()}")
            print(f"FerretDB:   {ensure_ferretdb()}")
            print(f"Zipkin:     {ensure_zipkin()}")
        elif args.command == "dashboard-install":
            _require("java")
            print(f"Zipkin:     {ensure_zipkin()}")
        elif args.command == "dashboard-up":
            dashboard = dashboard_up(stack_dir, port=_env_port("ZIPKIN_PORT", DEFAULT_ZIPKIN_PORT))
            print(f"ZIPKIN_URL={dashboard['url']}")
            print(f"OTEL_EXPORTER_ZIPKIN_ENDPOINT={dashboard['spans_endpoint']}")
        elif args.command == "dashboard-down":
            if dashboard_down(stack_dir) == "not running":
                _say("Zipkin was not running")
        elif args.command == "up":
            info = up(
                stack_dir,
                kafka_port=_env_port("KAFKA_PORT", DEFAULT_KAFKA_PORT),
                controller_port=_env_port("KAFKA_CONTROLLER_PORT", DEFAULT_CONTROLLER_PORT),
                mongo_port=_env_port("MONGO_PORT", DEFAULT_MONGO_PORT),
            )
            print(f"KAFKA_BOOTSTRAP={info['kafka_bootstrap']}")
            print(f"MONGO_URL={info['mongo_url']}")
        elif args.command == "down":
            down(stack_dir)
            if dashboard_down(stack_dir) == "not running":
                _say("Zipkin was not running")
        else:
            report = status(stack_dir)
            for key, info in report.items():
                state = info["state"]
                if state == "stopped":
                    print(f"{key}: stopped (log: {info['log']})")
                    continue
                ready = "ready" if info["ready"] else "NOT answering"
                pid = f" pid {info['pid']}" if info.get("pid") else ""
                log = "" if state == "external" else f" (log: {info['log']})"
                print(f"{key}: {state}{pid} at {info['address']}, {ready}{log}")
            dashboard = dashboard_status(stack_dir)
            if dashboard["state"] == "running":
                ready = "ready" if dashboard["ready"] else "NOT answering"
                where = f"pid {dashboard['pid']} at {dashboard['address']}"
                print(f"zipkin: running {where}, {ready} (log: {dashboard['log']})")
            else:
                print("zipkin: stopped (optional: make dashboard-up)")
            if not all(info["ready"] for info in report.values()):
                return 3
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stack: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
