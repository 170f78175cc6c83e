"""Seed-style baseline for bench/run.py: the same prediction, written the naive way.

Everything runs inside one `async def` handler, in order, on the event loop: decode with PIL, for each model a
new `pytorch_grad_cam.GradCAM` per request, heatmaps rendered and saved with PIL at the film's full size, one
SQLAlchemy insert into SQLite, and an MLflow run through the fluent API. The model code is the project's own
(`load_weights`, `build_nets`, `to_model_pixels`, `resize_to`, `standardize`, the same test-time variants and
`combine_members`), so
the estimates equal the service's; only the service's design (worker threads, per-model locks, one shared CAM
pass, downscaled heatmaps, MlflowClient with explicit run ids, ...) is missing.

Not part of the service. Started by bench/run.py; by hand, from the repository root:

    BONEAGE_DATABASE_URL=sqlite:///... BONEAGE_STORAGE_DIR=... MLFLOW_TRACKING_URI=sqlite:///... \
        python -m uvicorn seed_baseline:app --app-dir bench --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import datetime as dt
import io
import os
import uuid
from pathlib import Path

import mlflow
import numpy as np
import torch
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image, ImageOps
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sqlalchemy import Column, DateTime, Float, Integer, String, create_engine
from sqlalchemy.orm import Session, declarative_base

from male_boneage.augment import DEFAULT_TTA, TTA_VARIANTS, TtaVariant, standardize, tta_batch
from male_boneage.inference import MEAN_INDEX, build_nets, combine_members, load_weights, resize_to
from male_boneage.model import FlatOutput
from male_boneage.preprocess import to_model_pixels

REPO = Path(__file__).resolve().parent.parent

DATABASE_URL = os.environ.get("BONEAGE_DATABASE_URL", f"sqlite:///{REPO / 'bench' / 'out' / 'baseline.db'}")
STORAGE_DIR = Path(os.environ.get("BONEAGE_STORAGE_DIR", str(REPO / "bench" / "out" / "baseline-storage")))
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'bench' / 'out' / 'baseline-mlflow.db'}")
EXPERIMENT = "bone-age-seed-baseline"
DEVICE = torch.device("cuda" if os.environ.get("BONEAGE_DEVICE") == "cuda"
                      or (os.environ.get("BONEAGE_DEVICE", "auto") == "auto" and torch.cuda.is_available()) else "cpu")
TTA = TTA_VARIANTS[: int(os.environ.get("BONEAGE_TTA_VARIANTS", str(len(DEFAULT_TTA))))]
WEIGHTS = {
    "male": Path(os.environ.get("BONEAGE_MALE_WEIGHTS", str(REPO / "male_boneage" / "weights" / "male.pt"))),
    "female": Path(os.environ.get("BONEAGE_FEMALE_WEIGHTS", str(REPO / "male_boneage" / "weights" / "female.pt"))),
}

# Models loaded at import time, as a first version would.
# Per sex: ([(net, its input size, its test-time variants)], metadata); an ensemble has several nets.
MODELS = {}
for _sex, _path in WEIGHTS.items():
    _state, _meta = load_weights(_path)
    _entries = _meta.get("members") or [{"input_size": _meta["input_size"]}]
    MODELS[_sex] = ([(net.to(DEVICE), int(entry["input_size"]), TTA[:entry.get("tta_count") or len(TTA)])
                     for net, entry in zip(build_nets(_state, _meta, str(_path)), _entries, strict=True)], _meta)

Base = declarative_base()


class BaselinePrediction(Base):  # type: ignore[misc, valid-type]
    __tablename__ = "baseline_predictions"

    id = Column(Integer, primary_key=True, autoincrement=True)
    prediction_id = Column(String(64))
    patient_id = Column(String(64))
    sex = Column(String(8))
    created_at = Column(DateTime)
    image_path = Column(String(512))
    male_age_months = Column(Float)
    male_sigma_months = Column(Float)
    male_gradcam_path = Column(String(512))
    female_age_months = Column(Float)
    female_sigma_months = Column(Float)
    female_gradcam_path = Column(String(512))


engine = create_engine(DATABASE_URL)
Base.metadata.create_all(engine)

app = FastAPI(title="bone age seed-style baseline (benchmark only)")


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


def _model_input(pixels: np.ndarray, size: int, tta: tuple[TtaVariant, ...]) -> torch.Tensor:
    """The service's input to a net reading at `size`: the same test-time variants, standardised per image."""
    pixels = resize_to(torch.from_numpy(pixels).unsqueeze(0), size)[0].numpy()
    if len(tta) == 1:
        return standardize(torch.from_numpy(pixels).view(1, 1, *pixels.shape))
    return tta_batch(pixels, tta)


