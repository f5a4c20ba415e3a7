# Style dataset: download or collect, clean with Data-Juicer, lay out for training. Keyed by the
# dataset settings (download) and the filter settings (filter, metadata): variants that differ in
# neither share the chain.


rule build_demo_dataset:
    output:
        directory("resources/demo/dataset"),
    params:
        seed=0,
    log:
        "resources/logs/build_demo_dataset.log",
    conda:
        ENV
    script:
        "../scripts/build_demo_dataset.py"


rule download_dataset:
    input:
        dataset_input,
    output:
        rows=download_file("{key}", "rows"),
        images=directory(download_file("{key}", "images")),
        stats=download_file("{key}", "stats"),
        content=download_file("{key}", "content"),
    params:
        dataset=download_settings,
        content=dataset_content,  # a local folder's files: an edited, added or removed one reruns the chain
        content_cache=CONTENT_CACHE,
        needed=STILL_NEEDED,  # every hub download of the run: offline, one failure names them all
    log:
        f"{SHARED}/logs/download_dataset/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/download_dataset/{{key}}.tsv"
    # No Snakemake retries: offline, the job must fail once; the hub client retries its own requests
    conda:
        ENV
    script:
        "../scripts/download_dataset.py"


rule filter_dataset:
    input:
        rows=filter_input("rows"),
        images=filter_input("images"),
        download_stats=filter_input("stats"),
    output:
        rows=filter_file("{key}", "rows"),
        stats=filter_file("{key}", "stats"),
        dropped=filter_file("{key}", "dropped"),
    params:
        ops=lambda wc: filter_job(wc)["ops"],
        num_proc=lambda wc: filter_job(wc)["num_proc"],
        work_dir=f"{SHARED}/data/{{key}}/data_juicer",
    log:
        f"{SHARED}/logs/filter_dataset/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/filter_dataset/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/filter_dataset.py"


rule caption_images:
    """One caption per kept image (caption.backend data_juicer or openai; none: no such job, and
    build_metadata reads the filter's rows). Keyed by the filter job and the caption settings
    (kolors_story.plan.job_plan.caption_settings); each image's caption is cached under
    CACHE/captions by its bytes and what makes a caption, not the template: a template edit or a
    rerun captions nothing again, an added image captions that image only."""
    input:
        unpack(caption_inputs),
    output:
        rows=caption_file("{key}", "rows"),
        record=caption_file("{key}", "record"),
        page=caption_file("{key}", "page"),
    params:
        caption=caption_params,  # the API key's variable name, never the key
        model_content=caption_model_content,
        trigger=lambda wc: caption_job(wc)["trigger"],
        default_caption=lambda wc: caption_job(wc)["default_caption"],
        cache_dir=f"{CACHE}/captions",
    resources:
        gpu=lambda wc: 1 if caption_job(wc)["caption"]["backend"] == "data_juicer" else 0,  # its own job: freed before training
    log:
        f"{SHARED}/logs/caption_images/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/caption_images/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/caption_images.py"


rule build_metadata:
    input:
        rows=metadata_rows,
    output:
        directory(training_folder("{key}")),
    params:
        truncate=truncate_captions,
    log:
        f"{SHARED}/logs/build_metadata/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/build_metadata/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/build_metadata.py"


rule copy_data_stats:
    """The variant's filter statistics and dropped images, for its report and manifest."""
    input:
        stats=lambda wc: filter_file(variant_jobs(wc).filter, "stats"),
        dropped=lambda wc: filter_file(variant_jobs(wc).filter, "dropped"),
    output:
        stats=report(run_data_file("{run}", FILTER_FILES["stats"]), caption="../report/filter.rst",
                     category="{run}", subcategory="Data"),
        dropped=report(run_data_file("{run}", FILTER_FILES["dropped"]), caption="../report/dropped.rst",
                       category="{run}", subcategory="Data"),
    log:
        f"{RUN_DIR}/logs/copy_data_stats.log",
    conda:
        ENV
    script:
        "../scripts/copy_data_stats.py"


rule copy_captions:
    """The variant's captions: each kept image beside its training text and where it came from."""
    input:
        record=lambda wc: caption_file(variant_jobs(wc).captions, "record"),
        page=lambda wc: caption_file(variant_jobs(wc).captions, "page"),
    output:
        record=run_data_file("{run}", CAPTION_FILES["record"]),
        page=report(run_data_file("{run}", CAPTION_FILES["page"]), caption="../report/captions.rst",
                    category="{run}", subcategory="Data"),
    log:
        f"{RUN_DIR}/logs/copy_captions.log",
    conda:
        ENV
    script:
        "../scripts/copy_outputs.py"
