"""The one owner of a Kolors model folder: recognise its layout, refuse what is not loadable, load parts.

Users download `Kwai-Kolors/Kolors-diffusers`, which ships only fp16 files and a sharded text
encoder whose variant is glued to the shard suffix (`model.fp16-00001-of-00003.safetensors`, index
`model.safetensors.index.fp16.json`). Mirrors and older diffusers spell the index
`*.fp16.safetensors.index.json`; some folders have full-precision or `.bin` weights. Every such
diffusers layout loads. The original `Kwai-Kolors/Kolors` layout (what DiffSynth reads), a DiffSynth
models folder, a single checkpoint file and a half-finished download are refused before any GPU
work, with the files that are missing or foreign and the fix. No other module builds weight file
names or guesses variants: training, validation, scene and anchor jobs, the bundle and bench ask
this class.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from kolors_story.errors import UserError
from kolors_story.files import NotSafetensors, read_safetensors_header

DIFFUSERS_ID = "Kwai-Kolors/Kolors-diffusers"
WEIGHTED_PARTS = ("unet", "vae", "text_encoder")
# Weight file stems: diffusers models, transformers models (safetensors / pickle).
STEMS = {"unet": ("diffusion_pytorch_model",) * 2, "vae": ("diffusion_pytorch_model",) * 2,
         "text_encoder": ("model", "pytorch_model")}
FORMATS = ("safetensors", "bin")  # in order of preference
CONFIGS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
           "tokenizer": "tokenizer.model", "scheduler": "scheduler_config.json"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "vocab.txt")
# Where downloads keep files in flight: ModelScope's temporary folder, huggingface_hub's local-dir cache.
DOWNLOAD_TEMP_DIRS = ("._____temp", ".cache/huggingface")
_EDGE = 1 << 20  # bytes of each end of a weight file in its fingerprint
PARTIAL_SUFFIXES = (".incomplete", ".part", ".downloading")


@dataclass(frozen=True)
class PartWeights:
    """The weight files of one model part as found on disk."""

    part: str
    format: str  # "safetensors" or "bin"
    variant: str | None  # "fp16" for Kolors-diffusers, None for full-precision files
    files: tuple[str, ...]  # weight file names (shards in order)
    index: str | None = None  # the shard index as spelled on disk
    canonical_index: str | None = None  # the spelling diffusers/transformers look for

    @property
    def sharded(self) -> bool:
        return self.canonical_index is not None


def _weight_pattern(stem: str, ext: str) -> re.Pattern:
    # stem[.variant][-00001-of-00003].ext
    return re.compile(rf"^{re.escape(stem)}(?:\.(?P<variant>\w+))?(?:-(?P<shard>\d+)-of-(?P<total>\d+))?\.{ext}$")


def _index_spellings(stem: str, ext: str, variant: str | None) -> tuple[str, ...]:
    """Index names for a sharded set, canonical first (transformers 4.57 / diffusers 0.39)."""
    if variant is None:
        return (f"{stem}.{ext}.index.json",)
    return (f"{stem}.{ext}.index.{variant}.json", f"{stem}.{variant}.{ext}.index.json")


def _candidates(folder: Path, part: str) -> list[PartWeights]:
    """Every (format, variant) set of weight files in the folder, preferred first."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    found = []
    for fmt, stem in zip(FORMATS, STEMS[part]):
        groups: dict[str | None, list[str]] = {}
        for name in names:
            match = _weight_pattern(stem, fmt).match(name)
            if match:
                groups.setdefault(match["variant"], []).append(name)
        for variant in sorted(groups, key=lambda v: (v is not None, v or "")):  # full precision first
            files = tuple(groups[variant])
            spellings = _index_spellings(stem, fmt, variant)
            index = next((s for s in spellings if s in names), None)
            sharded = index is not None or any("-of-" in f for f in files)
            found.append(PartWeights(part, fmt, variant, files, index if sharded else None,
                                     spellings[0] if sharded else None))
    return found


def _safetensors_truncated(path: Path) -> bool:
    """A safetensors file shorter than its header says (a download cut short)."""
    try:
        header = read_safetensors_header(path)
    except NotSafetensors:
        return True
    return path.stat().st_size < header.data_end()


def _weight_problems(folder: Path, weights: PartWeights) -> list[str]:
    """Missing shards (index vs disk) and truncated files of one weight set."""
    rel = f"{folder.name}/"
    if weights.sharded and weights.index is None:
        return [f"{rel}{weights.canonical_index} (the shard index; shards found: {', '.join(weights.files)})"]
    problems = []
    files = list(weights.files)
    if weights.sharded:
        with open(folder / weights.index, encoding="utf-8") as f:
            listed = sorted(set(json.load(f).get("weight_map", {}).values()))
        problems += [f"{rel}{name} (listed in {weights.index})" for name in listed if name not in files]
        files = [name for name in listed if name in files]
    for name in files:
        path = folder / name
        if path.stat().st_size == 0 or (weights.format == "safetensors" and _safetensors_truncated(path)):
            problems.append(f"{rel}{name} (truncated: shorter than its header says)")
    return problems


