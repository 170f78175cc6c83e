"""A DICOM storage SCP beside the service: hand films sent by a modality or PACS go through the same pipeline.

    python -m utils.pacs.receiver            # listens on BONEAGE_SCP_HOST:BONEAGE_SCP_PORT as BONEAGE_AE_TITLE

It answers C-ECHO (the Verification service class), with which a modality or PACS tests the connection:
`echoscu -aec BONEAGE 127.0.0.1 11112`.

Each film received with C-STORE is written to an inbox folder (temporary file, fsync, rename) before the C-STORE
is answered, so an accepted film is never lost. A forwarder thread posts the inbox's films to the service's
`POST /predict` (`BONEAGE_SCP_SERVICE_URL`, with the first of `BONEAGE_API_KEYS`), as the patient of the film's
Patient ID, and deletes each once the service stored its prediction (each film with its SOP Instance UID in the
Idempotency-Key, so neither a retry after a lost answer nor an instance sent twice is stored twice); the service,
run with `BONEAGE_PACS_*`, then sends the DICOM results back. A film the service refuses (4xx: not a hand radiograph,
colour, unreadable) moves to `refused/` with the reason beside it; while the service is unreachable or busy (5xx), the
films wait and are retried.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom._globals import ALL_TRANSFER_SYNTAXES
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from storage.store import fsync_folder
from utils.config import settings_or_exit
from utils.errors import InvalidImage
from utils.imaging.checks import UploadLimits
from utils.imaging.dicom import check_film_header, check_inflated_file, read_dicom, read_header

logger = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO and DEBUG logs can quote patient data

# The image SOP classes a hand film comes as.
FILM_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)
OUT_OF_RESOURCES = 0xA700  # a C-STORE failure worth retrying: the inbox could not be written
CANNOT_UNDERSTAND = 0xC000  # a C-STORE failure: the data set cannot be read
TOO_LARGE = 0xC001  # a C-STORE failure (of the "cannot understand" range, so not retried): over the byte limit
# Answers that say the receiver is set up wrong (its API key, the service's URL), not that the film is bad: the films
# wait, as for a service that is down, instead of each being set aside.
NOT_THE_FILMS_FAULT = frozenset({401, 403, 404, 405})
# A film the service fails on (500) this many times in a row is set aside, so that it does not hold back the films
# behind it for good; 502-504 (a proxy, a restart) never set a film aside.
MAX_INTERNAL_ERRORS = 3
# pynetdicom's temporary files (what a C-STORE brings, as it arrives) go here under the inbox (`main`); one not
# written to for this long was left by a transfer that was aborted (pynetdicom aborts one idle for a minute), and is
# removed.
RECEIVING = ".receiving"
INCOMING = ".incoming-"  # a received film being copied into the inbox (fsync, then renamed to `*.dcm`)
STALE_RECEIVING_SECONDS = 600
NOT_A_PATIENT_ID_CHARACTER = re.compile(r"[^A-Za-z0-9._-]")
UNKNOWN_PATIENT = "unknown-patient"
COPY_CHUNK_BYTES = 1 << 20  # a received film is copied into the inbox a megabyte at a time
# A DICOM UID (PS3.5 9.1): dot-separated numbers without leading zeros, at most 64 characters.
DICOM_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# The header fields the service takes from a film (the patient, the sex and what gives the child's age): a resent
# instance whose demographics were corrected, under the same SOP Instance UID, is a new request.
KEY_FIELDS = ("PatientID", "PatientSex", "PatientAge", "PatientBirthDate", "StudyDate", "AcquisitionDate",
              "ContentDate")


def patient_id_of(dataset: Dataset) -> str:
    """The service's patient id for a film: its Patient ID with every character the service does not allow in an id
    replaced by `_` (64 at most, no leading dot); `unknown-patient` when it has none."""
    value = NOT_A_PATIENT_ID_CHARACTER.sub("_", str(dataset.get("PatientID", "") or "").strip()).lstrip(".")
    return value[:64] or UNKNOWN_PATIENT


def idempotency_key_of(dataset: Dataset, film: Path) -> str:
    """The `Idempotency-Key` a received film is posted with: `sop-`, its SOP Instance UID and a hash of the header
    fields the service reads (`KEY_FIELDS`); its inbox name when it has no valid UID.

    A film posted again after a lost answer (a timeout, a dropped connection), and an instance a PACS sends twice
    (a resent study, two routing rules), then get the prediction stored the first time, not a second one (nor a
    second PACS send). A corrected image carries a new SOP Instance UID, as DICOM requires, and an instance resent
    with corrected demographics a new hash: either is stored anew."""
    uid = str(dataset.get("SOPInstanceUID", "") or "").strip()
    if len(uid) > 64 or not DICOM_UID.fullmatch(uid):
        return film.name
    fields = "\\".join(str(dataset.get(keyword, "") or "").strip() for keyword in KEY_FIELDS)
    return f"sop-{uid}-{hashlib.sha256(fields.encode()).hexdigest()[:12]}"


class Inbox:
    """Received films waiting for the service (`<root>/*.dcm`), and those it refused (`<root>/refused/`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.refused_dir = root / "refused"
        self.refused_dir.mkdir(parents=True, exist_ok=True)
        self.receiving_dir = root / RECEIVING
        self.receiving_dir.mkdir(exist_ok=True)

    def sweep_receiving(self, older_than_seconds: float = STALE_RECEIVING_SECONDS) -> int:
        """Remove what aborted transfers left (`sweep_left_over`); how many. Never raises."""
        return sweep_left_over(self.root, older_than_seconds)

    def put(self, dataset: Dataset) -> Path:
        """Write a film durably; its name sorts by arrival."""
        with self._incoming() as f:
            dataset.save_as(f, enforce_file_format=True)
        return self._arrived(f.name, str(dataset.SOPInstanceUID))

    def put_file(self, source: Path, sop_instance_uid: str) -> Path:
        """Copy a received DICOM file into the inbox durably, as it came (never decoded here)."""
        with self._incoming() as f, source.open("rb") as received:
            shutil.copyfileobj(received, f, COPY_CHUNK_BYTES)
        return self._arrived(f.name, sop_instance_uid)

    @contextmanager
    def _incoming(self) -> Iterator[IO[bytes]]:
        """A temporary file in the inbox, fsynced when the block ends; removed if it fails."""
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=INCOMING, delete=False) as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                os.unlink(f.name)
                raise

    def _arrived(self, written: str, sop_instance_uid: str) -> Path:
        target = self.root / f"{time.time_ns():020d}-{NOT_A_PATIENT_ID_CHARACTER.sub('_', sop_instance_uid)}.dcm"
        os.rename(written, target)
        fsync_folder(self.root)  # the rename durable too, before the C-STORE is answered
        return target

    def waiting(self) -> list[Path]:
        """Films not yet taken by the service, oldest first."""
        return sorted(self.root.glob("*.dcm"))

    def refuse(self, film: Path, reason: str) -> None:
        """Set a film aside with the reason beside it (`FileNotFoundError` if it was removed meanwhile)."""
        self.refused_dir.mkdir(parents=True, exist_ok=True)  # removed by hand since the start: made again
        shutil.move(film, self.refused_dir / film.name)
        (self.refused_dir / f"{film.name}.reason.txt").write_text(reason + "\n")


