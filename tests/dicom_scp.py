"""A real DICOM storage SCP for the tests (pynetdicom, loopback): records what it stores, can refuse, can go down,
can take a C-STORE and never answer it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from helpers import wait_until
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from bench.harness import reserve_port

AE_TITLE = "TESTPACS"
OUT_OF_RESOURCES = 0xA700



class StorageSCP:
    """A PACS stand-in on `port`: `start`/`stop` it; `status` is what it answers to C-STORE (0 = stored). The port
    is reserved for the SCP's whole life (`reserve_port`): while it is stopped, connections are refused and no other
    server can take the port, so a restart finds it free."""

    def __init__(self, sop_classes: tuple[str, ...] = (ComprehensiveSRStorage, SecondaryCaptureImageStorage)) -> None:
        self._reservation = reserve_port()
        self.port = int(self._reservation.getsockname()[1])
        self.sop_classes = sop_classes
        self.status = 0x0000
        self.stored: list[Dataset] = []  # accepted objects, in order
        self.refused: list[str] = []  # SOP Instance UIDs refused
        self.calling_ae_titles: list[str] = []
        # Set: a C-STORE is held without an answer until `answer` is set, then refused (the object is not kept),
        # as a PACS that hangs mid-association; its SOP Instance UID is recorded in `unanswered`.
        self.hang = threading.Event()
        self.answer = threading.Event()
        self.unanswered: list[str] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> StorageSCP:
        ae = AE(ae_title=AE_TITLE)
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def close(self) -> None:
        """Stop, and give the port back."""
        self.answer.set()  # a held C-STORE ends, so the server's threads can
        self.stop()
        self._reservation.close()

    def _on_store(self, event: Any) -> int:
        if self.hang.is_set():
            with self._lock:
                self.unanswered.append(str(event.dataset.SOPInstanceUID))
            self.answer.wait(120)
            return OUT_OF_RESOURCES  # to an association the caller has long given up on
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        with self._lock:
            self.calling_ae_titles.append(str(event.assoc.requestor.ae_title))
            if self.status != 0x0000:
                self.refused.append(str(dataset.SOPInstanceUID))
                return self.status
            self.stored.append(dataset)
        return 0x0000

    def stored_uids(self) -> list[str]:
        with self._lock:
            return [str(d.SOPInstanceUID) for d in self.stored]

    def wait_for(self, condition: Callable[[StorageSCP], bool], timeout: float = 60.0) -> None:
        wait_until(lambda: condition(self), timeout, lambda: f"the SCP did not see what was expected within {timeout} "
                   f"s: stored {self.stored_uids()}, refused {self.refused}")
