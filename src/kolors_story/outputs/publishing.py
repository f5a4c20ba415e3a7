"""The ModelScope model folder (LoRA, model card, panels, prompts). Its upload: hub_upload."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml
from PIL import Image

from kolors_story.errors import UserError
from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.models.lora.any_format import lora_rank
from kolors_story.outputs.bundle_formats import bundle_names, file_stem, tools_section
from kolors_story.render.candidates_file import CandidateRecord
from kolors_story.render.samplers import scheduler_code
from kolors_story.files import share_as_umask_allows, write_json
from kolors_story.run_files import LORA_WEIGHT_NAME

# Oldest diffusers whose KolorsPipeline.load_lora_weights loads this file at its strength (read
# in diffusers' release tags): KolorsPipeline arrived in 0.30.0 with the SDXL LoRA mixin, which
# then touched text_encoder_2 only for text_encoder_2 keys (0.33.0 moved Kolors to the SD mixin);
# the safetensors metadata is read only from 0.34.0, and without it alpha = rank, which the
# folded file (models.lora.weights.folded) already states.
MIN_DIFFUSERS = "0.30.0"
PASS_THRESHOLD = 6.0
_SAFE_ID = re.compile(r"^[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Bundle
# ---------------------------------------------------------------------------------------------


def _require_file(path: Path, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}.")
    return path


def _check_panels(panels: Sequence[Path], records: Sequence[CandidateRecord]) -> None:
    """One record per panel; scene ids usable as file names; every panel image present."""
    if not records:
        raise UserError("No scenes to put in the bundle; config key `story.scenes` is empty.")
    if len(panels) != len(records):
        raise ValueError(f"{len(panels)} panels but {len(records)} candidate records")
    seen: set[str] = set()
    for panel, record in zip(panels, records):
        if not _SAFE_ID.match(record.scene) or record.scene in seen:
            raise UserError(
                f"Scene id {record.scene!r} under `story.scenes` must be unique and use only letters, "
                "digits, '_', '-' or '.' (it names the panel file)."
            )
        seen.add(record.scene)
        _require_file(panel, f"Panel of scene {record.scene!r}", "generate the scene first")


def _per_image_scores(scores: dict) -> tuple[dict[str, float], float, float]:
    """Per-image scores, mean and threshold from a scores.json summary (or a bare name->score map)."""
    per_image = scores["scores"] if "scores" in scores else scores
    per_image = {str(k): float(v) for k, v in per_image.items()}
    mean = scores.get("mean", sum(per_image.values()) / len(per_image) if per_image else 0.0)
    return per_image, float(mean), float(scores.get("threshold", PASS_THRESHOLD))


def _scene_score(panel: Path, scene_id: str, per_image: dict[str, float]) -> float | None:
    """A scene's score is keyed by its panel's file name (as scoring writes it), else by id."""
    for key in (Path(panel).name, f"{scene_id}.png", scene_id):
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


def _panel_rows(panels: Sequence[Path], records: Sequence[CandidateRecord],
                per_image: dict[str, float]) -> list[dict]:
    """prompts.json rows: each panel's full recipe (the kept candidate's), how it was picked, its score."""
    rows = []
    for panel, record in zip(panels, records):
        recipe = record.recipe()
        rows.append({**recipe.to_json(), "stock_diffusers": recipe.stock_diffusers,
                     "selection": record.selection(), "image": f"panels/{record.scene}.png",
                     "score": _scene_score(panel, record.scene, per_image)})
    return rows


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


def _snippet_row(rows: list[dict]) -> dict:
    """The panel the snippet renders: the first one stock diffusers reproduces, if any."""
    return next((r for r in rows if r["stock_diffusers"]), rows[0])


def _base_lines(base_model: str) -> tuple[str, str]:
    """The base model's line and from_pretrained's variant argument."""
    if _is_local(base_model):  # a local base (e.g. the demo's tiny model): its own variant, if any
        variant = KolorsFolder(base_model).variant if Path(base_model).is_dir() else None
        return f"base_dir = {json.dumps(base_model)}", f', variant="{variant}"' if variant else ""
    # Kolors-diffusers on the hub ships fp16 weights only
    return f'base_dir = snapshot_download("{base_model}")', ', variant="fp16"'


def _usage_snippet(base_model: str, rows: list[dict], repo_id: str | None) -> str:
    """Stock diffusers code that renders one panel again from prompts.json (bitwise on the
    recipe's device type and dtype): sampler, LoRA scale, size, steps, CFG, seeds, prompts."""
    row = _snippet_row(rows)
    scheduler_import, scheduler_line = scheduler_code(row["sampler"])
    base_line, variant = _base_lines(base_model)
    caveat = [] if row["stock_diffusers"] else [
        "# Every panel of this story shares attention with character anchors (prompts.json:",
        "# consistency), which stock diffusers does not do: this renders the recipe without them.",
        "# The panel itself: kolors-story-reproduce (see below).",
    ]
    threads = [] if row.get("runtime") is None else [  # a CPU render's last bits depend on it
        'torch.set_num_threads(panel["runtime"]["torch_threads"])  # as many threads as the scene job']
    return "\n".join([
        "```python", *caveat, "import json", "", "import torch", "from diffusers import KolorsPipeline",
        scheduler_import, "from modelscope import snapshot_download", "",
        base_line,
        f'lora_dir = snapshot_download("{repo_id or "<owner>/<this-repo>"}")',
        'with open(f"{lora_dir}/prompts.json", encoding="utf-8") as f:',
        f'    panel = next(s for s in json.load(f)["scenes"] if s["id"] == {json.dumps(row["id"])})',
        *threads,
        f'pipe = KolorsPipeline.from_pretrained(base_dir, torch_dtype=getattr(torch, panel["dtype"]){variant})',
        scheduler_line,
        f'pipe.load_lora_weights(lora_dir, weight_name="{LORA_WEIGHT_NAME}", adapter_name="style")',
        'pipe.set_adapters(["style"], adapter_weights=[panel["lora_scale"]])',
        'if panel["lora_fused"]:  # merged into the UNet, as the scene job rendered it',
        '    pipe.fuse_lora(components=["unet"], adapter_names=["style"])',
        "pipe.vae.enable_slicing()  # the candidates were decoded one at a time",
        'pipe.to(panel["device"])  # bit for bit only on the device type and dtype it was rendered with',
        "# The seed was drawn in one batch with the other candidates: the same batch redraws it exactly",
        '# (generator=torch.Generator("cpu").manual_seed(panel["seed"]) alone: up to rounding).',
        'seeds = panel["batch_seeds"]',
        "images = pipe(",
        '    prompt=panel["prompt"],',
        '    negative_prompt=panel["negative_prompt"] or None,  # empty: the default, as when rendered',
        '    width=panel["width"],',
        '    height=panel["height"],',
        '    num_inference_steps=panel["steps"],',
        '    guidance_scale=panel["guidance_scale"],',
        "    num_images_per_prompt=len(seeds),",
        '    generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],',
        ").images",
        f'images[panel["batch_index"]].save("{row["id"]}.png")',
        "```",
    ])


_REPRODUCE = (
    "Each panel's full recipe is in `prompts.json`: prompt, negative prompt, seed, size, sampler, "
    "steps, CFG (`guidance_scale`), LoRA scale, dtype and device type, the seeds of the batch its "
    "seed was drawn in (`batch_seeds`, `batch_index`), how best-of-N picked it (`selection`) and, "
    "for character-consistency panels, the attention-sharing settings and each character anchor's "
    "recipe (`consistency`). The snippet above renders a panel with `stock_diffusers: true` again. "
    "A panel with `consistency` shares self-attention with character anchors, which stock "
    "diffusers cannot do; with the `kolors_story` project installed, "
    "`kolors-story-reproduce <this folder> <Kolors-diffusers folder> <scene id> out.png` "
    "records the anchors again from their recipes and renders the panel on the torch thread count "
    "each job recorded (`runtime`). Both are bit for bit on the recipe's device type and dtype with "
    "the `runtime` recorded (thread count, library versions, CPU kernels, GPU); elsewhere, the same "
    "picture up to rounding."
)


def _table_row(r: dict) -> str:
    anchors = "+".join(a["id"] for a in r["consistency"]["anchors"]) if r["consistency"] else "-"
    return (f"| {_md_cell(r['id'])} | ![{_md_cell(r['id'])}]({r['image']}) | {_md_cell(r['prompt'])} | "
            f"{r['seed']} | {r['sampler']} | {r['steps']} | {r['guidance_scale']:g} | {r['lora_scale']:g} | "
            f"{r['width']}x{r['height']} | {_md_cell(anchors)} | {_fmt_score(r['score'])} |")


def _model_card(card: ModelCard, records: list[dict], mean: float, threshold: float,
                names: dict[str, str], rank: int | None) -> str:
    """README.md: names is format -> file in the bundle, rank the LoRA's (for DiffSynth's line)."""
    title, base_model, trigger_words, run_name = card.title, card.base_model, card.trigger_words, card.run_name
    passes = mean >= threshold
    rows = [_table_row(r) for r in records]
    verdict = "passes" if passes else "does not pass"
    lines = [
        _front_matter(base_model),
        f"# {title}",
        "",
        f"A style LoRA for the Kolors text-to-image model, trained by the `kolors_story` workflow "
        f"(run `{run_name}`), with the illustrated story it rendered.",
        "",
        f"- Base model: `{base_model}`",
        f"- LoRA weights: {', '.join(f'`{n}` ({f})' for f, n in names.items())}: UNet layers, one "
        "update in each tool's format (table below)",
        f"- Loads with `KolorsPipeline.load_lora_weights` in diffusers >= {MIN_DIFFUSERS} (the first "
        "release with KolorsPipeline), with peft installed. The LoRA scale (alpha / rank) is folded "
        "into the weights and the metadata says lora_alpha = rank, so loaders that ignore the "
        "safetensors metadata (diffusers before 0.34.0, other tools) apply the same strength.",
        f"- Trigger / style words: {trigger_words or '(none; the style applies without trigger words)'}",
        "",
        "## Usage",
        "",
        _usage_snippet(base_model, records, card.repo_id),
        "",
        *tools_section(names, rank, [r["lora_scale"] for r in records]),
        "",
        "## Story",
        "",
        "![story](story.png)",
        "",
        "| Scene | Panel | Prompt | Seed | Sampler | Steps | CFG | LoRA scale | Size | Anchors | Aesthetic score |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Mean aesthetic score (AestheticsPredictorV2Linear, sac+logos+ava1-l14-linearMSE): "
        f"**{mean:.3f}** over {len(records)} panels; it {verdict} the threshold {threshold:g}.",
        "",
        "## Reproducing a panel",
        "",
        _REPRODUCE,
        "",
    ]
    return "\n".join(lines)


def _replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Swap the finished folder in, so a failed build never leaves a half-written bundle."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)


@dataclass(frozen=True)
class ModelCard:
    """What the model card says about the run: config keys bundle.title, bundle.trigger_words,
    models.kolors and upload.repo_id, and the run's name."""

    title: str
    base_model: str
    trigger_words: str
    run_name: str
    repo_id: str | None = None  # goes into the usage snippet when known

    @classmethod
    def from_params(cls, bundle: dict, base_model: str, run_name: str, repo_id: str | None) -> "ModelCard":
        """From the bundle rule's params (the variant's bundle section and the rest)."""
        return cls(bundle["title"], base_model, bundle["trigger_words"], run_name, repo_id)


def build_bundle(
    out_dir: Path,
    lora_file: Path,
    panels: Sequence[Path],
    records: Sequence[CandidateRecord],
    scores: dict,
    story_image: Path,
    card: ModelCard,
    other_loras: dict[str, Path] | None = None,
) -> Path:
    """Write the ModelScope model folder; an existing `out_dir` is replaced as a whole.

    `lora_file` is the diffusers file, `other_loras` the run's other formats the bundle carries
    ("diffsynth", "comfyui": config bundle.formats); `panels` are the scenes' panel images in
    story order, `records` their scene jobs' candidate records (candidates_file.read_record);
    `scores` is the scores.json summary (write_scores' return).
    """
    out_dir = Path(out_dir)
    sources = {"diffusers": Path(lora_file), **{f: Path(p) for f, p in (other_loras or {}).items()}}
    for fmt, path in sources.items():
        _require_file(path, f"LoRA weights ({fmt})", "run the training step first")
    names = bundle_names(list(sources), file_stem(card.repo_id, card.run_name))
    rank = lora_rank(sources["diffusers"]) if "diffsynth" in names else None  # for the baseline's LoraConfig
    _require_file(story_image, "Story image", "run the compose step first")
    _check_panels(panels, records)
    per_image, mean, threshold = _per_image_scores(scores)
    rows = _panel_rows(panels, records, per_image)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for fmt, name in names.items():
            shutil.copyfile(sources[fmt], tmp_dir / name)
        (tmp_dir / "panels").mkdir()
        for panel, row in zip(panels, rows):
            _copy_png(Path(panel), tmp_dir / row["image"])
        _copy_png(Path(story_image), tmp_dir / "story.png")
        prompts = {"title": card.title, "base_model": card.base_model, "trigger_words": card.trigger_words,
                   "run": card.run_name, "mean_score": mean, "threshold": threshold,
                   "passes": mean >= threshold, "lora_files": names, "scenes": rows}
        write_json(prompts, tmp_dir / "prompts.json")
        (tmp_dir / "README.md").write_text(_model_card(card, rows, mean, threshold, names, rank), encoding="utf-8")
        share_as_umask_allows(tmp_dir)  # mkdtemp made the folder 0700
        _replace_dir(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return out_dir
