import logging
from pathlib import Path

from kolors_story.rule_runner import run_rule
from kolors_story.scoring import AestheticScorer, consistency_report, write_scores


def main(snakemake):
    scorer = AestheticScorer(Path(snakemake.input.model))
    scores, embeddings = scorer.score_and_embed_files([Path(p) for p in snakemake.input.panels])
    characters = {f"{scene}.png": names for scene, names in snakemake.params.characters.items()}
    consistency = consistency_report(embeddings, characters)
    summary = write_scores(scores, Path(snakemake.output.csv), Path(snakemake.output.json),
                           snakemake.params.threshold, extra={"consistency": consistency})
    logging.info("mean aesthetic score %.4f (threshold %.1f): %s", summary["mean"],
                 summary["threshold"], "passes" if summary["passes"] else "below threshold")
    if consistency["mean"] is not None:
        logging.info("character consistency (CLIP cosine, %d pairs): %.4f", len(consistency["pairs"]),
                     consistency["mean"])
    if "tiny" in str(snakemake.input.model):
        logging.warning("scored with a tiny random-weight predictor: demo scores are meaningless")


run_rule(main, snakemake)
