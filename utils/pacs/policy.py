"""What DICOM results a prediction gets and where they are sent, from the settings (`BONEAGE_DICOM_*`,
`BONEAGE_AE_TITLE`, `BONEAGE_PACS_*`)."""

from __future__ import annotations

from dataclasses import dataclass

from utils.config import Settings


@dataclass(frozen=True)
class PacsDestination:
    """Where the results go and who sends them."""

    host: str
    port: int
    ae_title: str
    own_ae_title: str
    timeout_seconds: float = 10.0

    @property
    def label(self) -> str:
        """`AE@host:port`, stored with each send."""
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DicomPolicy:
    """DICOM films get an SR and an SC in their study, sent to `destination` when one is set; other films get
    them (in a new study, never sent) only with `for_all`."""

    uid_root: str
    for_all: bool = False
    destination: PacsDestination | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DicomPolicy:
        destination = None
        if settings.pacs_configured:
            destination = PacsDestination(settings.pacs_host, settings.pacs_port, settings.pacs_ae_title,
                                          settings.ae_title, settings.pacs_timeout_seconds)
        return cls(settings.dicom_uid_root, settings.dicom_for_all, destination)
