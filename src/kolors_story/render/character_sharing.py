"""Training-free character consistency for Kolors: ConsiStory-style "anchor mode" as attention processors.

Story scenes stay separate jobs. Two passes:

1. Anchor pass (one job per character, before the scenes): `record_anchor` renders the character's
   anchor prompt with a fixed seed and the scenes' sampler, steps and size, with a recording processor
   on the selected self-attention layers (default: every ``up_blocks.*attn1``). For each of the first
   `steps_fraction` denoising steps and each layer it keeps the hidden states entering attn1 for the
   conditional CFG branch (the pipeline batch is ``[uncond..., cond...]``), token-subsampled on the
   latent grid to at most `max_tokens` tokens, in fp16. `save_anchor` writes them to one safetensors
   file (keys ``step{i}.{layer}``, metadata as JSON) plus the anchor image next to it.

2. Scene pass: `enable_sharing` swaps in a sharing processor on the same layers: the self-attention
   keys/values of every batch item are extended with the anchors' tokens of the same step, projected
   through the layer's own ``to_k``/``to_v`` (so a peft LoRA on them applies), with the anchor logits
   shifted by ``log(strength)`` (1 = plain concatenation), during the first `steps_fraction` of the
   steps. Later steps (and strength 0) run the original processor untouched, bit for bit. Several
   characters: their tokens are concatenated. `disable` restores the original processors.

Step tracking: a forward pre-hook on the UNet reads the timestep the pipeline passes and looks it up
in the anchor's recorded timesteps. It needs no pipeline callback, is stateless across pipeline calls
(one call per candidate or one batched call alike) and fails loudly when the scene's sampler/steps do
not match the anchor's.

torch.compile (generate.compile): the step logic stays out of the compiled UNet. The hooks run
eagerly (torch.compiler.disable) and the processors read no step number, so the graph does not
change from step to step: the recorder keeps every step's tokens and the hook after the UNet files
the recorded steps' ones; a sharing processor only reads whether sharing is on (one recompile where
it turns off) and this step's tokens, a tensor. The hooks hold the pipeline weakly: a strong
reference from the UNet's hooks back to the pipeline would make a cycle that `del pipe` cannot free.
"""

from __future__ import annotations

import fnmatch
import json
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from kolors_story.files import share_as_umask_allows

DEFAULT_LAYERS: tuple[str, ...] = ("up_blocks.*attn1",)
DEFAULT_MAX_TOKENS = 1024
DEFAULT_STEPS_FRACTION = 0.6
META_KEY = "kolors_story.anchor"
_PROC = ".processor"


@dataclass
class Anchor:
    """A recorded character: fp16 features keyed ``step{i}.{layer}`` and their metadata."""

    features: dict[str, torch.Tensor]
    meta: dict


# ----------------------------------------------------------------------------------------- layers


def select_layers(unet, layers: Sequence[str] | None = None) -> list[str]:
    """Names (``...attn1``, no ``.processor``) of the UNet attention layers matching the fnmatch
    patterns in `layers` (default: every ``up_blocks.*attn1``), in the UNet's order."""
    patterns = tuple(layers) if layers else DEFAULT_LAYERS
    names = [key[: -len(_PROC)] for key in unet.attn_processors]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"no attention layer matches {patterns}")
    bad = [n for n in chosen if not n.endswith("attn1")]
    if bad:
        raise ValueError(f"only self-attention (attn1) layers can be shared, not {bad}")
    return chosen


def n_steps(fraction: float, steps: int) -> int:
    """The first ``fraction`` of ``steps``, rounded half up (0.6 of 50 -> 30)."""
    return min(steps, max(0, math.floor(fraction * steps + 0.5)))


def _timestep_index(t, timesteps: Sequence[float]) -> int | None:
    t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
    for i, ref in enumerate(timesteps):
        if abs(ref - t) < 1e-3:
            return i
    return None


def _timestep_arg(args, kwargs):
    return kwargs["timestep"] if "timestep" in kwargs else args[1]


