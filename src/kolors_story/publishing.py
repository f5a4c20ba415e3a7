"""The ModelScope model folder (LoRA, model card, panels, prompts) and its optional upload.

The token comes from env MODELSCOPE_API_TOKEN only, never from config or params (Snakemake stores
params as plain text), and never appears in returned values, logs or errors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml
from PIL import Image

from kolors_story.errors import UserError
from kolors_story.kolors_folder import KolorsFolder

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Oldest diffusers whose KolorsPipeline.load_lora_weights loads this file at its strength (read
# in diffusers' release tags): KolorsPipeline arrived in 0.30.0 with the SDXL LoRA mixin, which
# then touched text_encoder_2 only for text_encoder_2 keys (0.33.0 moved Kolors to the SD mixin);
# the safetensors metadata is read only from 0.34.0, and without it alpha = rank, which the
# folded file (lora_io.folded) already states.
MIN_DIFFUSERS = "0.30.0"
TOKEN_ENV = "MODELSCOPE_API_TOKEN"
PASS_THRESHOLD = 6.0
REQUIRED_SCENE_KEYS = ("id", "prompt", "seed", "image")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SAFE_ID = re.compile(r"^[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Bundle
# ---------------------------------------------------------------------------------------------


def _require_file(path: Path, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}.")
    return path


def _check_scenes(scenes: list[dict]) -> None:
    """Every scene needs an id usable as a file name, a prompt, a seed and its panel image."""
    if not scenes:
        raise UserError("No scenes to put in the bundle; config key `story.scenes` is empty.")
    seen: set[str] = set()
    for index, scene in enumerate(scenes):
        missing = [key for key in REQUIRED_SCENE_KEYS if scene.get(key) is None]
        if missing:
            raise UserError(
                f"Scene {index} ({scene.get('id', 'no id')}) lacks {', '.join(missing)}; "
                "set them under config key `story.scenes`."
            )
        scene_id = str(scene["id"])
        if not _SAFE_ID.match(scene_id) or scene_id in seen:
            raise UserError(
                f"Scene id {scene_id!r} under `story.scenes` must be unique and use only letters, "
                "digits, '_', '-' or '.' (it names the panel file)."
            )
        seen.add(scene_id)
        _require_file(scene["image"], f"Panel of scene {scene_id!r}", "generate the scene first")


def _per_image_scores(scores: dict) -> tuple[dict[str, float], float, float]:
    """Per-image scores, mean and threshold from a scores.json summary (or a bare name->score map)."""
    per_image = scores["scores"] if "scores" in scores else scores
    per_image = {str(k): float(v) for k, v in per_image.items()}
    mean = scores.get("mean", sum(per_image.values()) / len(per_image) if per_image else 0.0)
    return per_image, float(mean), float(scores.get("threshold", PASS_THRESHOLD))


def _scene_score(scene: dict, per_image: dict[str, float]) -> float | None:
    """A scene's score is keyed by its panel's file name (as scoring writes it), else by id."""
    name = Path(scene["image"]).name
    for key in (name, f"{scene['id']}.png", str(scene["id"])):
        if key in per_image:
            return per_image[key]
    return None


def _copy_png(src: Path, dst: Path) -> None:
    """PNG files are copied byte for byte; other formats are converted so the card shows PNGs."""
    if Path(src).suffix.lower() == ".png":
        shutil.copyfile(src, dst)
    else:
        with Image.open(src) as image:
            image.save(dst, format="PNG")


def _scene_records(scenes: list[dict], per_image: dict[str, float]) -> list[dict]:
    """prompts.json rows: what renders each panel again, plus its score."""
    records = []
    for scene in scenes:
        record = {
            "id": str(scene["id"]),
            "prompt": scene["prompt"],
            "negative_prompt": scene.get("negative_prompt") or "",
            "seed": int(scene["seed"]),
            "width": scene.get("width"),
            "height": scene.get("height"),
        }
        for extra in ("steps", "guidance_scale", "sampler", "lora_scale"):
            if scene.get(extra) is not None:
                record[extra] = scene[extra]
        record["image"] = f"panels/{record['id']}.png"
        record["score"] = _scene_score(scene, per_image)
        records.append(record)
    return records


def _md_cell(text: object) -> str:
    """Table cells: one line, pipes escaped."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _fmt_score(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.3f}"


