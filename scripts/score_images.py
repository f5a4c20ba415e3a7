import logging
from pathlib import Path

from PIL import Image

from kolors_story.render.scenes import WITHOUT_CONSISTENCY
from kolors_story.host.rule_runner import run_rule
from kolors_story.models.aesthetic import AestheticScorer, consistency_comparison, consistency_report, write_scores


def main(snakemake):
    scorer = AestheticScorer(Path(snakemake.input.aesthetic))
    scores, embeddings = scorer.score_and_embed_files([Path(p) for p in snakemake.input.panels])
    characters = {f"{scene}.png": names for scene, names in snakemake.params.characters.items()}
    consistency = consistency_report(embeddings, characters)
    extra = {"consistency": consistency}
    if snakemake.params.compare:
        extra["consistency_comparison"] = compare_without(scorer, snakemake.input.candidates, characters, consistency)
    summary = write_scores(scores, Path(snakemake.output.csv), Path(snakemake.output.json),
                           snakemake.params.threshold, extra=extra)
    logging.info("mean aesthetic score %.4f (threshold %.1f): %s", summary["mean"],
                 summary["threshold"], "passes" if summary["passes"] else "below threshold")
    if consistency["mean"] is not None:
        logging.info("character consistency (CLIP cosine, %d pairs): %.4f", len(consistency["pairs"]),
                     consistency["mean"])
    if "tiny" in str(snakemake.input.aesthetic):
        logging.warning("scored with a tiny random-weight predictor: demo scores are meaningless")


def compare_without(scorer, candidate_dirs, characters: dict, with_option: dict) -> dict:
    """Consistency of the same panels rendered without the option (generate.consistency.compare)."""
    embeddings = {}
    for folder in map(Path, candidate_dirs):
        if (folder / WITHOUT_CONSISTENCY).is_file():  # scenes that show a character
            with Image.open(folder / WITHOUT_CONSISTENCY) as image:
                embeddings[f"{folder.name}.png"] = scorer.score_and_embed(image)[1]
    comparison = consistency_comparison(with_option, consistency_report(embeddings, characters))
    if comparison["gain"] is not None:
        logging.info("character consistency with %.4f vs without %.4f (gain %+.4f, %d pairs)",
                     comparison["mean_with"], comparison["mean_without"], comparison["gain"], len(comparison["pairs"]))
    return comparison


run_rule(main, snakemake)