def sweep_left_over(root: Path, older_than_seconds: float = STALE_RECEIVING_SECONDS) -> int:
    """Remove what aborted transfers left in the inbox at `root`: files in `.receiving/` not written to for
    `older_than_seconds` (pynetdicom writes each fragment as it comes and aborts an association idle for a minute),
    and `.incoming-*` copies as old (a receiver killed while it copied a film in: that C-STORE was never answered
    Success, so the sender still holds the film); how many. Never raises: a file it cannot remove is logged and left
    for the next sweep."""
    cutoff = time.time() - older_than_seconds
    removed = 0
    try:
        left_over = [*(root / RECEIVING).glob("*.dcm"), *root.glob(f"{INCOMING}*")]
    except OSError:
        logger.warning("could not list %s to sweep it", root, exc_info=True)
        return 0
    for left in left_over:
        try:
            if left.stat().st_mtime <= cutoff:
                left.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # its transfer ended meanwhile, and pynetdicom (or the rename into the inbox) removed it
        except OSError:
            logger.warning("could not remove %s, left by an aborted transfer", left.name, exc_info=True)
    return removed


def remove_patient_films(root: Path, patient_id: str, limits: UploadLimits | None = None) -> int:
    """Remove the films of a patient (as `patient_id_of` names them) from an inbox at `root`, being received,
    waiting or refused, with their reasons; how many. For an erasure (`utils.pipeline.erasure`); creates nothing, and
    a film that cannot be read is left (and logged without its name's patient data). `OSError` if a film could not
    be removed. `limits` (the receiver's) bound what is read of a film not yet checked on arrival."""
    receiving, refused = root / RECEIVING, root / "refused"
    swept = sweep_left_over(root)  # what aborted transfers left, readable or not (a copy cut short by a kill)
    # In the order films move (.receiving/, .incoming-* copies, the inbox, refused/), each listed only after the
    # one before it was: a film that moves on meanwhile (a transfer that ends; one the forwarder sets aside with the
    # service's 409 to uploads of a patient being erased) is found in the next. A copy being written cannot be read
    # yet and is left: it is in the inbox when that is listed.
    removed = sum(_remove_if_of(film, patient_id, limits or UploadLimits()) for film in sorted(receiving.glob("*.dcm")))
    removed += sum(_remove_if_of(film, patient_id) for film in sorted(root.glob(f"{INCOMING}*")))
    removed += sum(_remove_if_of(film, patient_id) for film in sorted(root.glob("*.dcm")))
    removed += sum(_remove_if_of(film, patient_id) for film in sorted(refused.glob("*.dcm")))
    for reason in refused.glob("*.dcm.reason.txt"):  # a reason whose film went (written as the film was removed)
        if not (refused / reason.name.removesuffix(".reason.txt")).exists():
            reason.unlink(missing_ok=True)
    for folder in (receiving, root, refused):
        if (removed or swept) and folder.is_dir():
            fsync_folder(folder)
    return removed


