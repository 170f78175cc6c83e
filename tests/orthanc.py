"""A real PACS for the tests: Debian's Orthanc (`apt-get install orthanc`) in a temporary folder, with a config of its
own, on free loopback ports; its REST API to look at what it stored.

Its HTTP server answers loopback clients only (RemoteAccessAllowed false). Orthanc 1.10 has no option to bind its
DICOM port to one address, so it accepts C-STORE only from the one AE title it is told of, and only from 127.0.0.1
(DicomAlwaysAllowStore false, DicomCheckModalityHost true).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
from helpers import wait_until

from bench.harness import reserve_port

AE_TITLE = "ORTHANC"
# Where Debian puts the binary (/usr/sbin is not on every user's PATH).
DEBIAN_BINARY = Path("/usr/sbin/Orthanc")


def orthanc_binary() -> str | None:
    found = shutil.which("Orthanc")
    if found:
        return found
    return str(DEBIAN_BINARY) if DEBIAN_BINARY.is_file() else None


class OrthancServer:
    """Orthanc in `folder` (its storage, index, config and log), storing what `calling_ae_title` sends from
    127.0.0.1. Use in `with`: it starts on entry (returns once its REST API answers) and stops on exit."""

    def __init__(self, binary: str, folder: Path, calling_ae_title: str, start_timeout_s: float = 60.0) -> None:
        self.binary = binary
        self.folder = folder
        self.calling_ae_title = calling_ae_title
        self.start_timeout_s = start_timeout_s
        self._reservations = [reserve_port(), reserve_port()]  # held until Orthanc listens (it sets SO_REUSEADDR)
        self.dicom_port, self.http_port = (int(r.getsockname()[1]) for r in self._reservations)
        self.log_path = folder / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.rest = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30)

    def config(self) -> dict[str, Any]:
        storage = str(self.folder / "storage")
        return {
            "Name": "boneage-tests", "StorageDirectory": storage, "IndexDirectory": storage,
            "DicomAet": AE_TITLE, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [], "SaveJobs": False,
            "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True,
            # Orthanc never calls the service back: the port is a placeholder.
            "DicomModalities": {"boneage": [self.calling_ae_title, "127.0.0.1", 104]},
        }

    def __enter__(self) -> OrthancServer:
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen([self.binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                             cwd=self.folder)
        try:
            wait_until(self._answers, self.start_timeout_s, f"Orthanc did not answer within {self.start_timeout_s} s")
        except AssertionError:
            self.__exit__()
            raise AssertionError(f"Orthanc did not start; its log:\n{self.log()}") from None
        for reservation in self._reservations:
            reservation.close()
        return self

    def _answers(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise AssertionError(f"Orthanc exited with status {self._process.returncode}")
        try:
            return self.rest.get("/system").status_code == 200
        except httpx.TransportError:
            return False

    def __exit__(self, *_exc: object) -> None:
        self.rest.close()
        for reservation in self._reservations:
            reservation.close()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str) -> Any:
        response = self.rest.get(path)
        response.raise_for_status()
        return response.json()

    def upload(self, dicom: bytes) -> str:
        """Store a DICOM file through the REST API (as a modality's film arrives); its Orthanc instance id."""
        response = self.rest.post("/instances", content=dicom, headers={"Content-Type": "application/dicom"})
        response.raise_for_status()
        instance_id: str = response.json()["ID"]
        return instance_id

    def find_studies(self, study_instance_uid: str) -> list[str]:
        """Orthanc ids of the studies with this Study Instance UID (C-FIND semantics through /tools/find)."""
        response = self.rest.post("/tools/find", json={"Level": "Study",
                                                       "Query": {"StudyInstanceUID": study_instance_uid}})
        response.raise_for_status()
        found: list[str] = response.json()
        return found
