from pathlib import Path

from kolors_story.host.rule_runner import run_rule
from kolors_story.outputs.story_page import compose_story, compose_story_page, write_contact_sheet


def main(snakemake):
    layout, params, out = snakemake.params.layout, snakemake.params, snakemake.output
    panels = [Path(p) for p in snakemake.input.panels]
    if layout["style"] == "page":
        compose_story_page(panels, params.captions, params.title, Path(out.story), layout["columns"], layout["rows"],
                           margin=layout["margin"])
    else:
        compose_story(panels, Path(out.story), layout["columns"], layout["rows"], layout["gap"])
    write_contact_sheet([Path(d) for d in snakemake.input.candidates], Path(out.contact_sheet))


run_rule(main, snakemake)
