# The challenge score, the ModelScope bundle (and opt-in upload), and the run's manifest.


rule score_images:
    input:
        panels=[scene_png(s) for s in SCENE_IDS],
        candidates=[f"{OUT}/candidates/{s}" for s in SCENE_IDS],
        model=model_path("aesthetic"),
        model_check=f"{OUT}/models/aesthetic.json",
    output:
        csv=report(f"{OUT}/scores.csv", caption="../report/scores.rst", category="Scores"),
        json=f"{OUT}/scores.json",
    params:
        threshold=config["score"]["threshold"],
        characters={s: SCENES[s]["characters"] for s in SCENE_IDS},
        compare=config["generate"]["consistency"]["enabled"] and config["generate"]["consistency"]["compare"],
    log:
        f"{LOGS}/score_images.log",
    conda:
        ENV
    script:
        "../scripts/score_images.py"


rule bundle:
    input:
        lora=f"{OUT}/lora/pytorch_lora_weights.safetensors",
        panels=[scene_png(s) for s in SCENE_IDS],
        candidates=[f"{OUT}/candidates/{s}" for s in SCENE_IDS],
        story=f"{OUT}/story.png",
        scores=f"{OUT}/scores.json",
    output:
        directory(f"{OUT}/bundle"),
    params:
        scenes=list(SCENES.values()),
        bundle=config["bundle"],
        base_model=config["models"]["kolors"],
        run=RUN,
        repo_id=config["upload"]["repo_id"],
    log:
        f"{LOGS}/bundle.log",
    conda:
        ENV
    script:
        "../scripts/bundle.py"


rule upload:
    input:
        f"{OUT}/bundle",
    output:
        f"{OUT}/upload.json",
    params:
        repo_id=config["upload"]["repo_id"],
        visibility=config["upload"]["visibility"],
    log:
        f"{LOGS}/upload.log",
    retries: NETWORK_RETRIES
    conda:
        ENV
    script:
        "../scripts/upload.py"


rule manifest:
    input:
        lora=f"{OUT}/lora/pytorch_lora_weights.safetensors",
        panels=[scene_png(s) for s in SCENE_IDS],
        candidates=[f"{OUT}/candidates/{s}" for s in SCENE_IDS],
        story=f"{OUT}/story.png",
        scores=f"{OUT}/scores.json",
        bundle=f"{OUT}/bundle",
        dataset=f"{OUT}/data/filtered.jsonl",
        training_data=f"{OUT}/dataset",
        filter_stats=f"{OUT}/data/filter_stats.json",
        models=expand(f"{OUT}/models/{{name}}.json", name=["kolors", "aesthetic"]),
        benchmarks=gpu_benchmarks(),
    output:
        manifest=f"{OUT}/manifest.json",
        config=f"{OUT}/config.yaml",
    params:
        config=config,
        seeds={"train": config["train"]["seed"], **{s: v["seed"] for s, v in SCENES.items()}},
    log:
        f"{LOGS}/manifest.log",
    conda:
        ENV
    script:
        "../scripts/manifest.py"
