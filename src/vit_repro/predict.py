"""Use a trained run: load its logged weights with the right transform and classify images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .data import DataError, ImageTransform, load_image, pretrained_transform
from .model import VisionTransformer, parse_model_name


class PredictError(RuntimeError):
    """The weights or an image cannot be used; the message names the file and the fix."""


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
        try:
            image = load_image(Path(path), self.transform)
        except (OSError, ValueError, DataError) as exc:
            raise PredictError(f"{path} is not a readable image ({exc}); pass JPEG or PNG files") from None
        logits = self.model(self.transform.normalize(image.unsqueeze(0)))
        probs = logits.float().softmax(1)[0].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return Prediction(Path(path), self.classes[best], dict(zip(self.classes, probs)), image)


def _weights_folder(run_id: str | None, weights_dir: Path | None) -> Path:
    if weights_dir is not None:
        return Path(weights_dir)
    import mlflow

    from .tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="weights"))
    except Exception as exc:  # MlflowException or OSError: unknown run, or a run without weights
        raise PredictError(
            f"cannot get weights of MLflow run {run_id} from {tracking_uri()} ({exc}). Weights are logged for "
            f"frozen runs and for the seeds in train.weights_for_seeds; pick such a run in the MLflow UI."
        ) from None


def load_predictor(
    run_id: str | None = None, weights_dir: Path | None = None, pretrained_dir: Path = Path("models/pretrained")
) -> Predictor:
    """A ready model from a run id (its MLflow ``weights/`` artifacts) or a folder holding the same files."""
    folder = _weights_folder(run_id, weights_dir)
    card_path, weights_path = folder / "model.json", folder / "model.safetensors"
    if not card_path.is_file() or not weights_path.is_file():
        raise PredictError(f"{folder} must hold model.json and model.safetensors (a run's `weights/` artifacts)")
    card = json.loads(card_path.read_text())
    state = load_file(weights_path)
    classes = card["classes"]
    if card["backbone"] == "scratch":
        cfg = parse_model_name(card["model"]["name"], image_size=card["image_size"], num_classes=len(classes))
        model = VisionTransformer(cfg)
        model.load_state_dict(state)
        transform = ImageTransform(resize=(card["image_size"], card["image_size"]))
    else:
        from .backbone import BackboneError, load_backbone

        try:
            model, info = load_backbone(pretrained_dir, num_classes=len(classes))
        except BackboneError as exc:
            raise PredictError(f"the frozen run needs its backbone: {exc}") from None
        wanted = card["pretrained"]["sha256"]
        if info["sha256"] != wanted:
            raise PredictError(
                f"the run used backbone {card['pretrained']['label']} (sha256 {wanted[:16]}…) but {pretrained_dir} "
                f"holds {info['label']} (sha256 {info['sha256'][:16]}…); run `vit-repro pretrained --backbone "
                f"{card['pretrained']['name']} --out DIR` and pass --pretrained DIR"
            )
        model.head.load_state_dict(state)
        transform = pretrained_transform(**card["pretrained"]["transform"])
    return Predictor(model.eval(), transform, classes)


def plot_prediction(results: list[Prediction], out: Path) -> None:
    """Each image with its predicted class and probability, like the seed's custom-image example."""
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
