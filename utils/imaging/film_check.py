"""The film check before the models: is this upload a radiograph of a hand?

Two signals, in order: a DICOM whose Body Part Examined (0018,0015) names another part of the body is refused on
that alone; then the hand score of the small classifier of `male_boneage.film_check` (every film, DICOM or not).
`BONEAGE_FILM_CHECK=refuse` (default) refuses a failed film with 422 before anything is stored; `warn` answers it
and marks the result. Every path that scores a film (the API, Ray Serve's ingress, the DICOM receiver through the
API, the batch scorer) goes through `FilmGate.check`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from male_boneage.film_check import FilmChecker
from utils.errors import FilmRefused
from utils.imaging.upload import DecodedImage

logger = logging.getLogger(__name__)
FilmCheckMode = Literal["refuse", "warn"]
# Defined terms of Body Part Examined (DICOM PS3.16 Annex L) that show a hand, and the empty value (not given).
HAND_BODY_PARTS = frozenset({"", "HAND", "WRIST", "FINGER", "THUMB", "EXTREMITY", "UPPEREXTREMITY", "UPPER EXTREMITY",
                             "UPPER_EXTREMITY", "ARM", "HANDS", "LHAND", "RHAND", "LEFT HAND", "RIGHT HAND"})
REFUSAL_REASONS = ("body_part", "not_a_hand")
EXPECTED = "a PA film of one hand is expected"


@dataclass(frozen=True)
class FilmCheck:
    """The check's verdict on one film, as responses and reports carry it."""

    passed: bool
    score: float | None
    threshold: float
    reason: str | None
    version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_CODE_STRING = 16  # characters of a DICOM code string (CS), such as Body Part Examined


def body_part_of(image: DecodedImage) -> str | None:
    """The DICOM's Body Part Examined, upper-cased and stripped; None for other formats or a malformed value."""
    if image.dicom is None:
        return None
    try:
        return str(image.dicom.get("BodyPartExamined", "") or "").strip().upper()
    except Exception:  # a value pydicom cannot read is no body part
        return None


def _quoted(body_part: str) -> str:
    """The value as a reason quotes it: printable, and cut at the 16 characters a code string holds."""
    printable = "".join(c if c.isprintable() else "?" for c in body_part)
    return printable if len(printable) <= MAX_CODE_STRING else printable[:MAX_CODE_STRING] + "..."


class FilmGate:
    """The film check of one process: the classifier, the mode, and the refusals counted by reason."""

    def __init__(self, checker: FilmChecker, mode: FilmCheckMode = "refuse") -> None:
        self.checker = checker
        self.mode = mode
        self._observers: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    @classmethod
    def load(cls, weights: Path, mode: FilmCheckMode) -> FilmGate:
        return cls(FilmChecker.from_file(weights), mode)

    def observe_refusals(self, observer: Callable[[str], None]) -> None:
        """Call `observer(reason)` for every film the check fails (refused, or marked in `warn` mode)."""
        with self._lock:
            self._observers.append(observer)

    def check(self, image: DecodedImage) -> FilmCheck:
        """The verdict on a decoded upload; raises FilmRefused when it fails and the mode is `refuse`."""
        body_part = body_part_of(image)
        result = self.checker.check(image.gray)
        score = round(result.score, 4)
        reason_code: str | None = None
        reason: str | None = None
        if body_part is not None and body_part.replace("  ", " ") not in HAND_BODY_PARTS:
            reason_code = "body_part"
            reason = (f"the DICOM's Body Part Examined is {_quoted(body_part)}, not a hand: this service estimates "
                      f"bone age from hand radiographs only ({EXPECTED})")
        elif not result.passed:
            reason_code = "not_a_hand"
            reason = (f"this does not look like a radiograph of a hand (hand score {score:.2f} of 1, at least "
                      f"{result.threshold:.2f} needed; {EXPECTED})")
        verdict = FilmCheck(reason_code is None, score, round(result.threshold, 4), reason, self.checker.version)
        if reason_code is not None:
            with self._lock:
                observers = list(self._observers)
            for observer in observers:
                observer(reason_code)
            if self.mode == "refuse":
                raise FilmRefused(reason or "", reason_code, score)
            logger.info("film check failed (%s), answered anyway: BONEAGE_FILM_CHECK=warn", reason_code)
        return verdict
