"""Which jobs a set of variants needs, each named by a key of what it depends on.

A variant's download, filter, training (or import), anchors and scenes are each a job whose
settings are exactly what its output depends on; the job's key hashes those settings together
with the keys of the jobs it reads from. Variants with equal settings get equal keys, so the
workflow (which names shared outputs `results/shared/<stage>/<key>`) plans the job once: a
generation-only sweep trains one LoRA, a rank sweep filters once. A setting that only names or
describes a run (run, bundle title, panel captions, layout, upload) is in no key (the trigger words
are, of a variant whose images are captioned: caption.template's {trigger}).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kolors_story.plan.config import needs_scorer, scene_settings
from kolors_story.plan.sweep import job_key
from kolors_story.writing.captions import CaptionSettings

IMAGE_KEYS = ("id", "prompt", "negative_prompt", "seed", "width", "height")  # what a panel depends on
# generate.* keys that are not sampler settings: per-scene values and the consistency switch
NOT_SAMPLER = ("seed", "width", "height", "consistency")
ANCHOR_CONSISTENCY_KEYS = ("steps_fraction", "max_tokens")  # what an anchor's recording depends on


@dataclass
class VariantJobs:
    """The keys of one variant's jobs (a character or scene id -> its job's key)."""

    name: str
    download: str
    filter: str
    lora: str  # the key of the train or import job
    imported: bool
    encoding: str = ""  # the key of the encode_texts job (the model's text encoder, one precision)
    captions: str | None = None  # the key of the caption_images job (None: caption.backend none)
    anchors: dict[str, str] = field(default_factory=dict)
    scenes: dict[str, str] = field(default_factory=dict)


@dataclass
class JobPlan:
    """Every distinct job of the variants: key -> the settings its rule passes as params."""

    encodings: dict[str, dict] = field(default_factory=dict)  # + "texts" and "filters", filled as planned
    downloads: dict[str, dict] = field(default_factory=dict)
    filters: dict[str, dict] = field(default_factory=dict)
    captions: dict[str, dict] = field(default_factory=dict)
    trainings: dict[str, dict] = field(default_factory=dict)
    imports: dict[str, dict] = field(default_factory=dict)
    anchors: dict[str, dict] = field(default_factory=dict)
    scenes: dict[str, dict] = field(default_factory=dict)
    variants: dict[str, VariantJobs] = field(default_factory=dict)

    def step_examples(self, data: str) -> dict | None:
        """What one optimizer step takes from the training folder `data` (a data_key), for its
        build_metadata job to refuse a dataset too small before any model loads: the strictest of
        the trainings that read it (several may share one folder), as {batch_size,
        gradient_accumulation, processes}; None when none trains on it."""
        steps = [{"batch_size": t["train"]["batch_size"], "gradient_accumulation": t["train"]["gradient_accumulation"],
                  "processes": t["processes"]} for t in self.trainings.values() if t["filter"] == data]
        return max(steps, key=lambda s: (s["batch_size"] * s["gradient_accumulation"] * s["processes"],
                                         sorted(s.items())), default=None)


def sampler_settings(config: dict) -> dict:
    """The generate keys a scene or anchor job renders by. compile_backend only with compile on: an
    eager job's images do not depend on it, so neither does its key."""
    gen = config["generate"]
    return {k: v for k, v in gen.items() if k not in NOT_SAMPLER and (k != "compile_backend" or gen["compile"])}


def consistency_settings(config: dict) -> dict:
    return {k: v for k, v in config["generate"]["consistency"].items() if k not in ("enabled", "seed")}


def train_params(train: dict) -> dict:
    """The training settings the job reads (processes and use_lora are passed apart or not at
    all; diffsynth_alpha only matters when init_lora is a DiffSynth file)."""
    return {k: v for k, v in train.items() if k not in ("use_lora", "processes")
            and (k != "diffsynth_alpha" or train["init_lora"])}


def _dataset_settings(dataset: dict) -> dict:
    """The dataset settings that key the download job. truncate_long_captions only where it is on:
    at its default the key (and every training behind it) is that of a config that never names it."""
    return {k: v for k, v in dataset.items() if k != "truncate_long_captions" or v}


def download_key(config: dict) -> str:
    """The key of the variant's download job (results/shared/download/<key>)."""
    return job_key({"dataset": _dataset_settings(config["dataset"])})


def caption_settings(config: dict) -> dict:
    """What a variant's captions depend on: what makes each image's caption (CaptionSettings.identity:
    not how the server is reached), how the template joins them, with the trigger words and the
    fallback caption it fills in."""
    caption = CaptionSettings(**config["caption"])
    return {"caption": {**caption.identity(), "template": caption.template, "keep_existing": caption.keep_existing},
            "trigger": config["bundle"]["trigger_words"], "default_caption": config["dataset"]["default_caption"]}


def data_key(jobs: VariantJobs) -> str:
    """The key of the variant's training folder (results/shared/data/<key>/dataset): its caption
    job's where it captions, else its filter job's (the filter's rows are its texts)."""
    return jobs.captions or jobs.filter


def _add(table: dict[str, dict], settings: dict) -> str:
    """The job's key (its settings hold the keys of the jobs it reads from), added once."""
    key = job_key(settings)
    table.setdefault(key, settings)
    return key


