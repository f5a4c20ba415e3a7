# Anchors (one per character) and scenes (one job per panel) on the GPU, keyed by the LoRA job,
# the model and exactly what the image depends on: variants that render a scene alike share the
# job. Neither loads the 6B text encoder: their prompt embeddings come from rule encode_texts'
# file (rules/encode.smk), an ancient() input, so a rerun of that job (another scene's prompt
# edited) reruns no anchor or scene by itself; each reruns when its own params (its prompt, seed,
# size, sampler) or its LoRA change. A prompt missing from the file stops the job with the fix
# (snakemake -R encode_texts). Then each variant's panels, tiled.


rule render_anchor:
    input:
        unpack(anchor_inputs),
    output:
        f"{SHARED}/anchors/{{character}}/{{key}}.safetensors",
    params:
        anchor=lambda wc: PLAN.anchors[wc.key]["anchor"],
        sampler=lambda wc: PLAN.anchors[wc.key]["sampler"],
        consistency=lambda wc: PLAN.anchors[wc.key]["consistency"],
        cache_dir=CACHE,
        record_format=RECORD_FORMAT,  # the anchor's metadata follows the record's format
    resources:
        gpu=1,
    log:
        f"{SHARED}/logs/render_anchor/{{character}}/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/render_anchor/{{character}}/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/render_anchor.py"


rule generate_scene:
    input:
        unpack(generate_inputs),
    output:
        panel=f"{SHARED}/scenes/{{scene}}/{{key}}/panel.png",
        candidates=directory(f"{SHARED}/scenes/{{scene}}/{{key}}/candidates"),
    params:
        scene=lambda wc: PLAN.scenes[wc.key]["scene"],
        sampler=lambda wc: PLAN.scenes[wc.key]["sampler"],
        consistency=lambda wc: PLAN.scenes[wc.key]["consistency"],
        cache_dir=CACHE,
        record_format=RECORD_FORMAT,  # a new candidates.json shape reruns the job, never refuses
    resources:
        gpu=1,
    log:
        f"{SHARED}/logs/generate_scene/{{scene}}/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/generate_scene/{{scene}}/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/generate_scene.py"


rule copy_scene:
    """The variant's panel and its candidates, copied from the scene job that rendered them."""
    input:
        panel=lambda wc: f"{scene_job_dir(wc)}/panel.png",
        candidates=lambda wc: f"{scene_job_dir(wc)}/candidates",
    output:
        panel=report(f"{RUN_DIR}/scenes/{{scene}}.png", caption="../report/scene.rst",
                     category="{run}", subcategory="Panels", labels=panel_labels),
        candidates=directory(f"{RUN_DIR}/candidates/{{scene}}"),
    params:
        scene=lambda wc: {k: SCENES[wc.run][wc.scene][k] for k in IMAGE_KEYS},  # for the report's caption
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
        story=report(f"{RUN_DIR}/story.png", caption="../report/story.rst", category="{run}",
                     subcategory="Story"),
        contact_sheet=report(f"{RUN_DIR}/contact_sheet.png", caption="../report/contact_sheet.rst",
                             category="{run}", subcategory="Story"),
    params:
        layout=lambda wc: variant_config(wc)["layout"],
        title=lambda wc: variant_config(wc)["story"]["title"],
        captions=lambda wc: [SCENES[wc.run][s]["caption"] for s in variant_scenes(wc)],
    log:
        f"{RUN_DIR}/logs/compose_story.log",
    benchmark:
        f"{RUN_DIR}/benchmarks/compose_story.tsv"
    conda:
        ENV
    script:
        "../scripts/compose_story.py"
