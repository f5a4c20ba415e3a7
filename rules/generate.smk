# Anchors (one per character) and scenes (one job per panel) on the GPU, keyed by the LoRA job,
# the model and exactly what the image depends on: variants that render a scene alike share the
# job. Neither loads the 6B text encoder: their prompt embeddings come from rule encode_texts'
# file (rules/encode.smk), an ancient() input, so a rerun of that job (another scene's prompt
# edited) reruns no anchor or scene by itself; each reruns when its own params (its prompt, seed,
# size, sampler) or its LoRA change. A prompt missing from the file stops the job with the fix
# (snakemake -R encode_texts). Then each variant's panels, tiled.
from kolors_story.plan.job_plan import IMAGE_KEYS
from kolors_story.render.candidates_file import FORMAT as RECORD_FORMAT


rule render_anchor:
    input:
        unpack(anchor_inputs),
    output:
        anchor_file("{character}", "{key}"),
    params:
        anchor=lambda wc: anchor_job(wc)["anchor"],
        sampler=lambda wc: anchor_job(wc)["sampler"],
        consistency=lambda wc: anchor_job(wc)["consistency"],
        cache_dir=CACHE,
        record_format=RECORD_FORMAT,  # the anchor's metadata follows the record's format
    resources:
        gpu=1,
    log:
        f"{SHARED}/logs/render_anchor/{{character}}/{{key}}.log",
    benchmark:
        gpu_benchmark("render_anchor", "{key}", "{character}")
    conda:
        ENV
    script:
        "../scripts/render_anchor.py"


rule generate_scene:
    input:
        unpack(generate_inputs),
    output:
        panel=scene_file("{scene}", "{key}", "panel"),
        candidates=directory(scene_file("{scene}", "{key}", "candidates")),
    params:
        scene=lambda wc: scene_job(wc)["scene"],
        sampler=lambda wc: scene_job(wc)["sampler"],
        consistency=lambda wc: scene_job(wc)["consistency"],
        cache_dir=CACHE,
        record_format=RECORD_FORMAT,  # a new candidates.json shape reruns the job, never refuses
    resources:
        gpu=1,
    log:
        f"{SHARED}/logs/generate_scene/{{scene}}/{{key}}.log",
    benchmark:
        gpu_benchmark("generate_scene", "{key}", "{scene}")
    conda:
        ENV
    script:
        "../scripts/generate_scene.py"


rule copy_scene:
    """The variant's panel and its candidates, copied from the scene job that rendered them."""
    input:
        panel=variant_scene_file("panel"),
        candidates=variant_scene_file("candidates"),
    output:
        panel=report(run_panel("{run}", "{scene}"), caption="../report/scene.rst",
                     category="{run}", subcategory="Panels", labels=panel_labels),
        candidates=directory(run_candidates("{run}", "{scene}")),
    params:
        scene=lambda wc: {k: plan().scenes[wc.run][wc.scene][k] for k in IMAGE_KEYS},  # for the report's caption
    log:
        f"{RUN_DIR}/logs/copy_scene/{{scene}}.log",
    conda:
        ENV
    script:
        "../scripts/copy_outputs.py"


rule compose_story:
    input:
        panels=variant_panels,
        candidates=variant_candidates,
    output:
        story=report(run_file("{run}", "story"), caption="../report/story.rst", category="{run}",
                     subcategory="Story"),
        contact_sheet=report(run_file("{run}", "contact_sheet"), caption="../report/contact_sheet.rst",
                             category="{run}", subcategory="Story"),
    params:
        layout=lambda wc: variant_config(wc)["layout"],
        title=lambda wc: variant_config(wc)["story"]["title"],
        captions=lambda wc: [plan().scenes[wc.run][s]["caption"] for s in variant_scenes(wc)],
    log:
        f"{RUN_DIR}/logs/compose_story.log",
    benchmark:
        f"{RUN_DIR}/benchmarks/compose_story.tsv"
    conda:
        ENV
    script:
        "../scripts/compose_story.py"
