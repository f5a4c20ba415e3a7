"""How a scene job chooses its panel: when the aesthetic predictor is needed (needs_scorer), and
the pick among the drawn candidates (pick_candidate).

Standard library only at import time: the Snakefile (at parse time), the job plan and the scene
jobs all ask needs_scorer, and none of them must pay for the config validator (jsonschema), torch
or the predictor to know it; pick_candidate imports the predictor where it scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from kolors_story.render.candidates_file import Candidate


def needs_scorer(candidates: int, lora_scale: float | Sequence[float], prompts: int = 1) -> bool:
    """Whether a scene job renders several images (best-of-N, a sweep of LoRA scales, or a scene's
    alternative prompts) and so picks one with the aesthetic predictor. The one decision: the rules
    give the job the model when this is true, and render_scene refuses to start without it."""
    n_scales = len(lora_scale) if isinstance(lora_scale, (list, tuple)) else 1
    return candidates * n_scales * prompts > 1


def pick_candidate(images: Sequence[Image.Image], drawn: Sequence[Candidate], aesthetic_dir: Path | None,
                   device: torch.device, anchors: Sequence[Path], weight: float,
                   candidates_dir: Path | None) -> tuple[int, tuple[Candidate, ...]]:
    """The kept candidate's index (the best challenge score, plus `weight` x its similarity to the
    anchors; the first one when aesthetic_dir is None: nothing to choose), and every drawn
    candidate (images[k] is drawn[k]'s) with its scores, its image saved under candidates_dir
    when given."""
    scores = similarity = combined = [None] * len(images)
    chosen = 0
    if aesthetic_dir is not None:
        scores, similarity = score_candidates(images, aesthetic_dir, device, anchors)
        combined = [a + weight * (c or 0.0) for a, c in zip(scores, similarity)]
        chosen = max(range(len(images)), key=lambda k: combined[k])
    files = save_candidates(images, candidates_dir) if candidates_dir is not None else [None] * len(images)
    return chosen, tuple(replace(candidate, score=s, anchor_similarity=a, selection_score=c, file=f)
                         for candidate, s, a, c, f in zip(drawn, scores, similarity, combined, files))


def score_candidates(images: Sequence[Image.Image], aesthetic_dir: Path | None, device: torch.device,
                     anchors: Sequence[Path] = ()) -> tuple[list[float], list[float | None]]:
    """Aesthetic score of each candidate and, given anchors, its mean CLIP cosine similarity to the
    anchor images of the scene's characters (same vision tower, no extra model)."""
    from PIL import Image

    from kolors_story.models.aesthetic import AestheticScorer, cosine

    if aesthetic_dir is None:
        raise ValueError("best-of-N needs the aesthetic predictor (aesthetic_dir)")
    scorer = AestheticScorer(Path(aesthetic_dir), device=str(device))
    scored = [scorer.score_and_embed(image) for image in images]
    if not anchors:
        return [s for s, _ in scored], [None] * len(images)
    refs = []
    for path in anchors:
        with Image.open(Path(path).with_suffix(".png")) as image:
            refs.append(scorer.score_and_embed(image)[1])
    similarity = [sum(cosine(e, r) for r in refs) / len(refs) for _, e in scored]
    return [s for s, _ in scored], similarity


def save_candidates(images: Sequence[Image.Image], folder: Path) -> list[str]:
    """Each candidate's image as <k>.png in `folder`; the names, in order."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image.save(Path(folder) / f"{k}.png")
    return [f"{k}.png" for k in range(len(images))]