def token_index(n_tokens: int, latent_hw: tuple[int, int], max_tokens: int) -> torch.Tensor:
    """Deterministic subsample of a layer's flattened token grid: a fixed 2-D stride on the grid when
    its shape can be inferred from the latent size, else a fixed 1-D stride. At most `max_tokens`."""
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    if n_tokens <= max_tokens:
        return torch.arange(n_tokens)
    lh, lw = latent_hw
    for f in (1, 2, 4, 8, 16, 32, 64):  # the UNet's downsampling factor at this layer
        gh, gw = math.ceil(lh / f), math.ceil(lw / f)
        if gh * gw == n_tokens:
            grid = torch.arange(n_tokens).view(gh, gw)
            s = max(1, math.ceil(math.sqrt(n_tokens / max_tokens)))
            while math.ceil(gh / s) * math.ceil(gw / s) > max_tokens:
                s += 1
            return grid[::s, ::s].flatten()
    s = math.ceil(n_tokens / max_tokens)
    return torch.arange(0, n_tokens, s)[:max_tokens]


# ------------------------------------------------------------------------------------- processors


def _self_attention(attn, hidden_states: torch.Tensor, extra: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' AttnProcessor2_0 for self-attention (no mask, no cross states), with the keys and
    values of `extra` tokens (M, C) appended for every batch item and an additive logit `bias`."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        raise NotImplementedError("spatial_norm attention layers are not supported")
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    if extra is not None:
        extra = extra.to(hidden_states.dtype).unsqueeze(0)
        key = torch.cat([key, attn.to_k(extra).expand(batch, -1, -1)], dim=1)
        value = torch.cat([value, attn.to_v(extra).expand(batch, -1, -1)], dim=1)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if bias is not None:
        bias = bias.to(query.dtype)
    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0,
                                                   is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


@dataclass
class RecordingState:
    latent_hw: tuple[int, int]
    max_tokens: int
    n_steps: int  # steps to record: 0 .. n_steps-1
    step: int | None = None
    cfg: bool = True
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # this UNet call's tokens per layer

    def tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The conditional branch's subsampled attn1 input, whatever the step (no step number in
        what torch.compile traces)."""
        if hidden_states.shape[0] != (2 if self.cfg else 1):
            raise ValueError("record_anchor renders exactly one image (batch [uncond, cond])")
        cond = hidden_states[-1]  # KolorsPipeline: torch.cat([negative, positive])
        if cond.ndim == 3:  # (C, H, W) -> tokens
            cond = cond.flatten(1).transpose(0, 1)
        return cond[token_index(cond.shape[0], self.latent_hw, self.max_tokens).to(cond.device)].detach()

    def file_step(self) -> None:
        """After a UNet call: its tokens become the features of its step when that step is recorded."""
        if self.step is not None and self.step < self.n_steps:
            for name, tokens in self.pending.items():
                self.features[f"step{self.step}.{name}"] = tokens.to("cpu", torch.float16).contiguous()
        self.pending.clear()


class RecordingProcessor:
    """Keeps the attn1 input of the conditional branch, then runs the original processor."""

    def __init__(self, name: str, inner, state: RecordingState):
        self.name, self.inner, self.state = name, inner, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None:
            self.state.pending[self.name] = self.state.tokens(hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


@dataclass
class SharingState:
    """Shared by the sharing processors of one pipeline; advanced by the UNet pre-hook."""

    anchors: list[Anchor]
    layers: list[str]
    timesteps: list[float]
    strength: float
    steps_fraction: float
    branches: str = "both"
    step: int | None = None
    cfg: bool = True
    current: dict[str, torch.Tensor] = field(default_factory=dict)  # this step's tokens per layer
    active: bool = False

    @property
    def n_active_steps(self) -> int:
        return n_steps(self.steps_fraction, len(self.timesteps))

    def advance(self, t, device: torch.device, dtype: torch.dtype) -> None:
        step = _timestep_index(t, self.timesteps)
        if step is None:
            raise ValueError(f"timestep {float(t):.3f} is not one the anchor was recorded at: render the "
                             f"scene with the anchor's sampler and steps ({len(self.timesteps)})")
        if step == self.step:
            return
        self.step, self.current = step, {}
        self.active = self.strength > 0 and step < self.n_active_steps
        if self.active:  # this step's tokens only go to the device: memory stays at one step
            for layer in self.layers:
                parts = [a.features[f"step{step}.{layer}"] for a in self.anchors]
                self.current[layer] = torch.cat(parts, dim=0).to(device=device, dtype=dtype)


class SharingProcessor:
    """Extends the layer's self-attention with the anchors' tokens of the current step."""

    def __init__(self, name: str, inner, state: SharingState):
        self.name, self.inner, self.state = name, inner, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        st = self.state
        if not st.active or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError("masked self-attention is not supported with anchor sharing")
        extra = st.current[self.name]
        n = hidden_states.shape[-2] if hidden_states.ndim == 3 else hidden_states.shape[-1] * hidden_states.shape[-2]
        batch = hidden_states.shape[0]
        bias = None
        if st.strength != 1.0 or (st.branches == "cond" and st.cfg):
            row = torch.zeros(batch, 1, 1, n + extra.shape[0], device=hidden_states.device)
            row[..., n:] = math.log(st.strength)
            if st.branches == "cond" and st.cfg:
                row[: batch // 2, ..., n:] = float("-inf")  # uncond half: anchors masked out
            bias = row
        return _self_attention(attn, hidden_states, extra, bias)


# ------------------------------------------------------------------------------------------- API


def _install(pipe, processors: dict, before, after=None) -> None:
    """The processors, and the step hooks around the UNet's forward, run eagerly under
    torch.compile (their step logic would otherwise be traced, and retraced at every step)."""
    unet = pipe.unet
    original = dict(unet.attn_processors)
    unet.set_attn_processor({**original, **processors})
    unet._consistency_original = original
    hooks = [unet.register_forward_pre_hook(torch.compiler.disable(before), with_kwargs=True)]
    if after is not None:
        hooks.append(unet.register_forward_hook(torch.compiler.disable(after)))
    unet._consistency_hook = hooks


def disable(pipe) -> None:
    """Restore the UNet's original attention processors and remove the step hooks (no-op if none)."""
    unet = pipe.unet
    original = getattr(unet, "_consistency_original", None)
    if original is None:
        return
    for hook in unet._consistency_hook:
        hook.remove()
    unet.set_attn_processor(original)
    unet._consistency_original = unet._consistency_hook = None