class KolorsFolder:
    """A Kolors-diffusers folder, checked on construction (UserError naming what is wrong)."""

    def __init__(self, path: Path | str, config_key: str = "models.kolors"):
        self.path = Path(path)
        self.config_key = config_key
        _refuse_foreign(self.path, config_key)
        self.weights: dict[str, PartWeights] = {}
        problems = self._collect_problems()
        if problems:
            raise UserError(
                f"{config_key}: {self.path} is not a complete Kolors diffusers folder; missing or broken: "
                f"{'; '.join(problems)}. A download was probably cut short: delete the folder so the "
                f"workflow downloads {DIFFUSERS_ID} again, or point {config_key} at a complete copy."
            )

    def _collect_problems(self) -> list[str]:
        problems = [] if (self.path / "model_index.json").is_file() else ["model_index.json"]
        for part, config in CONFIGS.items():
            if not (self.path / part / config).is_file():
                problems.append(f"{part}/{config}")
        for part in WEIGHTED_PARTS:
            found = _candidates(self.path / part, part)
            if not found:
                problems.append(f"{part}/ weights (e.g. {_expected_names(part)})")
                continue
            self.weights[part] = found[0]
            problems += _weight_problems(self.path / part, found[0])
        leftovers = [str(p.relative_to(self.path)) for p in self._partial_files()]
        if leftovers:
            problems.append("unfinished download files " + ", ".join(leftovers[:5]))
        return problems

    def _partial_files(self) -> list[Path]:
        """Files a download leaves while it runs (an empty temporary folder is fine)."""
        found = sorted(p for p in (self.path / DOWNLOAD_TEMP_DIRS[0]).rglob("*") if p.is_file())
        found += sorted((self.path / DOWNLOAD_TEMP_DIRS[1]).rglob("*.incomplete"))
        for part in ("", *CONFIGS):
            folder = self.path / part
            if folder.is_dir():
                found += sorted(p for p in folder.iterdir() if p.name.endswith(PARTIAL_SUFFIXES))
        return found

    # ---- what the folder says about itself -------------------------------------------------------

    @cached_property
    def model_index(self) -> dict:
        with open(self.path / "model_index.json", encoding="utf-8") as f:
            return json.load(f)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        # diffusers' KolorsPipeline default is True; the real repo says false (FACTS.md).
        return bool(self.model_index.get("force_zeros_for_empty_prompt", True))

    def config(self, part: str) -> dict:
        with open(self.path / part / CONFIGS[part], encoding="utf-8") as f:
            return json.load(f)

    def latent_geometry(self) -> tuple[int, int]:
        """(latent channels, pixels per latent cell) of the VAE, from its config (no weights)."""
        vae = self.config("vae")
        return int(vae.get("latent_channels", 4)), 2 ** (len(vae["block_out_channels"]) - 1)

    @property
    def variant(self) -> str | None:
        """The variant a stock `KolorsPipeline.from_pretrained` needs (the bundle's usage snippet)."""
        variants = {w.variant for w in self.weights.values()}
        return variants.pop() if len(variants) == 1 else None

    def fingerprint(self, part: str) -> str:
        """Identity of a part's config and weight files (name, size, first and last MiB): the
        namespace of its cache entries. Cheap, yet any re-save changes it."""
        h = hashlib.sha256()
        for path in sorted(p for p in (self.path / part).iterdir() if p.is_file()):
            h.update(path.name.encode())
            size = path.stat().st_size
            h.update(str(size).encode())
            with open(path, "rb") as f:
                h.update(f.read(_EDGE))
                if size > 2 * _EDGE:
                    f.seek(-_EDGE, os.SEEK_END)
                    h.update(f.read())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """Summary for the manifest: the layout found and hashes of the config files."""
        from kolors_story.files import sha256_file

        configs = sorted(p for p in self.path.rglob("*.json") if p.stat().st_size < 1_000_000)
        return {
            "path": str(self.path),  # as configured: results hold no absolute paths
            "weights": {part: {"format": w.format, "variant": w.variant, "files": list(w.files), "index": w.index}
                        for part, w in self.weights.items()},
            "config_sha256": {str(p.relative_to(self.path)): sha256_file(p) for p in configs},
        }

    # ---- loading -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _loadable(self, part: str) -> Iterator[str]:
        """The part's folder as the loading library spells it. An index in the older spelling is
        shown under the current name through a folder of symlinks; the user's files stay as they are."""
        weights, folder = self.weights[part], self.path / part
        if not weights.sharded or weights.index == weights.canonical_index:
            yield str(folder)
            return
        with tempfile.TemporaryDirectory(prefix=f"kolors-{part}-") as view:
            for item in folder.iterdir():
                name = weights.canonical_index if item.name == weights.index else item.name
                (Path(view) / name).symlink_to(item.resolve())
            yield view

    def _load_args(self, part: str, dtype: torch.dtype, device: torch.device | None = None) -> dict:
        weights = self.weights[part]
        args = {"torch_dtype": dtype, "variant": weights.variant, "use_safetensors": weights.format == "safetensors"}
        if (device_map := _device_map(device)) is not None:
            args["device_map"] = device_map
        return args

    def load_tokenizer(self):
        from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

        return ChatGLMTokenizer.from_pretrained(str(self.path / "tokenizer"))

    def load_text_encoder(self, dtype: torch.dtype, device: torch.device | None = None):
        """ChatGLM on `device` (default: the CPU), loaded straight onto it (_device_map), not through
        a 12.5 GB copy in host memory first. `dtype`, not `torch_dtype`: the one spelling that
        transformers 4.56+ and 5.x both take without a deprecation warning (ChatGLM is a
        transformers model)."""
        from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

        args = self._load_args("text_encoder", dtype, device)
        args["dtype"] = args.pop("torch_dtype")
        with self._loadable("text_encoder") as folder:
            return ChatGLMModel.from_pretrained(folder, **args).eval()

    def load_unet(self, dtype: torch.dtype, device: torch.device | None = None):
        """The UNet on `device` (default: the CPU), loaded straight onto it (_device_map): a training
        process never holds a 5 GB copy in host memory (8 processes held 42 GB at once)."""
        from diffusers import UNet2DConditionModel

        args = self._load_args("unet", dtype, device)
        with self._loadable("unet") as folder:
            return UNet2DConditionModel.from_pretrained(folder, **args)

    def load_vae(self, dtype: torch.dtype, device: torch.device | None = None):
        from diffusers import AutoencoderKL

        args = self._load_args("vae", dtype, device)
        with self._loadable("vae") as folder:
            return AutoencoderKL.from_pretrained(folder, **args).eval()

    def load_scheduler(self, cls=None):
        """The folder's scheduler config in `cls` (default: the class model_index.json names)."""
        import diffusers

        cls = cls or getattr(diffusers, self.model_index.get("scheduler", ["", "EulerDiscreteScheduler"])[1])
        return cls.from_pretrained(str(self.path), subfolder="scheduler")

    def load_pipeline(self, dtype: torch.dtype, text_encoder: bool = True):
        """A stock KolorsPipeline of this folder's parts, on the CPU; text_encoder=False leaves out
        ChatGLM and its tokenizer (prompt embeddings then come from prompt_embeddings)."""
        from diffusers import KolorsPipeline

        return KolorsPipeline(
            vae=self.load_vae(dtype), unet=self.load_unet(dtype), scheduler=self.load_scheduler(),
            text_encoder=self.load_text_encoder(dtype) if text_encoder else None,
            tokenizer=self.load_tokenizer() if text_encoder else None,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
        )


