"""All service settings in one object, read once from the environment (prefix `BONEAGE_`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import mlflow_config

PROJECT_ROOT = mlflow_config.PROJECT_ROOT
# The oldest chronological age the service accepts (from the form or a DICOM), months.
MAX_CHRONOLOGICAL_AGE_MONTHS = 240.0
# How many PACS timeouts a sender's claim on an object must outlast (Settings._pacs_all_or_nothing).
PACS_LEASE_PER_TIMEOUT = 2
# pydicom's UID root (registered for pydicom's users): the default root of the UIDs the service makes.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."


class Settings(BaseSettings):
    """Service settings; every field can be set as `BONEAGE_<NAME>` (e.g. `BONEAGE_PORT=9000`)."""

    model_config = SettingsConfigDict(env_prefix="BONEAGE_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    database_url: str = Field(
        f"sqlite:///{PROJECT_ROOT / 'boneage_predictions.db'}", description="SQLAlchemy URL of the predictions database"
    )
    database_busy_timeout: float = Field(5.0, gt=0, description="seconds to wait for a locked SQLite database")
    database_pool_size: int = Field(5, ge=1, description="PostgreSQL: connections kept open per process")
    database_max_overflow: int = Field(10, ge=0, description="PostgreSQL: extra connections allowed under load")
    database_pool_timeout: float = Field(5.0, gt=0, description="PostgreSQL: seconds to wait for a free connection")
    database_statement_timeout_ms: int = Field(10_000, gt=0, description="PostgreSQL: longest statement, ms")
    recovery_min_age_seconds: float = Field(
        600.0, ge=0, description="start-up clean-up beside other live processes, and on PostgreSQL always, only "
        "removes folders and MLflow runs of unstored predictions older than this (a process alone on a SQLite "
        "database removes them all); every live process removes such leftovers of crashed processes every half this, "
        "and refuses (503) a prediction it could not store within half this. 0: neither (only a process started "
        "alone on SQLite cleans up). Give every process on one database the same value")
    tracking_lease_seconds: float = Field(
        300.0, gt=0, description="how long a process's claim on pending MLflow runs lasts if it dies while logging")
    storage_dir: Path = Field(PROJECT_ROOT / "storage", description="uploads and heatmaps go to <dir>/patients")
    male_weights: Path = Field(PROJECT_ROOT / "male_boneage" / "weights" / "male.pt")
    female_weights: Path = Field(
        PROJECT_ROOT / "male_boneage" / "weights" / "female.pt",
        description="if missing, the male model serves both (reported as a fallback)",
    )
    film_check: Literal["refuse", "warn"] = Field(
        "refuse", description="a film that is not a hand radiograph: refuse (422, nothing stored) or warn (answer it, "
        "marked in the response, results and SR)")
    film_check_weights: Path = Field(PROJECT_ROOT / "male_boneage" / "weights" / "film_check.pt",
                                     description="the film check's classifier (python -m male_boneage.film_check)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU")
    tta_variants: int = Field(4, ge=1, le=8, description="test-time augmentation variants per model (1: off)")
    inference_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="what the models' convolutions run in: bf16 (bfloat16, as they were trained; about 1.7x "
        "as fast on a CPU with AVX-512 BF16; ages within 0.16 months of fp32's for 99% of films), fp32, or auto: bf16 "
        "where the device runs it natively (AVX-512 BF16 or AMX; a GPU of compute capability 8.0 on), else fp32")
    torch_threads: int = Field(0, ge=0, description="CPU threads per model pass (0: half the cores, at least 1, "
                                                   "since the two models run at the same time)")
    batch_max_size: int = Field(8, ge=1, description="most images per batched model pass (micro-batching)")
    batch_max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for more requests")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(50_000_000, gt=0)
    min_image_side: int = Field(64, gt=0)
    heatmap_max_side: int = Field(640, ge=64, description="longest side of the stored Grad-CAM overlays")
    mlflow_tracking_uri: str = Field(
        default_factory=mlflow_config.tracking_uri,
        description="defaults to MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db",
    )
    mlflow_experiment: str = Field(mlflow_config.EXPERIMENT_NAME)
    tracking_retry_seconds: float = Field(30.0, gt=0, description="how often runs that failed to log are retried")
    tracking_max_deferred: int = Field(64, ge=0, description="most MLflow runs held back while predictions are "
                                       "being served (logged right after; 0: log at once)")
    log_level: str = Field("INFO")
    api_keys: str = Field("", description="comma-separated API keys; when set, patient routes require one. Each has "
                          "the roles predict and read, never admin (README: Patient data)")
    api_keys_file: Path | None = Field(None, description="a file of named keys with roles, one "
                                       "`name roles sha256:<hex>` a line (python -m utils.api.auth new NAME ROLES "
                                       "prints one)")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS (none by default)")
    # --- metrics and backpressure
    max_in_flight: int = Field(32, ge=1, description="most predictions in flight in one process; beyond it POST "
                               "/predict answers 503 with Retry-After at once, before decoding the upload")
    # --- Ray Serve (ray_serve.py; the plain service ignores these)
    serve_ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress (the FastAPI app); more "
                                        "than one needs PostgreSQL and an MLflow server")
    serve_ingress_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per ingress replica")
    serve_model_replicas: int = Field(1, ge=1, description="replicas of the model deployment (both models each); "
                                      "the least of them when autoscaling")
    serve_model_max_replicas: int = Field(0, ge=0, description="above serve_model_replicas: autoscale the model "
                                          "deployment between the two; 0: a fixed number")
    serve_model_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per model replica")
    serve_model_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (fractions share one GPU)")
    serve_model_timeout_seconds: float = Field(120.0, gt=0, description="longest wait for the model deployment's "
                                               "answer to one film before the request answers 503")

    # --- DICOM results and the PACS (README: DICOM results and PACS)
    dicom_for_all: bool = Field(False, description="also write the DICOM report and heatmap for PNG, JPEG and TIFF "
                                "uploads (in a new study with placeholder patient data); never sent to the PACS")
    dicom_uid_root: str = Field(
        DEFAULT_UID_ROOT, pattern=r"^[1-9][0-9]*(\.(0|[1-9][0-9]*))*\.$", max_length=40,
        description="root of the Series and SOP Instance UIDs the service makes (dotted digits ending in '.'); "
                    "the default is pydicom's root: set your organisation's own")
    ae_title: str = Field("BONEAGE", min_length=1, max_length=16, description="the service's own DICOM AE title")
    pacs_host: str = Field("", description="PACS to send the DICOM report and heatmap to (with port and AE title)")
    pacs_port: int = Field(0, ge=0, le=65535, description="port of the PACS's storage SCP (0: no PACS)")
    pacs_ae_title: str = Field("", max_length=16, description="the PACS's AE title")
    pacs_timeout_seconds: float = Field(10.0, gt=0, description="network, association and C-STORE timeout")
    pacs_retry_seconds: float = Field(10.0, gt=0, description="first wait after a failed send; doubled per failure")
    pacs_retry_max_seconds: float = Field(600.0, gt=0, description="longest wait between attempts of one object")
    pacs_lease_seconds: float = Field(
        120.0, gt=0, description="how long a process's claim on objects to send lasts if it dies while sending")

    # --- FHIR for the EHR (README: FHIR)
    fhir_patient_id_system: str = Field(
        "urn:boneage:patient-id", pattern=r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$",
        description="the system (a URI) of the patient ids in the FHIR Bundles' references: set the one your EHR "
                    "knows the service's patient ids by, e.g. the MRN system urn:oid:<your root>")

    scp_host: str = Field("127.0.0.1", description="where the storage SCP (python -m utils.pacs.receiver) listens")
    scp_port: int = Field(11112, ge=1, le=65535, description="port of the storage SCP")
    scp_service_url: str = Field("", description="the service the storage SCP posts films to "
                                 "(default http://<BONEAGE_HOST>:<BONEAGE_PORT>)")
    scp_calling_ae_titles: str = Field("", description="comma-separated AE titles the storage SCP takes films from "
                                       "(empty: any)")

    @model_validator(mode="after")
    def _pacs_all_or_nothing(self) -> Settings:
        given = {"BONEAGE_PACS_HOST": self.pacs_host, "BONEAGE_PACS_PORT": self.pacs_port,
                 "BONEAGE_PACS_AE_TITLE": self.pacs_ae_title}
        missing = [name for name, value in given.items() if not value]
        if 0 < len(missing) < len(given):
            raise ValueError(f"a PACS needs host, port and AE title: {', '.join(missing)} not set")
        if self.pacs_lease_seconds < PACS_LEASE_PER_TIMEOUT * self.pacs_timeout_seconds:
            # A sender renews its claim before each object only: one C-STORE (the data sent, then the answer
            # awaited, each within the timeout) that outlasts the lease lets another process claim and send it too.
            raise ValueError(f"BONEAGE_PACS_LEASE_SECONDS ({self.pacs_lease_seconds:g}) must be at least "
                             f"{PACS_LEASE_PER_TIMEOUT} times BONEAGE_PACS_TIMEOUT_SECONDS "
                             f"({self.pacs_timeout_seconds:g}), or a slow C-STORE is sent twice by two processes")
        return self

    @property
    def pacs_configured(self) -> bool:
        return bool(self.pacs_host and self.pacs_port and self.pacs_ae_title)

    @property
    def api_key_list(self) -> list[str]:
        return _comma_separated(self.api_keys)

    @property
    def keys_configured(self) -> bool:
        """Whether any API key is set (flat or in the keys file): then every patient route needs one."""
        return bool(self.api_key_list or self.api_keys_file)

    @property
    def scp_calling_ae_title_list(self) -> list[str]:
        return _comma_separated(self.scp_calling_ae_titles)

    @property
    def cors_origin_list(self) -> list[str]:
        return _comma_separated(self.cors_origins)

    @property
    def patients_dir(self) -> Path:
        return self.storage_dir / "patients"

    @property
    def inbox_dir(self) -> Path:
        """The DICOM receiver's inbox (`utils.pacs.receiver`); an erasure removes the patient's films there too."""
        return self.storage_dir / "inbox"


def _comma_separated(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def settings_or_exit(program: str) -> Settings:
    """The environment's settings, or exit status 2 with one line per malformed setting, named as it is set
    (`BONEAGE_PORT: Input should be a valid integer`), instead of pydantic's traceback."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{_setting_name(error['loc'])}: {error['msg']}" for error in exc.errors())
        sys.stderr.write(f"{program}: invalid settings: {problems}\n")
        raise SystemExit(2) from None


def _setting_name(location: tuple[int | str, ...]) -> str:
    return f"{Settings.model_config.get('env_prefix', '')}{location[0]}".upper() if location else "settings"
