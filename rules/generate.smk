# One job per story scene (GPU), then the panels tiled into one story image. Prompt embeddings are
# cached under CACHE: a rerun with other sampler settings, seeds or LoRA does not load the 6B text
# encoder again.


rule generate_scene:
    input:
        unpack(generate_inputs),
    output:
        panel=report(f"{OUT}/scenes/{{scene}}.png", caption="../report/scene.rst", category="Scenes"),
        candidates=directory(f"{OUT}/candidates/{{scene}}"),
    params:
        scene=scene_params,
        sampler=SAMPLER,
        consistency=lambda wc: CONSISTENCY if scene_anchors(wc) else None,
        cache_dir=CACHE,
        record_format=RECORD_FORMAT,  # a new candidates.json shape reruns the job, never refuses
    resources:
        gpu=1,
    log:
        f"{LOGS}/generate_scene/{{scene}}.log",
    benchmark:
        f"{OUT}/benchmarks/generate_scene/{{scene}}.tsv"
    conda:
        ENV
    script:
        "../scripts/generate_scene.py"


rule render_anchor:
    input:
        lora=f"{OUT}/lora/pytorch_lora_weights.safetensors",
        model=model_path("kolors"),
        model_check=f"{OUT}/models/kolors.json",
    output:
        f"{OUT}/anchors/{{character}}.safetensors",
    params:
        anchor=anchor_params,
        sampler=SAMPLER,
        consistency=ANCHOR_CONSISTENCY,
        cache_dir=CACHE,
        record_format=RECORD_FORMAT,  # the anchor's metadata follows the record's format
    resources:
        gpu=1,
    log:
        f"{LOGS}/render_anchor/{{character}}.log",
    benchmark:
        f"{OUT}/benchmarks/render_anchor/{{character}}.tsv"
    conda:
        ENV
    script:
        "../scripts/render_anchor.py"


rule compose_story:
    input:
        panels=[scene_png(s) for s in SCENE_IDS],
        candidates=[f"{OUT}/candidates/{s}" for s in SCENE_IDS],
    output:
        story=report(f"{OUT}/story.png", caption="../report/story.rst", category="Story"),
        contact_sheet=report(
            f"{OUT}/contact_sheet.png", caption="../report/contact_sheet.rst", category="Story"
        ),
    params:
        layout=config["layout"],
        title=config["story"]["title"],
        captions=[SCENES[s]["caption"] for s in SCENE_IDS],
    log:
        f"{LOGS}/compose_story.log",
    conda:
        ENV
    script:
        "../scripts/compose_story.py"
