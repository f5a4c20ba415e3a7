import logging
from pathlib import Path

from kolors_story.errors import UserError
from kolors_story.outputs.leaderboard import (
    draw_leaderboard,
    leaderboard_rows,
    load_run,
    write_leaderboard_csv,
)
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    variants = list(snakemake.params.variants)
    inputs = snakemake.input
    if not len(variants) == len(inputs.scores) == len(inputs.stories) == len(inputs.configs):
        raise UserError(f"compare_runs: {len(variants)} variants but {len(inputs.scores)} scores, "
                        f"{len(inputs.stories)} stories and {len(inputs.configs)} configs; the rule's "
                        "inputs must list one of each per variant, in the order of params.variants.")
    runs = [load_run(name, Path(scores), Path(story), Path(config))
            for name, scores, story, config in zip(variants, inputs.scores, inputs.stories, inputs.configs)]
    rows = leaderboard_rows(runs)
    write_leaderboard_csv(rows, Path(snakemake.output.csv))
    draw_leaderboard(rows, runs, Path(snakemake.output.png))
    best = rows[0]
    logging.info("best of %d variants: %s, mean aesthetic score %.4f (threshold %.1f: %s)", len(rows),
                 best["variant"], best["mean_score"], best["threshold"], "passes" if best["passes"] else "below")


run_rule(main, snakemake)
