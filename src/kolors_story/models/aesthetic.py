"""The challenge's aesthetic metric: AestheticsPredictorV2Linear on each panel, then the plain mean.

Loading and scoring follow the challenge's reference code line for line, so our mean equals its
evaluate() on the same folder.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from aesthetics_predictor import AestheticsPredictorV2Linear
from PIL import Image
from tqdm import tqdm
from transformers import CLIPProcessor

from kolors_story.errors import UserError
from kolors_story.files import write_json
from kolors_story.models.hub import check_aesthetic_dir

# The challenge rejected a submission whose mean score was below this.
PASS_THRESHOLD = 6.0


class AestheticScorer:
    """Scores images with the aesthetic predictor saved in `model_dir` (real or tiny)."""

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        model_dir = Path(model_dir)
        check_aesthetic_dir(model_dir)
        self.model_dir = model_dir
        self.device = device
        # As in the reference: from_pretrained leaves the model in eval mode (dropout off).
        self.predictor = AestheticsPredictorV2Linear.from_pretrained(str(model_dir)).to(device)
        self.processor = CLIPProcessor.from_pretrained(str(model_dir))

    def score(self, image: Image.Image) -> float:
        """One image's score; the processor converts to RGB, resizes and crops like the reference."""
        return self.score_and_embed(image)[0]

    def score_and_embed(self, image: Image.Image) -> tuple[float, torch.Tensor]:
        """The score and the L2-normalised CLIP image embedding the predictor's head reads (the
        vision tower is already loaded, so consistency costs no extra model)."""
        inputs = self.processor(images=image, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            outputs = self.predictor(**inputs)
        return outputs.logits.tolist()[0][0], outputs.hidden_states[0].float().cpu()

    def score_files(self, paths: list[Path]) -> dict[str, float]:
        """File name -> score, in the given order. Names must be unique (they key the results)."""
        return self.score_and_embed_files(paths)[0]

    def score_and_embed_files(self, paths: list[Path]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """File name -> score, and file name -> CLIP image embedding, in the given order."""
        paths = [Path(p) for p in paths]
        _check_unique_names(paths)
        scores: dict[str, float] = {}
        embeddings: dict[str, torch.Tensor] = {}
        for path in tqdm(paths, desc="aesthetic score", unit="image"):
            with _open_image(path) as image:
                scores[path.name], embeddings[path.name] = self.score_and_embed(image)
        return scores, embeddings


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two image embeddings (1.0 = same direction)."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


def consistency_report(embeddings: dict[str, torch.Tensor], characters: dict[str, list[str]]) -> dict:
    """Cosine similarity of CLIP image embeddings between every two panels that show the same
    character: per pair, per character and overall mean (1.0 = identical images)."""
    pairs, by_character = [], {}
    names = list(embeddings)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(characters.get(a, [])) & set(characters.get(b, [])))
            if not shared:
                continue
            similarity = cosine(embeddings[a], embeddings[b])
            pairs.append({"a": a, "b": b, "characters": shared, "similarity": similarity})
            for name in shared:
                by_character.setdefault(name, []).append(similarity)
    mean = sum(p["similarity"] for p in pairs) / len(pairs) if pairs else None
    return {"mean": mean, "pairs": pairs,
            "characters": {k: sum(v) / len(v) for k, v in sorted(by_character.items())}}


def consistency_comparison(with_option: dict, without_option: dict) -> dict:
    """Two consistency_report()s of the same panels, rendered with and without the consistency
    option: mean and per-pair similarity side by side, and the gain (with minus without)."""
    without = {(p["a"], p["b"]): p["similarity"] for p in without_option["pairs"]}
    pairs = [{"a": p["a"], "b": p["b"], "characters": p["characters"], "with": p["similarity"],
              "without": without[(p["a"], p["b"])], "gain": p["similarity"] - without[(p["a"], p["b"])]}
             for p in with_option["pairs"] if (p["a"], p["b"]) in without]
    mean_with = sum(p["with"] for p in pairs) / len(pairs) if pairs else None
    mean_without = sum(p["without"] for p in pairs) / len(pairs) if pairs else None
    return {"mean_with": mean_with, "mean_without": mean_without,
            "gain": None if not pairs else mean_with - mean_without, "pairs": pairs}


def _check_unique_names(paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in paths:
        if path.name in seen:
            raise UserError(
                f"Two images to score share the file name {path.name!r} ({seen[path.name]} and "
                f"{path}); scores are keyed by file name, so give each panel a unique name."
            )
        seen[path.name] = path


def _open_image(path: Path) -> Image.Image:
    """Open an image as the reference does (no mode change), with an error that names the file."""
    try:
        return Image.open(path)
    except FileNotFoundError as exc:
        raise UserError(f"Image to score {path} does not exist; generate the panel first.") from exc
    except OSError as exc:
        raise UserError(f"Image to score {path} cannot be read ({exc}); regenerate it.") from exc


def summarise_scores(scores: dict[str, float], threshold: float = PASS_THRESHOLD) -> dict:
    """Mean (0 for no images, as the reference), threshold, pass flag, count and per-image scores."""
    mean = sum(scores.values()) / len(scores) if scores else 0.0
    return {
        "mean": mean,
        "threshold": threshold,
        "passes": mean >= threshold,
        "n": len(scores),
        "scores": dict(scores),
    }


def write_scores(
    scores: dict[str, float], csv_path: Path, json_path: Path, threshold: float = PASS_THRESHOLD,
    extra: dict | None = None,
) -> dict:
    """Write scores.csv (image,score rows in the given order) and scores.json (the summary plus
    `extra` sections, e.g. consistency); return the summary."""
    csv_path, json_path = Path(csv_path), Path(json_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "score"])
        for name, value in scores.items():
            writer.writerow([name, repr(float(value))])
    summary = {**summarise_scores(scores, threshold), **(extra or {})}
    write_json(summary, json_path)
    return summary