@app.post("/predict")
async def predict(image: UploadFile = File(...), patient_id: str = Form(...),  # noqa: B008
                  sex: str = Form("unknown")) -> dict[str, object]:
    data = await image.read()
    film = Image.open(io.BytesIO(data))
    film = ImageOps.exif_transpose(film).convert("L")

    created_at = dt.datetime.now(dt.UTC)
    prediction_id = f"{created_at.strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}"
    folder = STORAGE_DIR / "patients" / patient_id / prediction_id
    folder.mkdir(parents=True, exist_ok=True)
    original_path = folder / "original.png"
    original_path.write_bytes(data)

    results: dict[str, dict[str, object]] = {}
    for sex_name, (members, meta) in MODELS.items():
        pixels = to_model_pixels(film, int(meta["input_size"]))
        net, size, tta = members[0]
        batch = _model_input(pixels, size, tta).to(DEVICE)
        cam = GradCAM(model=FlatOutput(net).eval(), target_layers=[net.cam_layer])
        with cam:
            maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(MEAN_INDEX)] * len(batch))
            outputs = [cam.outputs.detach().cpu()]
        with torch.no_grad():
            outputs += [FlatOutput(net).eval()(_model_input(pixels, size, tta).to(DEVICE)).cpu()
                        for net, size, tta in members[1:]]
        age, sigma, probs = combine_members(outputs, float(meta["sigma_scale"]))

        heat = Image.fromarray(np.uint8(255 * np.clip(maps[0], 0, 1))).resize(film.size, Image.Resampling.BILINEAR)
        colored = ImageOps.colorize(heat, black="blue", mid="yellow", white="red")
        overlay = Image.blend(film.convert("RGB"), colored, 0.45)
        cam_path = folder / f"{sex_name}_gradcam.png"
        overlay.save(cam_path)
        results[sex_name] = {"age_months": age, "sigma_months": sigma, "group_probabilities": probs,
                             "gradcam_path": str(cam_path)}

    with Session(engine) as session:
        session.add(BaselinePrediction(
            prediction_id=prediction_id, patient_id=patient_id, sex=sex, created_at=created_at,
            image_path=str(original_path),
            male_age_months=results["male"]["age_months"], male_sigma_months=results["male"]["sigma_months"],
            male_gradcam_path=results["male"]["gradcam_path"],
            female_age_months=results["female"]["age_months"], female_sigma_months=results["female"]["sigma_months"],
            female_gradcam_path=results["female"]["gradcam_path"],
        ))
        session.commit()

    mlflow.set_tracking_uri(TRACKING_URI)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=prediction_id) as run:
        mlflow.log_param("patient_id", patient_id)
        mlflow.log_param("gender", sex)
        mlflow.log_param("image_size", f"{film.width}x{film.height}")
        mlflow.log_param("timestamp", created_at.isoformat())
        for sex_name, result in results.items():
            mlflow.log_metric(f"{sex_name}_age", float(result["age_months"]) / 12)  # type: ignore[arg-type]
            mlflow.log_metric(f"{sex_name}_uncertainty", float(result["sigma_months"]) / 12)  # type: ignore[arg-type]
        mlflow.log_artifact(str(original_path))
        mlflow.log_artifact(results["male"]["gradcam_path"])  # type: ignore[arg-type]
        mlflow.log_artifact(results["female"]["gradcam_path"])  # type: ignore[arg-type]

    return {"status": "success", "patient_id": patient_id, "prediction_id": prediction_id,
            "mlflow_run_id": run.info.run_id, "male_prediction": results["male"],
            "female_prediction": results["female"]}
