from pathlib import Path

from kolors_story.rule_runner import run_rule
from kolors_story.training import TrainSettings, train_lora, write_loss_log


def main(snakemake):
    out = Path(snakemake.output.lora).parent
    result = train_lora(
        Path(snakemake.input.model), Path(snakemake.input.dataset), out,
        TrainSettings.from_dict(snakemake.params.train),
    )
    write_loss_log(result.losses, Path(snakemake.output.loss_csv), Path(snakemake.output.loss_png))


run_rule(main, snakemake)
