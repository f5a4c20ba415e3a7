# The scene prompts of a story given as story.outline, written by a language model
# (kolors_story.writing: DashScope's OpenAI-compatible mode by default, any server by base_url).
# A checkpoint: a variant's scenes, and so its encode, scene and anchor jobs, are planned once its
# file exists (rules/common.smk, plan()). The job is keyed by what it sends and copies
# (kolors_story.plan.outline), and replies are cached by request under CACHE/llm: an unchanged
# outline never asks again, and scenes whose prompt came back unchanged never render again.


checkpoint write_prompts:
    input:
        unpack(writer_inputs),
    output:
        scenes=writer_file("{key}", "scenes"),
        transcript=writer_file("{key}", "transcript"),
    params:
        story=lambda wc: writer_job(wc)["story"],
        rules=lambda wc: writer_job(wc)["rules"],
        writer=writer_params,  # the API key's variable name, never the key
        cache_dir=f"{CACHE}/llm",
        model_content=lambda wc: model_content(writer_job(wc)["local_model"]),  # replies of other weights are not reused
    resources:
        gpu=lambda wc: 1 if writer_job(wc)["local_model"] else 0,  # backend local: the model in this job
    log:
        f"{SHARED}/logs/write_prompts/{{key}}.log",  # and beside it {key}.jsonl: every request and reply
    conda:
        ENV
    script:
        "../scripts/write_prompts.py"


rule copy_prompts:
    """The variant's written scenes (they paste into story.scenes) and the writer's transcript."""
    input:
        prompts=variant_writer_file("scenes"),
        transcript=variant_writer_file("transcript"),
    output:
        prompts=report(run_file("{run}", "prompts"), caption="../report/prompts.rst", category="{run}",
                       subcategory="Config"),
        transcript=run_file("{run}", "transcript"),
    log:
        f"{RUN_DIR}/logs/copy_prompts.log",
    conda:
        ENV
    script:
        "../scripts/copy_outputs.py"