def _front_matter(base_model: str) -> str:
    meta = {
        "frameworks": ["Pytorch"],
        "license": "apache-2.0",
        "tasks": ["text-to-image-synthesis"],
        "base_model": [base_model],
        "base_model_relation": "adapter",
    }
    return "---\n" + yaml.safe_dump(meta, allow_unicode=True, sort_keys=False) + "---\n"


def _is_local(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).exists()


def _usage_snippet(base_model: str, records: list[dict], repo_id: str | None) -> str:
    first = records[0]
    call = [f"    prompt={json.dumps(first['prompt'], ensure_ascii=False)},"]
    if first["negative_prompt"]:
        call.append(f"    negative_prompt={json.dumps(first['negative_prompt'], ensure_ascii=False)},")
    for key, arg in (("width", "width"), ("height", "height"), ("steps", "num_inference_steps"),
                     ("guidance_scale", "guidance_scale")):
        if first.get(key) is not None:
            call.append(f"    {arg}={first[key]!r},")
    call.append(f'    generator=torch.Generator("cpu").manual_seed({first["seed"]}),')
    lora_repo = repo_id or "<owner>/<this-repo>"
    if _is_local(base_model):  # a local base (e.g. the demo's tiny model): its own variant, if any
        base_line, load_args = f"base_dir = {json.dumps(base_model)}", ""
        if Path(base_model).is_dir() and KolorsFolder(base_model).variant:
            load_args = f', variant="{KolorsFolder(base_model).variant}"'
    else:  # Kolors-diffusers on the hub ships fp16 weights only
        base_line = f'base_dir = snapshot_download("{base_model}")'
        load_args = ', torch_dtype=torch.float16, variant="fp16"'
    return "\n".join(
        [
            "```python",
            "import torch",
            "from diffusers import KolorsPipeline",
            "from modelscope import snapshot_download",
            "",
            base_line,
            f'lora_dir = snapshot_download("{lora_repo}")',
            f'pipe = KolorsPipeline.from_pretrained(base_dir{load_args}).to("cuda")',
            f'pipe.load_lora_weights(lora_dir, weight_name="{LORA_WEIGHT_NAME}")',
            "image = pipe(",
            *call,
            ").images[0]",
            'image.save("panel.png")',
            "```",
        ]
    )


def _model_card(
    title: str, base_model: str, trigger_words: str, run_name: str, records: list[dict],
    mean: float, threshold: float, repo_id: str | None,
) -> str:
    passes = mean >= threshold
    rows = [
        f"| {_md_cell(r['id'])} | ![{_md_cell(r['id'])}]({r['image']}) | {_md_cell(r['prompt'])} | "
        f"{r['seed']} | {_fmt_score(r['score'])} |"
        for r in records
    ]
    verdict = "passes" if passes else "does not pass"
    lines = [
        _front_matter(base_model),
        f"# {title}",
        "",
        f"A style LoRA for the Kolors text-to-image model, trained by the `kolors_story` workflow "
        f"(run `{run_name}`), with the illustrated story it rendered.",
        "",
        f"- Base model: `{base_model}`",
        f"- LoRA weights: `{LORA_WEIGHT_NAME}` (diffusers format, UNet attention layers)",
        f"- Loads with `KolorsPipeline.load_lora_weights` in diffusers >= {MIN_DIFFUSERS} (the first "
        "release with KolorsPipeline), with peft installed. The LoRA scale (alpha / rank) is folded "
        "into the weights and the metadata says lora_alpha = rank, so loaders that ignore the "
        "safetensors metadata (diffusers before 0.34.0, other tools) apply the same strength.",
        f"- Trigger / style words: {trigger_words or '(none; the style applies without trigger words)'}",
        "",
        "## Usage",
        "",
        _usage_snippet(base_model, records, repo_id),
        "",
        "## Story",
        "",
        "![story](story.png)",
        "",
        "| Scene | Panel | Prompt | Seed | Aesthetic score |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Mean aesthetic score (AestheticsPredictorV2Linear, sac+logos+ava1-l14-linearMSE): "
        f"**{mean:.3f}** over {len(records)} panels; it {verdict} the threshold {threshold:g}.",
        "",
        "All prompts, negative prompts, seeds and sizes are in `prompts.json`.",
        "",
    ]
    return "\n".join(lines)


