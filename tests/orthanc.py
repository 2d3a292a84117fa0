"""A real PACS for the tests: Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) on loopback.

Started with a free HTTP port, a temporary storage folder and HTTP basic auth; stopped (or
killed, to fake an outage) and started again on the same port and storage.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import requests

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).exists()), None)


def dicomweb_plugin() -> Path | None:
    for d in PLUGIN_DIRS:
        for name in ("libOrthancDicomWeb.so", "libOrthancDicomWeb.so.1"):
            if (d / name).exists():
                return d / name
    return None


class Orthanc:
    """One Orthanc process with its DICOMweb plugin at ``/dicom-web``."""

    def __init__(self, root: Path, port: int, *, user: str = "medret", password: str = "pacs-secret") -> None:
        self.root, self.port, self.user, self.password = root, port, user, password
        self.url = f"http://127.0.0.1:{port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        plugin = dicomweb_plugin()
        assert plugin is not None, "the orthanc-dicomweb plugin is not installed"
        config = {
            "Name": "medret-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {user: password},
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config))

    @property
    def auth(self) -> tuple[str, str]:
        return self.user, self.password

    def start(self, timeout_s: float = 60) -> None:
        binary = orthanc_binary()
        assert binary is not None, "Orthanc is not installed"
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([binary, str(self.config)], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """Gone at once, as a crashed server or a cut network is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def upload(self, data: bytes) -> dict[str, str] | None:
        """Store one DICOM file through Orthanc's REST API; None if Orthanc refuses it."""
        r = requests.post(f"{self.url}/instances", data=data, auth=self.auth, timeout=60)
        return r.json() if r.ok else None

    def delete(self, orthanc_id: str) -> None:
        requests.delete(f"{self.url}/instances/{orthanc_id}", auth=self.auth, timeout=30).raise_for_status()
