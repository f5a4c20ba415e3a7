# Per variant: the challenge score, the ModelScope bundle (and opt-in upload), the manifest.
# Across a sweep's variants: the leaderboard.
from kolors_story.plan.prompts import cut_texts


rule score_images:
    input:
        unpack(lambda wc: model_inputs("aesthetic", variant_config(wc)["models"]["aesthetic"])),
        panels=variant_panels,
        candidates=variant_candidates,
    output:
        csv=report(run_file("{run}", "scores_csv"), caption="../report/scores.rst", category="{run}",
                   subcategory="Scores"),
        json=run_file("{run}", "scores"),
    params:
        threshold=lambda wc: variant_config(wc)["score"]["threshold"],
        characters=lambda wc: {s: v["characters"] for s, v in plan().scenes[wc.run].items()},
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
        story=run_file("{run}", "story"),
        scores=run_file("{run}", "scores"),
    output:
        directory(run_file("{run}", "bundle")),
    params:
        scenes=lambda wc: list(plan().scenes[wc.run].values()),
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
        run_file("{run}", "bundle"),
    output:
        run_file("{run}", "upload"),
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
        manifest=run_file("{run}", "manifest"),
        config=report(run_file("{run}", "config"), caption="../report/config.rst", category="{run}",
                      subcategory="Config"),
        timings=report(run_file("{run}", "timings"), caption="../report/timings.rst", category="{run}",
                       subcategory="Timings"),
    params:
        config=variant_config,
        seeds=lambda wc: {"train": variant_config(wc)["train"]["seed"],
                          **{s: v["seed"] for s, v in plan().scenes[wc.run].items()}},
        benchmark_labels=lambda wc: list(gpu_benchmarks(wc)),
        jobs=lambda wc: {k: v for k, v in vars(variant_jobs(wc)).items() if k != "captions" or v},  # no captioner: no key
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
        scores=[run_file(v, "scores") for v in VARIANTS],
        stories=[run_file(v, "story") for v in VARIANTS],
        configs=[run_file(v, "config") for v in VARIANTS],
    output:
        csv=LEADERBOARD_FILES["csv"],
        png=report(LEADERBOARD_FILES["png"], caption="../report/leaderboard.rst", category=LEADERBOARD),
    params:
        variants=list(VARIANTS),
    log:
        f"{SHARED}/logs/compare_runs.log",
    conda:
        ENV
    script:
        "../scripts/compare_runs.py"
