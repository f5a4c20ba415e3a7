# The text encoder, once per Kolors model and models.text_encoder_precision (one precision for
# training and generation, so both share the job): every caption (from the training folders'
# metadata.csv, its inputs), validation prompt, scene and anchor prompt and negative prompt of every
# variant, sorted and deduplicated (kolors_story.job_plan), into one embeddings file in the
# encoder's own dtype; consumers cast at use. Encoding goes through the content-keyed cache under
# CACHE: after one prompt is edited this job reruns and encodes that one text (ChatGLM loaded once,
# and only when a text is missing). Training, anchor and scene jobs read the file and never load
# ChatGLM. They take it as ancient(): a rerun of this job does not rerun them by itself; each
# reruns when its own params (its prompt, its captions' dataset) changed.
#
# The text markers (rule note_text, one tiny JSON per text, named by the text's digest): inputs of
# the encode job and of each job that reads the text. They are there for Snakemake 9 (issue
# snakemake/snakemake#4166): when the encode job reruns, every job downstream of it is decided
# only through it, and one whose inputs from it are all ancient() and present is skipped, even a
# new one (an edited prompt is a new scene job). The new text's marker is missing, so the encode
# job pulls it in and it pulls in exactly the jobs that read the new text. Limit: a job that is new
# for another reason (say generate.lora_scale) in the same edit as a new text is planned by the
# next `snakemake` call, not this one.


rule encode_texts:
    input:
        unpack(encode_inputs),
    output:
        f"{SHARED}/embeddings/{{key}}/{EMBEDDINGS_FILE}",
    params:
        texts=lambda wc: PLAN.encodings[wc.key]["texts"],  # + the captions of the datasets (inputs)
        precision=lambda wc: PLAN.encodings[wc.key]["precision"],
        cache_dir=CACHE,
    resources:
        gpu=1,
    log:
        f"{SHARED}/logs/encode_texts/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/encode_texts/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/encode_texts.py"


rule note_text:
    """One text of an encode job, by its digest: a marker (see the top of this file)."""
    output:
        f"{SHARED}/embeddings/{{key}}/texts/{{text}}.json",
    params:
        text=lambda wc: TEXT_NAMES[(wc.key, wc.text)],
    log:
        f"{SHARED}/logs/note_text/{{key}}/{{text}}.log",
    run:
        write_text_marker(output[0], params.text, log[0])
