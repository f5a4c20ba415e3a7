# Per variant: the challenge score, the ModelScope bundle (and opt-in upload), the manifest.
# Across a sweep's variants: the leaderboard.


rule score_images:
    input:
        unpack(lambda wc: model_inputs("aesthetic", variant_config(wc)["models"]["aesthetic"])),
        panels=variant_panels,
        candidates=variant_candidates,
    output:
        csv=report(f"{RUN_DIR}/scores.csv", caption="../report/scores.rst", category="{run}",
                   subcategory="Scores"),
        json=f"{RUN_DIR}/scores.json",
    params:
        threshold=lambda wc: variant_config(wc)["score"]["threshold"],
        characters=lambda wc: {s: v["characters"] for s, v in SCENES[wc.run].items()},
        compare=lambda wc: variant_config(wc)["generate"]["consistency"]["enabled"] and variant_config(wc)["generate"]["consistency"]["compare"],
    log:
        f"{RUN_DIR}/logs/score_images.log",
    benchmark:
        f"{RUN_DIR}/benchmarks/score_images.tsv"
    conda:
        ENV
    script:
        "../scripts/score_images.py"


rule bundle:
    input:
        unpack(bundle_loras),
        panels=variant_panels,
        candidates=variant_candidates,
        story=f"{RUN_DIR}/story.png",
        scores=f"{RUN_DIR}/scores.json",
    output:
        directory(f"{RUN_DIR}/bundle"),
    params:
        scenes=lambda wc: list(SCENES[wc.run].values()),
        bundle=lambda wc: variant_config(wc)["bundle"],
        base_model=lambda wc: variant_config(wc)["models"]["kolors"],
        run=lambda wc: wc.run,
        repo_id=lambda wc: variant_config(wc)["upload"]["repo_id"],
    log:
        f"{RUN_DIR}/logs/bundle.log",
    benchmark:
        f"{RUN_DIR}/benchmarks/bundle.tsv"
    conda:
        ENV
    script:
        "../scripts/bundle.py"


rule upload:
    input:
        f"{RUN_DIR}/bundle",
    output:
        f"{RUN_DIR}/upload.json",
    params:
        repo_id=lambda wc: variant_config(wc)["upload"]["repo_id"],
        visibility=lambda wc: variant_config(wc)["upload"]["visibility"],
    log:
        f"{RUN_DIR}/logs/upload.log",
    retries: NETWORK_RETRIES
    conda:
        ENV
    script:
        "../scripts/upload.py"


rule manifest:
    input:
        unpack(manifest_inputs),
        panels=variant_panels,
        candidates=variant_candidates,
    output:
        manifest=f"{RUN_DIR}/manifest.json",
        config=report(f"{RUN_DIR}/config.yaml", caption="../report/config.rst", category="{run}",
                      subcategory="Config"),
        timings=report(f"{RUN_DIR}/timings.png", caption="../report/timings.rst", category="{run}",
                       subcategory="Timings"),
    params:
        config=variant_config,
        seeds=lambda wc: {"train": variant_config(wc)["train"]["seed"],
                          **{s: v["seed"] for s, v in SCENES[wc.run].items()}},
        benchmark_labels=lambda wc: list(gpu_benchmarks(wc)),
        jobs=lambda wc: {k: v for k, v in vars(variant_jobs(wc)).items() if k != "captions" or v},  # none: as before
        cut_texts=lambda wc: cut_texts(variant_config(wc)),  # story.truncate_long_prompts: what was cut
    log:
        f"{RUN_DIR}/logs/manifest.log",
    benchmark:
        f"{RUN_DIR}/benchmarks/manifest.tsv"
    conda:
        ENV
    script:
        "../scripts/manifest.py"


rule compare_runs:
    """Every variant of the sweep ranked by its mean score: results/leaderboard.csv and .png."""
    input:
        scores=[f"results/{v}/scores.json" for v in VARIANTS],
        stories=[f"results/{v}/story.png" for v in VARIANTS],
        configs=[f"results/{v}/config.yaml" for v in VARIANTS],
    output:
        csv="results/leaderboard.csv",
        png=report("results/leaderboard.png", caption="../report/leaderboard.rst", category=LEADERBOARD),
    params:
        variants=list(VARIANTS),
    log:
        f"{SHARED}/logs/compare_runs.log",
    conda:
        ENV
    script:
        "../scripts/compare_runs.py"