def _replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Swap the finished folder in, so a failed build never leaves a half-written bundle."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)


def build_bundle(
    out_dir: Path,
    lora_file: Path,
    scenes: list[dict],
    scores: dict,
    story_image: Path,
    base_model: str,
    title: str,
    trigger_words: str,
    run_name: str,
    repo_id: str | None = None,
) -> Path:
    """Write the ModelScope model folder; an existing `out_dir` is replaced as a whole.

    `scores` is the scores.json summary (write_scores' return). `repo_id`, when known, goes into
    the usage snippet.
    """
    out_dir = Path(out_dir)
    _require_file(lora_file, "LoRA weights", "run the training step first")
    _require_file(story_image, "Story image", "run the compose step first")
    _check_scenes(scenes)
    per_image, mean, threshold = _per_image_scores(scores)
    records = _scene_records(scenes, per_image)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copyfile(lora_file, tmp_dir / LORA_WEIGHT_NAME)
        (tmp_dir / "panels").mkdir()
        for scene, record in zip(scenes, records):
            _copy_png(Path(scene["image"]), tmp_dir / record["image"])
        _copy_png(Path(story_image), tmp_dir / "story.png")
        prompts = {"title": title, "base_model": base_model, "trigger_words": trigger_words,
                   "run": run_name, "mean_score": mean, "threshold": threshold,
                   "passes": mean >= threshold, "scenes": records}
        (tmp_dir / "prompts.json").write_text(
            json.dumps(prompts, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        card = _model_card(title, base_model, trigger_words, run_name, records, mean, threshold, repo_id)
        (tmp_dir / "README.md").write_text(card, encoding="utf-8")
        _replace_dir(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------


def modelscope_token() -> str:
    """The ModelScope token from env MODELSCOPE_API_TOKEN (the only place it is read from)."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UserError(
            f"Uploading needs a ModelScope access token in the environment variable {TOKEN_ENV}: "
            f"create one at https://modelscope.cn/my/myaccesstoken, then `export {TOKEN_ENV}=...` "
            "before running snakemake (never put it in config.yaml). Or set `upload.enabled: false`."
        )
    return token


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _check_upload_args(bundle_dir: Path, repo_id: str, visibility: str) -> None:
    if not repo_id or not _REPO_ID.match(repo_id):
        raise UserError(
            f"ModelScope repo id {repo_id!r} is not of the form owner/name; set config key "
            "`upload.repo_id`, e.g. your-name/kolors-ink-lora."
        )
    if visibility not in ("public", "private"):
        raise UserError(
            f"Visibility {visibility!r} is not public or private; fix config key `upload.visibility`."
        )
    for name in (LORA_WEIGHT_NAME, "README.md"):
        _require_file(Path(bundle_dir) / name, "Bundle file", "build the bundle before uploading")


def upload_bundle(
    bundle_dir: Path,
    repo_id: str,
    visibility: str = "public",
    commit_message: str = "Upload Kolors style LoRA bundle",
) -> dict:
    """Create the model repo if needed and push the bundle folder; return {repo_id, url}.

    Hub failures become a UserError naming the repo id, with the token scrubbed out and the
    original exception not chained (its traceback could carry request details).
    """
    from modelscope.hub.api import HubApi  # heavy import; only the upload step needs it

    bundle_dir = Path(bundle_dir)
    _check_upload_args(bundle_dir, repo_id, visibility)
    token = modelscope_token()
    try:
        api = HubApi(token=token)
        api.login(token)
        api.create_repo(repo_id, visibility=visibility, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(bundle_dir), commit_message=commit_message)
        endpoint = str(api.endpoint).rstrip("/")
    except Exception as exc:  # noqa: BLE001 - every hub failure is reported the same way
        detail = _scrub(f"{type(exc).__name__}: {exc}", token)
        failure = UserError(
            f"Upload of {bundle_dir} to ModelScope repo {repo_id} failed ({detail}). Check the "
            f"network, that the token in {TOKEN_ENV} is valid with write access, and that you own "
            "`upload.repo_id`; then rerun."
        )
    else:
        return {"repo_id": repo_id, "url": f"{endpoint}/models/{repo_id}", "visibility": visibility}
    raise failure from None
