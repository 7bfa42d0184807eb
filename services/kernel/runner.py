"""Starts and stops service processes (gRPC servers, Faust workers) for `make run` and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ServiceProcess:
    def __init__(self, module: str, env: Mapping[str, str], log_path: Path) -> None:
        self.module = module
        self._env = {**os.environ, **env}
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", self.module], env=self._env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def check_alive(self) -> None:
        if not self.running():
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"{self.module} exited; last lines of {self.log_path}:\n{tail}")

    def wait_healthy(self, target: str, timeout_s: float = 30.0) -> None:
        """Wait until the gRPC server answers the standard health check with SERVING."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self.check_alive()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.module} not healthy on {target} after {timeout_s}s; see {self.log_path}")
                time.sleep(0.2)

    def wait_log(self, marker: str, timeout_s: float = 60.0, offset: int = 0) -> None:
        """Wait until the process logs `marker` after byte `offset` of its log
        (a Faust worker logs "[^Worker]: Ready")."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.log_path.read_bytes()[offset:].decode(errors="replace"):
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.module} did not log {marker!r} within {timeout_s}s; see {self.log_path}")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(sig)
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