def encoding_settings(config: dict) -> dict:
    """One text-encoder job per model and models.text_encoder_precision (one setting for training
    and generation, so they share the job; each casts the stored embeddings to its own precision).
    Neither train.precision nor generate.precision reaches it: a generation-only sweep still
    shares one training."""
    models = config["models"]
    return {"kolors": models["kolors"], "precision": models["text_encoder_precision"]}


def _encoding_job(plan: JobPlan, config: dict) -> str:
    key = _add(plan.encodings, encoding_settings(config))
    plan.encodings[key].setdefault("texts", set())
    plan.encodings[key].setdefault("filters", set())
    return key


def _note_texts(plan: JobPlan, encoding: str, job: str, texts: list[str]) -> str:
    """The texts job `job` reads, added to its encode_texts job's; returns `job`."""
    plan.encodings[encoding]["texts"].update(texts)
    return job


def _lora_job(plan: JobPlan, config: dict, filter_key: str, encoding: str) -> tuple[str, bool]:
    """The train or import job; `filter_key` is the training folder's key (data_key)."""
    models, train = config["models"], config["train"]
    if train["use_lora"]:
        settings = {"use_lora": train["use_lora"], "diffsynth_alpha": train["diffsynth_alpha"],
                    "kolors": models["kolors"]}
        return _add(plan.imports, settings), True
    settings = {"filter": filter_key, "train": train_params(train), "processes": train["processes"],
                "kolors": models["kolors"], "encoding": encoding,
                "aesthetic": models["aesthetic"] if train["validation"]["every"] else None}
    plan.encodings[encoding]["filters"].add(filter_key)  # its captions
    validation = [t for p in train["validation"]["prompts"] for t in (p["prompt"], p["negative_prompt"])]
    return _note_texts(plan, encoding, _add(plan.trainings, settings), validation), False


def anchor_settings(config: dict, character: str) -> dict:
    """A character's anchor: style + description, the story's negative prompt, the panel size."""
    story, gen = config["story"], config["generate"]
    prompt = "，".join(p for p in (story["style"], story["characters"][character]) if p)
    return {"id": character, "prompt": prompt, "negative_prompt": story["negative_prompt"],
            "seed": gen["consistency"]["seed"], "width": gen["width"], "height": gen["height"]}


def _scene_jobs(plan: JobPlan, config: dict, scenes: dict[str, dict], jobs: VariantJobs) -> None:
    gen, sampler = config["generate"], sampler_settings(config)
    consistency = consistency_settings(config) if gen["consistency"]["enabled"] else None
    base = {"kolors": config["models"]["kolors"], "sampler": sampler, "lora": jobs.lora,
            "imported": jobs.imported, "encoding": jobs.encoding}
    for scene_id, scene in scenes.items():
        prompts = 1 + len(scene["alternatives"])
        scorer = config["models"]["aesthetic"] if needs_scorer(gen["candidates"], gen["lora_scale"], prompts) else None
        anchors = [[c, jobs.anchors[c]] for c in scene["characters"]] if consistency else []
        image = {k: scene[k] for k in IMAGE_KEYS}
        if scene["alternatives"]:  # only then: a scene without them keeps the key it always had
            image["alternatives"] = scene["alternatives"]
        settings = {**base, "scene": image, "anchors": anchors,
                    "consistency": consistency if anchors else None, "aesthetic": scorer}
        jobs.scenes[scene_id] = _note_texts(plan, jobs.encoding, _add(plan.scenes, settings),
                                            [scene["prompt"], *scene["alternatives"], scene["negative_prompt"]])


def _anchor_jobs(plan: JobPlan, config: dict, scenes: dict[str, dict], jobs: VariantJobs) -> None:
    if not config["generate"]["consistency"]["enabled"]:
        return
    recording = {k: config["generate"]["consistency"][k] for k in ANCHOR_CONSISTENCY_KEYS}
    shown = sorted({c for s in scenes.values() for c in s["characters"]})
    for character in shown:
        anchor = anchor_settings(config, character)
        settings = {"kolors": config["models"]["kolors"], "sampler": sampler_settings(config),
                    "lora": jobs.lora, "imported": jobs.imported, "encoding": jobs.encoding,
                    "consistency": recording, "anchor": anchor}
        jobs.anchors[character] = _note_texts(plan, jobs.encoding, _add(plan.anchors, settings),
                                              [anchor["prompt"], anchor["negative_prompt"]])


def plan_jobs(variants: dict[str, dict]) -> JobPlan:
    """The jobs of every variant (validated configs), shared where their settings match."""
    plan = JobPlan()
    for name, config in variants.items():
        download = _add(plan.downloads, {"dataset": _dataset_settings(config["dataset"])})
        filter_key = _add(plan.filters, {"download": download, "ops": config["filter"]["ops"],
                                         "num_proc": config["filter"]["num_proc"]})
        captions = None
        if config["caption"]["backend"] != "none":
            captions = _add(plan.captions, {"filter": filter_key, **caption_settings(config)})
        encoding = _encoding_job(plan, config)
        lora, imported = _lora_job(plan, config, captions or filter_key, encoding)
        jobs = VariantJobs(name, download, filter_key, lora, imported, encoding, captions=captions)
        scenes = scene_settings(config)  # once: it tokenizes every prompt
        _anchor_jobs(plan, config, scenes, jobs)
        _scene_jobs(plan, config, scenes, jobs)
        plan.variants[name] = jobs
    for job in plan.encodings.values():  # plain sorted lists: params Snakemake compares across runs
        job["texts"], job["filters"] = sorted(job["texts"]), sorted(job["filters"])
    return plan
