"""The typed record of a scene job: every candidate's recipe and scores, and which became the panel.

render_scene writes it as `candidates/<scene>/candidates.json`; read_record is the only code that
reads that file (contact sheet, bundle, manifest). `CandidateRecord.recipe()` is the kept panel's
full recipe, what `bundle/prompts.json` publishes and `kolors_story.tools.reproduce` renders again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from kolors_story.errors import UserError
from kolors_story.files import write_json

if TYPE_CHECKING:
    import torch

RECORD_FILE = "candidates.json"
FORMAT = 3  # bumped when the file's shape changes; older files are refused with the fix


@dataclass(frozen=True)
class Runtime:
    """What decides a render's last bits beyond its recipe: torch's CPU thread count splits the
    reductions differently (a pixel one uint8 level off on 2 cores), other torch or diffusers
    versions, SIMD kernels or GPUs compute differently. Each scene and anchor job records it;
    `kolors_story.tools.reproduce` pins the threads and the deterministic flag, and names the rest
    where they differ."""

    torch_threads: int  # torch.get_num_threads() while rendering (the job's `threads:`)
    torch: str
    diffusers: str
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): the SIMD kernels, e.g. AVX2
    deterministic: bool  # torch.are_deterministic_algorithms_enabled()
    gpu: str | None = None  # the CUDA device's name; None on the CPU
    cuda: str | None = None  # torch.version.cuda on a GPU

    @classmethod
    def current(cls, device: "torch.device") -> "Runtime":
        """This process's, rendering on `device`."""
        from importlib.metadata import version

        import torch  # here: the manifest and bundle jobs read records without torch

        on_gpu = device.type == "cuda"
        return cls(torch_threads=torch.get_num_threads(), torch=torch.__version__, diffusers=version("diffusers"),
                   cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   deterministic=torch.are_deterministic_algorithms_enabled(),
                   gpu=torch.cuda.get_device_name(device) if on_gpu else None,
                   cuda=torch.version.cuda if on_gpu else None)

    def differences(self, here: "Runtime") -> list[str]:
        """Each recorded item `here` does not match: 'torch 2.4.0 (here 2.5.1)'."""
        return [f"{f.name.replace('_', ' ')} {getattr(self, f.name)} (here {getattr(here, f.name)})"
                for f in fields(self) if getattr(self, f.name) != getattr(here, f.name)]


def _runtime(data: "dict | Runtime | None") -> Runtime | None:
    return Runtime(**data) if isinstance(data, dict) else data


