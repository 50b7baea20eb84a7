"""Use a trained run: load its logged weights with the transform it was trained with and classify images.

Every image is tried: an unreadable one is reported and the others are still classified. Outside a
repository nothing is created: a run id is resolved only against an existing store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .core.errors import UserError
from .core.images import ImageTransform, load_image, pretrained_transform


class PredictError(UserError):
    """The weights cannot be used; the message names the file and the fix."""


@dataclass
class Prediction:
    path: Path
    label: str
    probabilities: dict[str, float]
    image: torch.Tensor  # uint8 (3, H, W) as the model saw it, for plotting

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "label": self.label, "probabilities": self.probabilities}


@dataclass
class Predictor:
    model: torch.nn.Module
    transform: ImageTransform
    classes: list[str]

    @torch.inference_mode()
    def predict(self, path: Path) -> Prediction:
        image = load_image(Path(path), self.transform)  # DataError names the file
        probs = self.model(self.transform.to_input(image.unsqueeze(0))).float().softmax(1)[0].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return Prediction(Path(path), self.classes[best], dict(zip(self.classes, probs)), image)


def predict_files(predictor: Predictor, paths: list[Path]) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Predictions of the readable images, and (path, reason) for each one that could not be read."""
    results, failures = [], []
    for path in paths:
        try:
            results.append(predictor.predict(path))
        except UserError as exc:
            failures.append((Path(path), str(exc)))
    return results, failures


def _weights_folder(run_id: str | None, weights_dir: Path | None) -> Path:
    if weights_dir is not None:
        return Path(weights_dir)
    from .tracking import bound_http_requests, check_backend, in_repository, tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        where = "this repository" if in_repository() else "here (not inside a vit-repro repository)"
        raise PredictError(f"no MLflow store {uri.removeprefix('sqlite:///')} {where}: run from the repository that "
                           "trained the run, set MLFLOW_TRACKING_URI, or pass --weights FOLDER")
    bound_http_requests()  # a tracking server that stops answering cannot hang the download either
    check_backend(uri)  # an unreachable server: one clear message at once, not minutes of retries
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="weights"))
    except Exception as exc:  # MlflowException or OSError: an unknown run, or one without weights
        raise PredictError(f"cannot get the weights of MLflow run {run_id} from {uri} ({' '.join(str(exc).split())[:300]}); "
                           "weights are logged for frozen runs and for the seeds in train.weights_for_seeds") from None


def load_predictor(run_id: str | None = None, weights_dir: Path | None = None,
                   pretrained_dir: Path = Path("models/pretrained")) -> Predictor:
    """A ready model from a run id (its MLflow ``weights/`` artifacts) or a folder holding the same files."""
    from .core.networks import build_model

    folder = _weights_folder(run_id, weights_dir)
    card_path, weights_path = folder / "model.json", folder / "model.safetensors"
    if not card_path.is_file() or not weights_path.is_file():
        raise PredictError(f"{folder} must hold model.json and model.safetensors (a run's `weights/` artifacts)")
    card = json.loads(card_path.read_text())
    state = load_file(weights_path)
    classes = card["classes"]
    if card["kind"] == "scratch":
        model = build_model(card["model"], card["image_size"], len(classes))
        model.load_state_dict(state)
        return Predictor(model.eval(), ImageTransform(resize=(card["image_size"], card["image_size"])), classes)
    from .core.features import BackboneError, load_backbone

    try:
        model, info = load_backbone(pretrained_dir, num_classes=len(classes))
    except BackboneError as exc:
        raise PredictError(f"the frozen run needs its backbone: {exc}") from None
    wanted = card["backbone"]
    if info["sha256"] != wanted["sha256"]:
        raise PredictError(f"the run used backbone {wanted['label']} (sha256 {wanted['sha256'][:16]}…) but {pretrained_dir} "
                           f"holds {info['label']} (sha256 {info['sha256'][:16]}…); run `vit-repro pretrained --backbone "
                           f"{wanted['name']} --out DIR` and pass --pretrained DIR")
    model.head.load_state_dict({k: v for k, v in state.items()})
    return Predictor(model.eval(), pretrained_transform(**wanted["transform"]), classes)


def plot_prediction(results: list[Prediction], out: Path) -> None:
    """Each image with its predicted class and probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4.4), squeeze=False)
    for ax, result in zip(axes[0], results):
        ax.imshow(result.image.permute(1, 2, 0).numpy())
        ax.set_title(f"{result.label}: {result.probabilities[result.label]:.3f}\n{result.path.name}")
        ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
