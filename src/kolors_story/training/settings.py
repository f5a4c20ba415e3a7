"""Training settings (TrainSettings, built from the `train` section of the config) and the paths
one training reads and writes (TrainJob)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from kolors_story.errors import UserError


CONVENTIONS = {"size_conditioning": "kolors-dreambooth"}


@dataclass(frozen=True)
class ValidationPrompt:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0


@dataclass(frozen=True)
class ValidationSettings:
    every: int = 0  # steps between validations; 0 = no validation
    prompts: tuple[ValidationPrompt, ...] = ()
    size: int = 512
    steps: int = 20
    guidance_scale: float = 5.0
    pick_best: bool = False  # the run's LoRA is the best-scoring checkpoint, else the last

    @classmethod
    def from_dict(cls, values: dict | None) -> "ValidationSettings":
        values = dict(values or {})
        prompts = tuple(ValidationPrompt(**p) for p in values.pop("prompts", None) or ())
        return cls(prompts=prompts, **values)


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 16
    alpha: float = 4.0
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    steps: int = 500
    batch_size: int = 1
    gradient_accumulation: int = 1
    resolution: int = 1024
    crop: str = "center"  # center | random
    bucketing: bool = False  # aspect-ratio buckets of about resolution**2 pixels
    bucket_step: int = 64
    random_flip: bool = False
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    seed: int = 0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    init_lora: str | None = None  # start from this LoRA (diffusers or DiffSynth-Studio file)
    diffsynth_alpha: float | None = 2.0  # alpha of a DiffSynth .ckpt init_lora (None: = its rank)
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"train: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        if "validation" in values:
            values["validation"] = ValidationSettings.from_dict(values["validation"])
        return cls(**values)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def fingerprint(self) -> str:
        """Hash of everything that changes the optimisation path (not checkpoint/validation cadence
        that leaves the weights alone), so checkpoints of other settings are never resumed."""
        d = self.to_dict()
        d.pop("checkpoint_every")
        if not d["init_lora"]:
            d.pop("diffsynth_alpha")  # only read with init_lora: other runs keep their checkpoints
        d["validation"] = None
        # What the code does with the settings, where it changed: checkpoints of an older
        # convention are not resumed (add_time_ids follow Kolors' trainer since this marker).
        d["conventions"] = CONVENTIONS
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _path(flag: str, help: str, default: Path | None | object = MISSING):
    """A TrainJob field with its command-line flag (python -m kolors_story.training) and help."""
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True)
class TrainJob:
    """What one training reads and writes (its settings apart, in TrainSettings): the one list of
    paths that train_lora, the multi-process launch and `python -m kolors_story.training` share."""

    model_dir: Path = _path("--model", "the Kolors diffusers folder")
    dataset_dir: Path = _path("--dataset", "the training folder: train/metadata.csv and its images")
    out_dir: Path = _path("--out", "where pytorch_lora_weights.safetensors goes")
    cache_dir: Path | None = _path("--cache-dir", "embeddings and latents (default: <out>/cache)", None)
    work_dir: Path | None = _path("--work-dir", "checkpoints (default: <out>/work)", None)
    aesthetic_dir: Path | None = _path("--aesthetic", "the aesthetic predictor folder (validation)", None)
    embeddings: Path | None = _path("--embeddings", "the encode_texts job's file (then ChatGLM is not loaded)", None)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, f.name, Path(value))

    def cli_args(self) -> list[str]:
        """The flags of each path set: what from_cli reads back."""
        return [arg for f in fields(self) if getattr(self, f.name) is not None
                for arg in (f.metadata["flag"], str(getattr(self, f.name)))]

    @classmethod
    def add_cli_args(cls, parser) -> None:
        for f in fields(cls):
            parser.add_argument(f.metadata["flag"], dest=f.name, type=Path, required=f.default is MISSING,
                                help=f.metadata["help"])

    @classmethod
    def from_cli(cls, namespace) -> "TrainJob":
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})