def _remove_if_of(film: Path, patient_id: str, unchecked: UploadLimits | None = None) -> bool:
    """Remove `film` if it is the patient's. A film still `unchecked` on arrival (in `.receiving/`: it may be a
    deflate bomb, or still arriving) is read only within those limits, as the upload checks would; beyond them it
    is left, to be refused when it arrives and swept."""
    try:
        header: Dataset
        if unchecked is None:
            header = read_header(film)
        elif film.stat().st_size > unchecked.max_bytes:
            return False
        else:
            header = read_dicom(film.read_bytes(), unchecked)
        belongs = patient_id_of(header) == patient_id
    except FileNotFoundError:
        return False  # posted, set aside or arrived meanwhile
    except Exception:
        logger.warning("an inbox film could not be read while erasing a patient; left in place", exc_info=True)
        return False
    if belongs:
        film.unlink(missing_ok=True)
        (film.parent / f"{film.name}.reason.txt").unlink(missing_ok=True)
    return belongs


class Forwarder:
    """Posts the inbox's films to the service, oldest first; `forward_waiting` is one round."""

    def __init__(self, inbox: Inbox, client: httpx.Client, retry_seconds: float = 10.0) -> None:
        self.inbox = inbox
        self.client = client
        self.retry_seconds = retry_seconds
        self._internal_errors: dict[str, int] = {}  # film name -> 500s in a row (MAX_INTERNAL_ERRORS)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scp-forwarder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def forward_waiting(self) -> bool:
        """Post every waiting film; False when the service could not take one now (the rest waits)."""
        for film in self.inbox.waiting():
            if self._stop.is_set():
                return True
            try:
                self._forward(film)
            except FileNotFoundError:  # removed meanwhile: by the erasure of its patient, or by hand
                logger.info("film %s left the inbox while it was being forwarded", film.name)
            except httpx.HTTPError as exc:
                logger.warning("the service is unreachable (%s); %d films wait", type(exc).__name__,
                               len(self.inbox.waiting()))
                return False
            except _ServiceBusy as exc:
                logger.warning("the service cannot take films now (%s); they wait", exc)
                return False
        return True

    def _forward(self, film: Path) -> None:
        data = film.read_bytes()  # read once: the header below is parsed from the bytes posted
        try:
            header = read_header(io.BytesIO(data))
        except Exception:  # not a DICOM data set (a file copied into the inbox by hand, a partial copy): set aside
            logger.warning("film %s is no readable DICOM data set; moved to %s", film.name, self.inbox.refused_dir)
            self.inbox.refuse(film, "not a readable DICOM data set (never sent to the service)")
            return
        response = self.client.post("/predict", files={"image": (film.name, data, "application/dicom")},
                                    data={"patient_id": patient_id_of(header)},
                                    headers={"Idempotency-Key": idempotency_key_of(header, film)})
        status = response.status_code
        if status == 200:
            film.unlink()
            self._internal_errors.pop(film.name, None)
            logger.info("film %s predicted (%s)", film.name, _detail(response, "prediction_id"))
        elif status in NOT_THE_FILMS_FAULT:
            raise _ServiceBusy(f"{status}: {_detail(response)} (check --service and the API key; films wait)")
        elif status == 500:
            failures = self._internal_errors.pop(film.name, 0) + 1
            if failures < MAX_INTERNAL_ERRORS:
                self._internal_errors[film.name] = failures
                raise _ServiceBusy(f"{status}: {_detail(response)}")
            reason = f"{status} {MAX_INTERNAL_ERRORS} times in a row: {_detail(response)}"
            logger.warning("the service failed on film %s (%s); moved to %s", film.name, reason, self.inbox.refused_dir)
            self.inbox.refuse(film, reason)
        elif 400 <= status < 500 and status not in (408, 429):
            reason = f"{status}: {_detail(response)}"
            logger.warning("the service refused film %s (%s); moved to %s", film.name, reason, self.inbox.refused_dir)
            self.inbox.refuse(film, reason)
        else:
            raise _ServiceBusy(f"{status}: {_detail(response)}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                done = self.forward_waiting()
            except Exception:  # never ends the thread: the films wait, and the receiver would go on taking more
                logger.exception("forwarding failed; retrying in %g s", self.retry_seconds)
                done = False
            if not done:
                self._wake.wait(self.retry_seconds)
            elif not self.inbox.waiting():
                self._wake.wait()


class _ServiceBusy(Exception):
    pass


def _detail(response: httpx.Response, field: str = "detail") -> str:
    """A field of the service's JSON answer, else the start of its body (a proxy's page, a JSON list)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return str(body[field]) if isinstance(body, dict) and field in body else response.text[:200]


ACSE_TIMEOUT_SECONDS = 5.0


class Receiver:
    """The storage SCP and its forwarder."""

    def __init__(self, inbox: Inbox, forwarder: Forwarder, ae_title: str,
                 limits: UploadLimits | None = None, calling_ae_titles: list[str] | None = None) -> None:
        self.inbox = inbox
        self.forwarder = forwarder
        self.ae_title = ae_title
        self.limits = limits or UploadLimits()
        self.calling_ae_titles = calling_ae_titles or []  # empty: any modality may send
        self._server: ThreadedAssociationServer | None = None
        self._chunked_before = _config.STORE_RECV_CHUNKED_DATASET

    def start(self, host: str, port: int, block: bool = False) -> None:
        # Each C-STORE's data set is written to a temporary file as it arrives (in `tempfile.tempdir`: `main` sets
        # it to the inbox's `receiving_dir`), not gathered in memory, where a film of gigabytes was held whole, and
        # decoded, before its size could be checked. The setting is pynetdicom's, for every storage SCP of this
        # process, until `stop`.
        self._chunked_before = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True
        if swept := self.inbox.sweep_receiving():
            logger.info("removed %d partly received films left by aborted transfers", swept)
        ae = AE(ae_title=self.ae_title)
        # An association must call this AE title (a modality configured for another node is refused), and come from
        # one of BONEAGE_SCP_CALLING_AE_TITLES when set (otherwise anyone who reaches the port may store films,
        # and so results in any study: firewall the port).
        ae.require_called_aet = True
        if self.calling_ae_titles:
            ae.require_calling_aet = self.calling_ae_titles
        # A modality sends its association request as soon as it connects: a connection that sends none is closed
        # after ACSE_TIMEOUT_SECONDS, not pynetdicom's 30, so a few idle ones cannot hold every slot for long.
        ae.acse_timeout = ACSE_TIMEOUT_SECONDS
        for sop_class in FILM_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        # Verification (C-ECHO): how a modality or PACS tests the connection (`echoscu`); pynetdicom answers it
        # with Success by itself, touching neither the inbox nor the service.
        ae.add_supported_context(Verification)
        self.forwarder.start()
        self.forwarder.wake()  # films left from an earlier run
        logger.info("storage SCP %s listening on %s:%d; inbox %s", self.ae_title, host, port, self.inbox.root)
        self._server = ae.start_server((host, port), block=block, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        _config.STORE_RECV_CHUNKED_DATASET = self._chunked_before  # also after a start that could not listen
        self.forwarder.stop()

    def _on_store(self, event: Any) -> int:
        # pynetdicom has written the data set to a temporary file as it arrived (STORE_RECV_CHUNKED_DATASET): it
        # is checked there and copied into the inbox, never held in memory whole.
        requestor = event.assoc.requestor.ae_title
        self.inbox.sweep_receiving()
        try:
            received = Path(event.dataset_path)
            size = received.stat().st_size  # the whole file, as the forwarder posts it and the service counts it
        except OSError:  # removed meanwhile (a sweep, an erasure): the sender may send it again
            logger.warning("a film received from %s could not be read back", requestor, exc_info=True)
            return OUT_OF_RESOURCES
        if size > self.limits.max_bytes:
            logger.warning("refused a film of %d bytes from %s: over the upload limit of %d bytes", size, requestor,
                           self.limits.max_bytes)
            return TOO_LARGE
        try:
            with received.open("rb") as f:  # pydicom inflates a whole deflated data set: capped first, as uploads are
                check_inflated_file(f, self.limits)
            # What the service would refuse on the header alone (no pixel data, colour, several frames, too large)
            # is refused here, so that the sender learns it; the film check and the decoding stay the service's.
            check_film_header(received, self.limits)
        except InvalidImage as refusal:
            logger.warning("refused a film from %s: %s", requestor, refusal)
            return CANNOT_UNDERSTAND
        except Exception:
            logger.warning("refused a film from %s: its data set cannot be read", requestor, exc_info=True)
            return CANNOT_UNDERSTAND
        try:
            self.inbox.put_file(received, str(event.request.AffectedSOPInstanceUID))
        except OSError:
            logger.exception("could not write a received film to the inbox")
            return OUT_OF_RESOURCES
        self.forwarder.wake()
        return 0x0000


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def main(argv: list[str] | None = None) -> None:
    settings = settings_or_exit("python -m utils.pacs.receiver")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=settings.scp_host)
    parser.add_argument("--port", type=_port, default=settings.scp_port)
    parser.add_argument("--service", default=settings.scp_service_url or f"http://{settings.host}:{settings.port}")
    parser.add_argument("--inbox", type=Path, default=settings.inbox_dir)
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    headers = {"X-API-Key": settings.api_key_list[0]} if settings.api_key_list else {}
    try:
        socket.getaddrinfo(args.host, args.port)
    except (socket.gaierror, UnicodeError):
        parser.error(f"--host {args.host!r} is no address or name this machine can resolve")
    try:
        inbox = Inbox(args.inbox)
    except OSError as exc:
        parser.error(f"--inbox {args.inbox} cannot be made the inbox folder ({exc.strerror or type(exc).__name__})")
    service = httpx.URL(args.service) if "://" in args.service else None
    if service is None or service.scheme not in ("http", "https") or not service.host:
        parser.error(f"--service {args.service!r} is no http(s) URL of the service (e.g. http://127.0.0.1:8000)")
    # A prediction takes well under a second; the long timeout covers a cold or heavily loaded service.
    with httpx.Client(base_url=args.service, headers=headers, timeout=120) as client:
        # pynetdicom writes what arrives to temporary files: under the inbox, on the storage volume (not a tmpfs,
        # which would hold it in memory), where the start-up sweep and an erasure find what an aborted transfer left.
        tempdir_before, tempfile.tempdir = tempfile.tempdir, str(inbox.receiving_dir)
        receiver = Receiver(inbox, Forwarder(inbox, client), settings.ae_title, UploadLimits.from_settings(settings),
                            settings.scp_calling_ae_title_list)
        try:
            receiver.start(args.host, args.port, block=True)
        except KeyboardInterrupt:
            pass
        except OSError as exc:  # the port is taken, or not ours to listen on
            parser.error(f"cannot listen on {args.host}:{args.port} ({exc.strerror or type(exc).__name__})")
        finally:
            receiver.stop()
            tempfile.tempdir = tempdir_before  # this process's other temporary files go where they went before


if __name__ == "__main__":
    main()
