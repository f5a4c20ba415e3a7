import logging
from pathlib import Path

from kolors_story.rule_runner import run_rule
from kolors_story.scoring import AestheticScorer, write_scores


def main(snakemake):
    scorer = AestheticScorer(Path(snakemake.input.model))
    scores = scorer.score_files([Path(p) for p in snakemake.input.panels])
    summary = write_scores(scores, Path(snakemake.output.csv), Path(snakemake.output.json),
                           snakemake.params.threshold)
    logging.info("mean aesthetic score %.4f (threshold %.1f): %s", summary["mean"],
                 summary["threshold"], "passes" if summary["passes"] else "below threshold")
    if "tiny" in str(snakemake.input.model):
        logging.warning("scored with a tiny random-weight predictor: demo scores are meaningless")


run_rule(main, snakemake)