def _device_map(device: torch.device | None) -> dict | None:
    """The `device_map` that has diffusers/transformers (low_cpu_mem_usage, implied) put each
    tensor on `device` as it reads it from the memory-mapped file, so the model never exists in
    host memory; None for the CPU, where they load without one. CUDA by index: the one
    use_free_gpu made current when none is given."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type == "cpu":
        return None
    if device.type == "cuda":
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": device}


def _expected_names(part: str) -> str:
    stem = STEMS[part][0]
    return f"{stem}.fp16.safetensors or {stem}.safetensors" if part != "text_encoder" else (
        "model.fp16-00001-of-00003.safetensors ... with model.safetensors.index.fp16.json, or model.safetensors")


def _refuse_foreign(path: Path, key: str) -> None:
    """Folders that are something else than Kolors-diffusers: say what they are and what to do."""
    fix = f"Download {DIFFUSERS_ID} (ModelScope or Hugging Face) and set {key} to it (or to its id)."
    if not path.exists():
        raise UserError(f"{key}: model folder {path} does not exist. {fix}")
    if path.is_file():
        raise UserError(f"{key}: {path} is a single file; {key} needs the Kolors diffusers folder "
                        f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/). {fix}")
    for sub in ("kolors/Kolors", "Kolors"):
        if (path / sub / "unet").is_dir():
            raise UserError(f"{key}: {path} is a DiffSynth models folder (it holds {sub}/ in the original "
                            f"Kwai-Kolors/Kolors layout, which DiffSynth reads and diffusers does not). {fix}")
    if (path / "model_index.json").is_file():
        with open(path / "model_index.json", encoding="utf-8") as f:
            name = json.load(f).get("_class_name")
        if name != "KolorsPipeline":
            raise UserError(f"{key}: {path} holds a {name} (model_index.json), not a KolorsPipeline. {fix}")
        return
    text_encoder = path / "text_encoder"
    if (text_encoder / "pytorch_model.bin.index.json").is_file() or any(text_encoder.glob("pytorch_model-*.bin")):
        raise UserError(f"{key}: {path} is the original Kwai-Kolors/Kolors layout (text_encoder/pytorch_model-"
                        f"0000N-of-00007.bin, no model_index.json), which DiffSynth reads; diffusers needs "
                        f"{DIFFUSERS_ID}. {fix}")
