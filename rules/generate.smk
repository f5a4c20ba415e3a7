# One job per story scene (GPU), then the panels tiled into one story image.


rule generate_scene:
    input:
        lora=f"{OUT}/lora/pytorch_lora_weights.safetensors",
        model=model_path("kolors"),
        model_check=f"{OUT}/models/kolors.json",
    output:
        report(f"{OUT}/scenes/{{scene}}.png", caption="../report/scene.rst", category="Scenes"),
    params:
        scene=scene_params,
        sampler={k: v for k, v in config["generate"].items() if k not in ("seed", "width", "height")},
    resources:
        gpu=1,
    log:
        f"{LOGS}/generate_scene/{{scene}}.log",
    conda:
        ENV
    script:
        "../scripts/generate_scene.py"


rule compose_story:
    input:
        [scene_png(s) for s in SCENE_IDS],
    output:
        report(f"{OUT}/story.png", caption="../report/story.rst", category="Story"),
    params:
        layout=config["layout"],
    log:
        f"{LOGS}/compose_story.log",
    conda:
        ENV
    script:
        "../scripts/compose_story.py"