@torch.no_grad()
def record_anchor(pipe, prompt_embeds: dict, seed: int, width: int, height: int, steps: int,
                  guidance_scale: float, layers: Sequence[str] | None = None,
                  max_tokens: int = DEFAULT_MAX_TOKENS,
                  steps_fraction: float = DEFAULT_STEPS_FRACTION) -> tuple[Image.Image, dict[str, torch.Tensor], dict]:
    """Render the anchor (one image, CPU generator from `seed`) while recording the conditional
    attn1 inputs of the selected layers for the first ``floor(steps_fraction * steps + 0.5)`` steps (use
    1.0 to record all). The image is bitwise the plain rendering. Returns (image, features, meta)."""
    disable(pipe)
    names = select_layers(pipe.unet, layers)
    scale = pipe.vae_scale_factor
    state = RecordingState(latent_hw=(height // scale, width // scale), max_tokens=max_tokens,
                           n_steps=n_steps(steps_fraction, steps))
    procs = pipe.unet.attn_processors
    recorders = {f"{n}{_PROC}": RecordingProcessor(n, procs[f"{n}{_PROC}"], state) for n in names}
    pipeline = weakref.ref(pipe)

    def hook(module, args, kwargs):
        state.step = _timestep_index(_timestep_arg(args, kwargs), pipeline().scheduler.timesteps.tolist())
        state.cfg = pipeline().do_classifier_free_guidance

    _install(pipe, recorders, hook, lambda module, args, output: state.file_step())
    try:
        image = pipe(width=width, height=height, num_inference_steps=steps, guidance_scale=guidance_scale,
                     generator=torch.Generator("cpu").manual_seed(seed), **prompt_embeds).images[0]
        timesteps = [float(t) for t in pipe.scheduler.timesteps]
    finally:
        disable(pipe)
    meta = {"steps": steps, "recorded_steps": state.n_steps, "timesteps": timesteps, "layers": names,
            "width": width, "height": height, "seed": seed, "guidance_scale": guidance_scale,
            "max_tokens": max_tokens, "scheduler": type(pipe.scheduler).__name__,
            "tokens": {n: int(state.features[f"step0.{n}"].shape[0]) for n in names} if state.n_steps else {}}
    return image, state.features, meta


def save_anchor(path: Path, features: dict[str, torch.Tensor], meta: dict,
                image: Image.Image | None = None) -> Path:
    """One safetensors file (metadata as JSON under ``kolors_story.anchor``); the image, if given,
    goes next to it as ``<stem>.png``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in features.items()}, str(path), metadata={META_KEY: json.dumps(meta)})
    share_as_umask_allows(path)  # safetensors wrote it 0600
    if image is not None:
        image.save(path.with_suffix(".png"))
    return path


class _MappedFeatures(Mapping):
    """An anchor file's features by key, read from the memory-mapped file when asked for."""

    def __init__(self, handle):
        self._handle, self._keys = handle, list(handle.keys())
        self._known = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load_anchor(path: Path) -> Anchor:
    """An anchor file, memory-mapped (safe_open): a step's features are read when sharing reaches
    that step (SharingState.advance), so a scene job holds one step's tokens of each anchor, not
    the whole file (about 2.6 GB at 1024 px), and steps past steps_fraction are never read. The
    rule runner has checked the file against its seal before (seals.verify, hashed once a file)."""
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt", device="cpu")
    return Anchor(_MappedFeatures(handle), json.loads(handle.metadata()[META_KEY]))


def enable_sharing(pipe, anchors: Sequence[Anchor], strength: float = 1.0,
                   steps_fraction: float = DEFAULT_STEPS_FRACTION, branches: str = "both") -> SharingState:
    """Install the sharing processors on the layers the anchors were recorded on. `strength` scales
    the attention given to anchor tokens (logits + log(strength); 0 = off), for the first
    ``floor(steps_fraction * steps + 0.5)`` steps; `branches` is "both" CFG branches (default) or "cond".
    Render with the anchors' sampler and steps; the scene size may differ from the anchors'."""
    if not anchors:
        raise ValueError("enable_sharing needs at least one anchor")
    if strength < 0 or not 0 <= steps_fraction <= 1:
        raise ValueError("strength must be >= 0 and steps_fraction in [0, 1]")
    if branches not in ("both", "cond"):
        raise ValueError("branches must be 'both' or 'cond'")
    first = anchors[0].meta
    for a in anchors[1:]:
        if a.meta["layers"] != first["layers"] or a.meta["timesteps"] != first["timesteps"]:
            raise ValueError("anchors were recorded with different layers or sampler/steps")
    state = SharingState(anchors=list(anchors), layers=list(first["layers"]), timesteps=list(first["timesteps"]),
                         strength=float(strength), steps_fraction=float(steps_fraction), branches=branches)
    if strength > 0 and state.n_active_steps > min(a.meta["recorded_steps"] for a in anchors):
        raise ValueError(f"steps_fraction {steps_fraction} needs {state.n_active_steps} steps but the anchors "
                         f"recorded {min(a.meta['recorded_steps'] for a in anchors)}: record with a larger one")
    disable(pipe)
    procs = pipe.unet.attn_processors
    missing = [n for n in state.layers if f"{n}{_PROC}" not in procs]
    if missing:
        raise ValueError(f"the UNet has no layers {missing}")
    sharers = {f"{n}{_PROC}": SharingProcessor(n, procs[f"{n}{_PROC}"], state) for n in state.layers}
    pipeline = weakref.ref(pipe)

    def hook(module, args, kwargs):
        state.cfg = pipeline().do_classifier_free_guidance
        state.advance(_timestep_arg(args, kwargs), module.device, module.dtype)

    _install(pipe, sharers, hook)
    return state


__all__ = ["Anchor", "DEFAULT_LAYERS", "SharingState", "disable", "enable_sharing", "load_anchor",
           "record_anchor", "save_anchor", "select_layers", "token_index"]