@dataclass(frozen=True)
class AnchorRecipe:
    """How a character's anchor was recorded (render_anchor with these gives the same features)."""

    id: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    sampler: str
    steps: int
    guidance_scale: float
    lora_scale: float
    steps_fraction: float
    max_tokens: int
    runtime: Runtime | None = None  # None: recorded by a version before Runtime

    def __post_init__(self) -> None:
        object.__setattr__(self, "runtime", _runtime(self.runtime))

    @classmethod
    def from_meta(cls, meta: dict, path: Path) -> "AnchorRecipe":
        """From an anchor file's metadata (render_anchor writes every field)."""
        missing = [f.name for f in fields(cls) if f.name not in meta]
        if missing:
            raise UserError(f"Anchor {path} lacks {', '.join(missing)} in its metadata (written by an "
                             "older version); delete it so that rule render_anchor records it again.")
        return cls(**{f.name: meta[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class ConsistencyRecipe:
    """Anchor-mode attention sharing as a scene job used it (kolors_story.render.character_sharing)."""

    strength: float
    steps_fraction: float
    selection_weight: float
    anchors: tuple[AnchorRecipe, ...]


@dataclass(frozen=True)
class Candidate:
    """One image a scene job drew: how (seed, LoRA scale, the batch of its pipeline call, prompt),
    then, once chosen among, how it scored and where its image is. Drawing makes it with the
    scores and file None (scenes.draw_candidates); choosing fills them (panel_choice)."""

    seed: int
    lora_scale: float
    batch_seeds: tuple[int, ...]  # the seeds of the one pipeline call that drew it, in order
    score: float | None = None  # aesthetic score (best-of-N only)
    anchor_similarity: float | None = None  # mean CLIP cosine to its anchors (selection_weight > 0)
    selection_score: float | None = None  # what best-of-N maximised
    file: str | None = None  # image name in the candidates folder
    prompt: str | None = None  # one of the scene's alternative prompts; None: the record's prompt


@dataclass(frozen=True)
class PanelRecipe:
    """Everything that renders one panel again: a stock KolorsPipeline call, plus attention
    sharing when `consistency` is set. Bitwise on the same device type and dtype."""

    id: str
    prompt: str
    negative_prompt: str  # "" renders as the pipeline's negative_prompt=None
    seed: int
    width: int
    height: int
    sampler: str  # a name of samplers.SAMPLERS: euler, dpmpp_2m or ddim (diffsynth_ddim)
    steps: int
    guidance_scale: float
    lora_scale: float
    precision: str  # generate.precision (the CPU runs float32 whatever it says)
    dtype: str  # torch dtype the pipeline ran in, e.g. "float16"
    device: str  # device type, e.g. "cuda"
    batch_seeds: tuple[int, ...]  # batched candidates: one call with these seeds...
    batch_index: int  # ...whose image at this index is the panel
    consistency: ConsistencyRecipe | None = None
    lora_fused: bool = False  # the LoRA was merged into the UNet (pipe.fuse_lora) before rendering
    runtime: Runtime | None = None  # threads, versions, kernels of the scene job; None: not recorded

    def __post_init__(self) -> None:
        object.__setattr__(self, "runtime", _runtime(self.runtime))

    @property
    def stock_diffusers(self) -> bool:
        """True when stock diffusers alone re-renders it (no attention sharing with anchors)."""
        return self.consistency is None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PanelRecipe":
        """From a prompts.json row (other keys, such as the score, are ignored)."""
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["batch_seeds"] = tuple(values["batch_seeds"])
        values["consistency"] = _consistency(data.get("consistency"))
        return cls(**values)


@dataclass(frozen=True)
class CandidateRecord:
    scene: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    sampler: str
    steps: int
    guidance_scale: float
    precision: str
    dtype: str
    device: str
    candidates: tuple[Candidate, ...]
    chosen: int
    consistency: ConsistencyRecipe | None = None
    lora_fused: bool = False  # one LoRA scale: merged into the UNet; several: adapters switched
    without_consistency: str | None = None  # the kept seed rendered with sharing off (compare)
    runtime: Runtime | None = None  # what besides the recipe decided the last bits (Runtime)

    def __post_init__(self) -> None:
        object.__setattr__(self, "runtime", _runtime(self.runtime))
        if not 0 <= self.chosen < len(self.candidates):
            raise ValueError(f"scene {self.scene}: chosen {self.chosen} is not one of {len(self.candidates)} candidates")

    @property
    def panel(self) -> Candidate:
        return self.candidates[self.chosen]

    @property
    def seed(self) -> int:
        return self.panel.seed

    @property
    def lora_scale(self) -> float:
        return self.panel.lora_scale

    @property
    def scores(self) -> list[float | None]:
        return [c.score for c in self.candidates]

    @property
    def files(self) -> list[str]:
        return [c.file for c in self.candidates if c.file is not None]

    def recipe(self) -> PanelRecipe:
        """The kept candidate's full recipe."""
        panel = self.panel
        return PanelRecipe(
            id=self.scene, prompt=panel.prompt or self.prompt, negative_prompt=self.negative_prompt, seed=panel.seed,
            width=self.width, height=self.height, sampler=self.sampler, steps=self.steps,
            guidance_scale=self.guidance_scale, lora_scale=panel.lora_scale, precision=self.precision,
            dtype=self.dtype, device=self.device, batch_seeds=panel.batch_seeds,
            batch_index=panel.batch_seeds.index(panel.seed), consistency=self.consistency,
            lora_fused=self.lora_fused, runtime=self.runtime)

    def selection(self) -> dict:
        """How the panel was picked: for prompts.json and the manifest."""
        panel = self.panel
        return {"candidates": len(self.candidates), "chosen": self.chosen, "score": panel.score,
                "anchor_similarity": panel.anchor_similarity, "selection_score": panel.selection_score}


def _consistency(data: dict | None) -> ConsistencyRecipe | None:
    if data is None:
        return None
    anchors = tuple(AnchorRecipe(**a) for a in data["anchors"])
    return ConsistencyRecipe(**{**data, "anchors": anchors})


def write_record(record: CandidateRecord, folder: Path) -> Path:
    data = {"format": FORMAT, **asdict(record)}
    for candidate in data["candidates"]:  # a scene without alternatives: no per-candidate prompt at all
        if candidate["prompt"] is None:
            del candidate["prompt"]
    return write_json(data, Path(folder) / RECORD_FILE)


def read_record(folder: Path) -> CandidateRecord:
    """The record in a scene's candidates folder (the only reader of candidates.json)."""
    path = Path(folder) / RECORD_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.pop("format", None) != FORMAT:
        raise UserError(f"{path} was written by an older version: delete {Path(folder)} so that its "
                         "generate_scene job runs again.")
    candidates = tuple(Candidate(**{**c, "batch_seeds": tuple(c["batch_seeds"])}) for c in data["candidates"])
    return CandidateRecord(**{**data, "candidates": candidates,
                              "consistency": _consistency(data.get("consistency"))})


__all__ = ["AnchorRecipe", "Candidate", "CandidateRecord", "ConsistencyRecipe", "PanelRecipe", "RECORD_FILE",
           "Runtime", "read_record", "write_record"]
