"""Peak GPU memory of Kolors LoRA training at 1024 px, estimated without a GPU.

    .venv/bin/python bench/gpu_memory_estimate.py [--resolution 1024] [--rank 16] [--batch 1]
                                                  [--check-resolutions 256,512] [--no-trace]

Setting: the project's trainer on one GPU: the full Kolors UNet in bf16, a LoRA of rank --rank on
to_q/to_k/to_v/to_out.0 with fp32 parameters, fp32 gradients and fp32 AdamW states, bf16
autocast, gradient checkpointing, batch --batch; the text encoder is NOT resident (the
encode_texts job's file holds its outputs); the latents are encoded before the UNet is loaded,
by the VAE in fp32 (training.loop.LATENT_VAE_DTYPE). With validation on (the default run:
train.validation.every) the fp32 VAE and the aesthetic scorer stay on the GPU through the steps,
and every N steps a validation image is rendered at train.validation.size, decoded and scored.

Method
  1. Parameter counts: every model is built on the meta device (no memory): the Kolors UNet
     (2,579,458,820), ChatGLM3-6B (28 layers), the SDXL VAE, and the LoRA added to the meta UNet.
  2. Memory of each phase, by tracing: the phase runs under FakeTensorMode (tensors with shapes,
     dtypes and devices but no data: same operators, same autograd graph, same checkpoint
     recomputation, no arithmetic) inside a TorchDispatchMode that adds up the bytes of every
     live tensor storage (rounded up to 512 bytes like PyTorch's CUDA caching allocator) and
     drops them when the storage is freed. Its peak is what torch.cuda.max_memory_allocated
     would report for the same operator sequence. The UNet step is traced at the full target
     resolution; two steps' worth of state is present (AdamW moments exist before the step).
  3. Cross-check: the same trace at smaller resolutions; activation memory (peak minus
     persistent tensors) scaled by latent area to the target is compared with the direct trace.
  4. Overheads a tensor trace cannot see are added as stated margins: the CUDA context and
     kernels (--context-gib, default 0.6 GiB) and allocator fragmentation/caching
     (--fragmentation, default 10 % of the tensor peak). nvidia-smi shows roughly that sum.

Caveats: traced on CPU kernels (the CPU flash-attention saves the same output + logsumexp as the
CUDA flash/efficient kernels; other kernels may pick other workspaces); cuDNN/cuBLAS workspaces
and the margins above are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import weakref
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RESULTS = C.ROOT / "bench" / "results" / "gpu_memory_estimate.json"
BASELINE_REPORTED_GB = 22.0  # the challenge baseline (DiffSynth-Studio 1.1) as reported
GOAL_GB = 16.0
CARD_GIB = 24.0  # the challenge's users' cards (A10, RTX 4090): every phase of the default run must fit


# ---------------------------------------------------------------- live-tensor accounting
class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Sum of live tensor storages (each counted once) and its peak, by creation tag."""

    def __init__(self, round_to: int = 512):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.round_to = round_to
        self.seen = WeakIdKeyDictionary()
        self.tag = "init"
        self.current = 0
        self.by_tag: Counter = Counter()
        self.peak = 0
        self.peak_by_tag: dict[str, int] = {}
        self.peak_tag = None

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        if storage in self.seen:
            return
        n = (storage.nbytes() + self.round_to - 1) // self.round_to * self.round_to
        tag = self.tag
        self.seen[storage] = n
        self.current += n
        self.by_tag[tag] += n
        weakref.finalize(storage, self._free, n, tag)
        if self.current > self.peak:
            self.peak, self.peak_by_tag, self.peak_tag = self.current, dict(self.by_tag), tag

    def _free(self, n: int, tag: str) -> None:
        self.current -= n
        self.by_tag[tag] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            self.track(t)
        return out


def materialize_fake(module: torch.nn.Module) -> None:
    """Swap a meta module's parameters/buffers for fake CPU tensors (inside FakeTensorMode and the
    tracker, so they are counted). Assigns into _parameters directly: Module.to() cannot swap
    fake tensors."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def meta_unet(rank: int | None):
    from kolors_story.training import TrainSettings, add_lora

    with torch.device("meta"), C.default_dtype(torch.bfloat16):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**C.SIZES.unet)
    base = sum(p.numel() for p in unet.parameters())
    lora = 0
    if rank:
        lora = sum(p.numel() for p in add_lora(unet, TrainSettings(rank=rank, seed=0)))
    return unet, base, lora


def meta_chatglm(layers: int = C.CHATGLM3_6B_LAYERS):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    with torch.device("meta"), C.default_dtype(torch.bfloat16):
        return ChatGLMModel(ChatGLMConfig(**{**C.SIZES.chatglm, "num_layers": layers}), empty_init=False).eval()


def meta_vae(dtype: torch.dtype = torch.bfloat16):
    from diffusers import AutoencoderKL

    with torch.device("meta"), C.default_dtype(dtype):
        return AutoencoderKL(**C.SIZES.vae).eval()


def meta_scorer():
    """The challenge's predictor (CLIP ViT-L/14 + MLP), fp32 as models.aesthetic loads it."""
    from aesthetics_predictor import AestheticsPredictorV2Linear

    from kolors_story.models import random_aesthetic

    clip_config = getattr(random_aesthetic, C.SIZES.clip)()
    return meta_module(lambda: AestheticsPredictorV2Linear(clip_config), torch.float32)


def add_adamw_moments(live: "LiveBytes", params: list) -> torch.optim.Optimizer:
    """AdamW with its moments made, as after the first step (tagged "adamw"); grads freed again."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    live.tag = "adamw"
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


# ---------------------------------------------------------------- traces
def trace_unet_step(resolution: int, rank: int, batch: int) -> dict:
    """One LoRA training step of the full UNet at `resolution` px, with AdamW moments present."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    unet, _, _ = meta_unet(rank)
    lat = resolution // 8
    with FakeTensorMode(), LiveBytes() as live:
        materialize_fake(unet)
        params = [p for p in unet.parameters() if p.requires_grad]
        weights = live.current
        lora_bytes = sum(p.numel() * p.element_size() for p in params)
        unet.enable_gradient_checkpointing()
        unet.train()
        optimizer = add_adamw_moments(live, params)
        adamw = live.by_tag["adamw"]
        live.tag = "inputs"  # what the loop moves to the GPU: cached latents and text embeddings
        latents = torch.randn(batch, 4, lat, lat)
        embeds = torch.randn(batch, 256, C.SIZES.text_width)
        pooled = torch.randn(batch, C.SIZES.text_width)
        time_ids = torch.randn(batch, 6)  # fp32, as the loop passes them (exact sizes)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1100, (batch,))
        live.tag = "forward"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet((latents + noise).to(torch.bfloat16), timesteps, encoder_hidden_states=embeds.to(torch.bfloat16),
                        added_cond_kwargs={"text_embeds": pooled.to(torch.bfloat16), "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        after_forward = live.current
        saved = live.by_tag["forward"]
        live.tag = "backward"
        loss.backward()
        del loss, pred
        live.tag = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = live.current
    persistent = weights + adamw  # weights (bf16 UNet + fp32 LoRA) and moments live all the time
    return {
        "resolution": resolution, "latent": lat, "batch": batch, "rank": rank,
        "peak": live.peak, "peak_during": live.peak_tag,
        "peak_by_tag": live.peak_by_tag,
        "unet_weights": weights - lora_bytes, "lora_params": lora_bytes, "adamw_states": adamw,
        "lora_grads": lora_bytes,
        "forward_saved": saved, "after_forward": after_forward, "after_step": end,
        "transient_at_peak": live.peak - persistent,
        "trace_s": round(time.perf_counter() - t0, 1),
    }


def trace_text_encoding(layers: int = C.CHATGLM3_6B_LAYERS) -> dict:
    """ChatGLM3-6B (28 layers, bf16) encoding one 256-token prompt with output_hidden_states."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = meta_chatglm(layers)
    with FakeTensorMode(), LiveBytes() as live:
        materialize_fake(model)
        weights = live.current
        live.tag = "encode"
        ids = torch.ones(1, 256, dtype=torch.long)
        with torch.no_grad():
            # attention_mask=None: a real (padded) mask makes ChatGLM branch on its values, which fake
            # tensors do not have; the mask it would build is 256x256 booleans (64 KiB).
            out = model(input_ids=ids, attention_mask=None,
                        position_ids=torch.arange(256)[None], output_hidden_states=True)
            embeds = out.hidden_states[-2].permute(1, 0, 2).clone()
            pooled = out.hidden_states[-1][-1].clone()
        del out
        kept = embeds.numel() * embeds.element_size() + pooled.numel() * pooled.element_size()
    return {"weights": weights, "peak": live.peak, "transient": live.peak - weights, "output": kept}


def trace_vae_encode(resolution: int, batch: int, dtype: torch.dtype) -> dict:
    """The whole SDXL VAE resident in `dtype`, encoding a batch at `resolution`
    (training.encoding.encode_latents; the trainer's dtype is LATENT_VAE_DTYPE, fp32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    vae = meta_vae(dtype)
    with FakeTensorMode(), LiveBytes() as live:
        materialize_fake(vae)
        weights = live.current
        live.tag = "encode"
        with torch.no_grad():
            pixels = torch.randn(batch, 3, resolution, resolution, dtype=dtype)
            latents = vae.encode(pixels).latent_dist.mode()
        del latents
    return {"weights": weights, "peak": live.peak, "transient": live.peak - weights}


def meta_module(build, dtype: torch.dtype):
    """A module built on the meta device with `dtype` parameters (no memory)."""
    with torch.device("meta"), C.default_dtype(dtype):
        return build().eval()


def _decode_all(vae, latents: torch.Tensor, sliced: bool) -> None:
    """The pipeline's decode with the VAE upcast to fp32 (fp16 + the SDXL VAE's force_upcast):
    one latent at a time with vae.enable_slicing(), else the whole batch at once."""
    for z in (latents.split(1) if sliced else [latents]):
        image = vae.decode(z.float() / 0.13025).sample
        del image


def _cfg_step(unet, latents: torch.Tensor) -> None:
    """One classifier-free-guidance denoising step (UNet batch 2 x latents) in the UNet's dtype,
    the time ids too, as KolorsPipeline passes them."""
    dtype, batch = unet.dtype, 2 * latents.shape[0]
    pred = unet(torch.cat([latents] * 2), torch.tensor([999] * batch),
                encoder_hidden_states=torch.randn(batch, 256, C.SIZES.text_width, dtype=dtype),
                added_cond_kwargs={"text_embeds": torch.randn(batch, C.SIZES.text_width, dtype=dtype),
                                   "time_ids": torch.randn(batch, 6, dtype=dtype)}).sample
    del pred


def trace_generation(resolution: int, images: int, sliced: bool = True) -> dict:
    """A scene job's GPU phase in fp16: the UNet resident, one CFG denoising step of `images`
    latents (UNet batch 2 x images), then the upcast fp32 VAE decoding them (sliced or not)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    unet = meta_module(lambda: UNet2DConditionModel(**C.SIZES.unet), torch.float16)
    vae = meta_module(lambda: AutoencoderKL(**C.SIZES.vae), torch.float32)
    lat = resolution // 8
    with FakeTensorMode(), LiveBytes() as live, torch.no_grad():
        materialize_fake(unet)
        materialize_fake(vae)
        weights = live.current
        live.tag = "denoise"
        latents = torch.randn(images, 4, lat, lat, dtype=torch.float16)
        _cfg_step(unet, latents)
        denoise_peak = live.peak
        live.tag = "decode"
        _decode_all(vae, latents, sliced)
    return {"images": images, "sliced": sliced, "weights": weights, "denoise_peak": denoise_peak,
            "peak": live.peak, "peak_during": live.peak_tag}


def trace_validation(size: int, rank: int) -> dict:
    """The training job's validation (train.validation.every steps): the training state stays (bf16
    UNet, fp32 LoRA, AdamW moments; grads freed), the fp32 VAE and the scorer are resident through
    the whole run (training.validation.Validator); one CFG step at `size` px, the fp32 decode of
    its latent (Validator._decode), then scoring one image."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kolors_story.training.loop import LATENT_VAE_DTYPE

    unet, _, _ = meta_unet(rank)
    vae, scorer = meta_vae(LATENT_VAE_DTYPE), meta_scorer()
    lat = size // 8
    with FakeTensorMode(), LiveBytes() as live:
        weights = {}
        for name, module in (("unet_and_lora", unet), ("vae_weights", vae), ("scorer_weights", scorer)):
            before = live.current
            materialize_fake(module)
            weights[name] = live.current - before
        add_adamw_moments(live, [p for p in unet.parameters() if p.requires_grad])
        resident = live.current
        unet.eval()
        with torch.no_grad():
            live.tag = "denoise"
            latents = torch.randn(1, 4, lat, lat, dtype=torch.bfloat16)
            _cfg_step(unet, latents)
            live.tag = "decode"
            _decode_all(vae, latents, sliced=True)
            live.tag = "score"
            out = scorer(pixel_values=torch.randn(1, 3, 224, 224))
            del out
    return {"size": size, "resident": resident, "peak": live.peak, "peak_during": live.peak_tag, **weights}


def trace_scoring() -> dict:
    """The challenge's predictor (CLIP ViT-L/14 + MLP, fp32) scoring one 224 px image."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = meta_scorer()
    with FakeTensorMode(), LiveBytes() as live, torch.no_grad():
        materialize_fake(model)
        weights = live.current
        live.tag = "score"
        out = model(pixel_values=torch.randn(1, 3, 224, 224))
        del out
    return {"weights": weights, "peak": live.peak}


def generation_phases(resolution: int, candidates: int, margin) -> tuple[dict, dict]:
    """Traces and with-margin peaks of the generation side: best-of-N scene (sliced decode, and
    the old all-at-once decode for comparison), an anchor (one image; its recorded features go to
    host memory as they are made) and scoring."""
    traces = {"scene": trace_generation(resolution, candidates), "anchor": trace_generation(resolution, 1),
              "scene_unsliced": trace_generation(resolution, candidates, sliced=False), "scoring": trace_scoring()}
    name = f"scene_best_of_{candidates}"
    phases = {name: traces["scene"]["peak"], f"{name}_unsliced_decode": traces["scene_unsliced"]["peak"],
              "anchor": traces["anchor"]["peak"], "scoring": traces["scoring"]["peak"]}
    return traces, {k: v + margin(v) for k, v in phases.items()}


def print_card_table(phases: dict) -> bool:
    """Each phase's peak (with margins) against a 24 GiB card; True when every default phase fits."""
    print(f"\nevery GPU phase of the default run against a {CARD_GIB:.0f} GiB card (with margins)")
    fits = True
    for name, value in phases.items():
        ok = gib(value) <= CARD_GIB
        default = not name.endswith("_unsliced_decode")  # the old decode, shown for comparison
        fits &= ok or not default
        note = "" if default else " (before VAE slicing, for comparison)"
        print(f"  {name:<34} {gib(value):6.2f} GiB  {gib(value) / CARD_GIB:5.0%} of {CARD_GIB:.0f} GiB  "
              f"{'fits' if ok else 'DOES NOT FIT'}, headroom {CARD_GIB - gib(value):5.2f} GiB{note}")
    return fits


def tracker_self_check() -> tuple[int, int]:
    """The tracker's peak for one LoRA step of the tiny Kolors UNet, on real and on fake tensors:
    equal numbers mean fake tensors reproduce the real storage lifetimes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kolors_story.models.random_kolors import build_unet
    from kolors_story.training import TrainSettings, add_lora

    def step(fake: bool) -> int:
        unet = build_unet(0)
        if fake:
            unet = unet.to("meta")
        params = add_lora(unet, TrainSettings(rank=4, seed=0))
        ctx = FakeTensorMode() if fake else contextlib.nullcontext()
        with ctx, LiveBytes() as live:
            if fake:
                materialize_fake(unet)
            else:
                for t in [*unet.parameters(), *unet.buffers()]:
                    live.track(t)
            params = [p for p in unet.parameters() if p.requires_grad]
            unet.enable_gradient_checkpointing()
            unet.train()
            opt = torch.optim.AdamW(params, lr=1e-4)
            gen = None if fake else torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, 32, 32, generator=gen)
            emb = torch.randn(1, 256, 32, generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = unet(x, torch.tensor([10]), encoder_hidden_states=emb,
                            added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=gen),
                                               "time_ids": torch.randn(1, 6, generator=gen)}).sample
            torch.nn.functional.mse_loss(pred.float(), x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return live.peak

    return step(False), step(True)


# ---------------------------------------------------------------- report
def gib(n: float) -> float:
    return n / C.GIB


def gb(n: float) -> float:
    return n / 1e9


def line(label: str, n: float, note: str = "") -> None:
    print(f"  {label:<44} {gib(n):7.2f} GiB {gb(n):7.2f} GB  {note}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--check-resolutions", default="256,512",
                        help="comma list of smaller px sizes to trace for the area-scaling cross-check ('' = none)")
    parser.add_argument("--context-gib", type=float, default=0.6, help="CUDA context + kernels, not in any tensor")
    parser.add_argument("--fragmentation", type=float, default=0.10, help="caching-allocator overhead, x tensor peak")
    parser.add_argument("--no-trace", action="store_true", help="only the parameter counts (seconds)")
    parser.add_argument("--no-self-check", dest="self_check", action="store_false",
                        help="skip checking the tracker on real vs fake tensors (tiny model, seconds)")
    parser.add_argument("--candidates", type=int, default=4, help="best-of-N of the traced scene")
    parser.add_argument("--validation-size", type=int, default=512,
                        help="train.validation.size of the traced validation (0: validation off)")
    parser.add_argument("--smoke", action="store_true",
                        help="every phase on the test models' tiny widths at 128 px, best-of-2, a 2-layer ChatGLM, "
                             "no cross-check or self-check (what make test runs: the code path, not the figures)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.resolution, args.check_resolutions, args.self_check, args.candidates = 128, "", False, 2
        args.validation_size = min(args.validation_size, 128)
        C.use_tiny_models()
    return args


def parameter_counts(args: argparse.Namespace) -> dict:
    """1. Parameter counts on the meta device and the static sizes they give: the report's start."""
    _, unet_n, lora_n = meta_unet(args.rank)
    glm = meta_chatglm()
    glm_n = sum(p.numel() for p in glm.parameters())
    glm_layer_n = sum(p.numel() for p in glm.encoder.layers[0].parameters())
    vae = meta_vae()
    vae_n = sum(p.numel() for p in vae.parameters())
    del glm, vae
    known = "tiny (--smoke)" if args.smoke else "matches" if unet_n == C.KOLORS_UNET_PARAMS else "DIFFERS from"
    print(f"parameters (built on the meta device): Kolors UNet {unet_n:,} ({known} FACTS.md), "
          f"LoRA r={args.rank} {lora_n:,}, ChatGLM3-6B {glm_n:,} ({glm_layer_n:,} per layer), SDXL VAE {vae_n:,}")
    analytic = {
        "unet_weights_bf16": 2 * unet_n, "lora_params_fp32": 4 * lora_n, "lora_grads_fp32": 4 * lora_n,
        "adamw_states_fp32": 8 * lora_n, "chatglm_weights_bf16": 2 * glm_n, "vae_weights_bf16": 2 * vae_n,
    }
    print("\nstatic sizes")
    line("UNet weights (bf16)", analytic["unet_weights_bf16"])
    line(f"LoRA r={args.rank} params + grads + AdamW (16 B/param)", 16 * lora_n)
    line("ChatGLM3-6B weights (bf16)", analytic["chatglm_weights_bf16"], "not resident while training")
    line("SDXL VAE weights (bf16)", analytic["vae_weights_bf16"], "not resident while training")
    return {"settings": vars(args) | {"out": str(args.out)},
            "params": {"unet": unet_n, "lora": lora_n, "chatglm3_6b": glm_n, "chatglm_layer": glm_layer_n,
                       "vae": vae_n},
            "analytic_bytes": analytic}


def trace_phases(args: argparse.Namespace, report: dict) -> dict:
    """2. The traces: a UNet LoRA step, ChatGLM encoding, VAE encoding (the trainer's fp32, and bf16
    for the baseline layout), validation, and smaller UNet steps for the cross-check; stored in
    the report and returned by name."""
    from kolors_story.training.loop import LATENT_VAE_DTYPE

    print("\ntracing (FakeTensorMode, no arithmetic; ~40 s per UNet step traced on 2 CPU cores, ~2.5 min in all)...", flush=True)
    unet = trace_unet_step(args.resolution, args.rank, args.batch)
    print(f"  UNet step at {args.resolution} px traced in {unet['trace_s']} s", flush=True)
    text = trace_text_encoding(2 if args.smoke else C.CHATGLM3_6B_LAYERS)  # smoke: the code path, not the size
    vae_t = trace_vae_encode(args.resolution, args.batch, LATENT_VAE_DTYPE)
    vae_bf16 = trace_vae_encode(args.resolution, args.batch, torch.bfloat16)
    valid = trace_validation(args.validation_size, args.rank) if args.validation_size else None
    checks = []
    for r in [int(x) for x in args.check_resolutions.split(",") if x.strip()]:
        checks.append(trace_unet_step(r, args.rank, args.batch))
        print(f"  UNet step at {r} px traced in {checks[-1]['trace_s']} s", flush=True)
    report["traces"] = {"unet_step": unet, "text_encoding": text, "vae_encode": vae_t, "vae_encode_bf16": vae_bf16,
                        "validation": valid, "unet_checks": checks}
    return report["traces"]


def training_phases(args: argparse.Namespace, traces: dict, margin) -> dict:
    """The trainer's phases with margins (text encoding, VAE encoding, the LoRA step with what
    validation keeps resident, validation itself), printed."""
    unet, text, vae_t, valid = traces["unet_step"], traces["text_encoding"], traces["vae_encode"], traces["validation"]
    print(f"\nphase 3, UNet LoRA training step at {args.resolution} px (batch {args.batch}, rank {args.rank}, "
          "gradient checkpointing, bf16 autocast) - traced")
    line("UNet weights (bf16)", unet["unet_weights"])
    line("LoRA params (fp32)", unet["lora_params"])
    line("AdamW moments (fp32)", unet["adamw_states"])
    line("activations + grads + temporaries at the peak", unet["transient_at_peak"],
         f"(peak during {unet['peak_during']})")
    line("  of which kept by the forward (checkpoints)", unet["forward_saved"])
    line("  of which LoRA grads (fp32, at most)", unet["lora_grads"])
    resident = valid["vae_weights"] + valid["scorer_weights"] if valid else 0
    if valid:
        line("+ validation's fp32 VAE and aesthetic scorer (resident)", resident)
    step_peak = unet["peak"] + resident
    line("tensor peak (~ torch.cuda.max_memory_allocated)", step_peak)
    line(f"+ context {args.context_gib} GiB + {args.fragmentation:.0%} fragmentation", margin(step_peak))
    phases = {"training": step_peak + margin(step_peak)}
    line("= estimated GPU memory, training phase", phases["training"])
    if valid:
        line(f"validation at {valid['size']} px (CFG step, fp32 decode, scoring): tensor peak", valid["peak"],
             f"(peak during {valid['peak_during']})")
        phases["validation"] = valid["peak"] + margin(valid["peak"])

    print("\nphases before training (models freed in between)")
    line("1. ChatGLM3-6B encoding a caption: tensor peak", text["peak"],
         f"(weights {gib(text['weights']):.2f} GiB + {gib(text['transient']):.2f} GiB)")
    line(f"2. SDXL VAE (fp32) encoding {args.resolution} px: tensor peak", vae_t["peak"],
         f"(weights {gib(vae_t['weights']):.2f} GiB + {gib(vae_t['transient']):.2f} GiB)")
    return {"text_encoding": text["peak"] + margin(text["peak"]),
            "vae_encoding": vae_t["peak"] + margin(vae_t["peak"]), **phases}


def baseline_layout(unet: dict, text: dict, vae_t: dict, margin) -> tuple[float, float]:
    """DiffSynth-style: ChatGLM and a bf16 VAE resident during the UNet step (encodes run before
    its forward): (tensor peak, with margins), printed."""
    resident = text["weights"] + vae_t["weights"]
    base_peak = max(resident + unet["peak"],
                    resident + unet["unet_weights"] + unet["lora_params"] + unet["adamw_states"]
                    + max(text["transient"], vae_t["transient"]))
    base_total = base_peak + margin(base_peak)
    print("\nbaseline layout (DiffSynth-Studio 1.1: ChatGLM + VAE + UNet resident), same step")
    line("tensor peak", base_peak)
    line("with margins", base_total, f"(reported for the challenge baseline: ~{BASELINE_REPORTED_GB:.0f} GB)")
    return base_peak, base_total


def area_cross_check(args: argparse.Namespace, unet: dict, checks: list[dict], report: dict) -> None:
    """3. Transient memory = a + b * latent area, fitted on the small traces, against the direct one."""
    print("\ncross-check: transient memory (peak - persistent) extrapolated by latent area")
    for c in checks:
        area = (args.resolution / c["resolution"]) ** 2
        print(f"  {c['resolution']:>4} px: {gib(c['transient_at_peak']):6.3f} GiB; x {area:.0f} (pure area scaling) = "
              f"{gib(c['transient_at_peak'] * area):6.2f} GiB")
    if len(checks) >= 2:
        (r0, y0), (r1, y1) = [(c["latent"] ** 2, c["transient_at_peak"]) for c in checks[-2:]]
        b = (y1 - y0) / (r1 - r0)
        a = y0 - b * r0
        pred = a + b * unet["latent"] ** 2
        report["area_fit"] = {"constant": a, "per_latent_pixel": b, "predicted": pred}
        print(f"  linear fit a + b*area from {checks[-2]['resolution']} and {checks[-1]['resolution']} px: "
              f"{gib(pred):.2f} GiB at {args.resolution} px")
    print(f"  direct trace at {args.resolution} px: {gib(unet['transient_at_peak']):.2f} GiB")
    if args.self_check:
        real, fake = tracker_self_check()
        report["tracker_self_check"] = {"real": real, "fake": fake}
        print(f"\ntracker self-check (tiny Kolors UNet LoRA step, same code on real vs fake tensors): "
              f"real {real / 2**20:.2f} MiB, fake {fake / 2**20:.2f} MiB peak")


def write_report(args: argparse.Namespace, report: dict, start: float) -> None:
    report["total_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({report['total_s']:.0f} s)")


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    report = parameter_counts(args)
    if args.no_trace:
        write_report(args, report, start)
        return
    traces = trace_phases(args, report)
    unet, text, checks = traces["unet_step"], traces["text_encoding"], traces["unet_checks"]
    margin = lambda peak: peak * args.fragmentation + args.context_gib * C.GIB  # noqa: E731
    phases = training_phases(args, traces, margin)
    worst = max(phases, key=phases.get)
    line(f"trainer peak = max over its phases ({worst}), with margins", phases[worst])
    generation, generation_peaks = generation_phases(args.resolution, args.candidates, margin)
    report["traces"]["generation"] = generation
    print(f"\ngeneration phases at {args.resolution} px, fp16 UNet, upcast fp32 VAE - traced")
    for name, value in generation_peaks.items():
        line(f"{name}: with margins", value)
    base_peak, base_total = baseline_layout(unet, text, traces["vae_encode_bf16"], margin)
    area_cross_check(args, unet, checks, report)

    verdict = "UNDER" if gb(phases[worst]) < GOAL_GB else "OVER"
    print(f"\nestimate: {gb(phases[worst]):.1f} GB ({gib(phases[worst]):.1f} GiB) peak for the project's trainer "
          f"-> {verdict} the {GOAL_GB:.0f} GB goal; baseline layout {gb(base_total):.1f} GB "
          f"(reported {BASELINE_REPORTED_GB:.0f} GB)")
    every = {**phases, **generation_peaks}
    fits = print_card_table(every)
    report["estimate"] = {"phases_with_margins": every, "peak_phase": worst, "peak": phases[worst],
                          "card_gib": CARD_GIB, "default_run_fits_card": fits,
                          "baseline_layout_peak": base_peak, "baseline_layout_with_margins": base_total,
                          "goal_gb": GOAL_GB, "under_goal": verdict == "UNDER",
                          "margins": {"context_gib": args.context_gib, "fragmentation": args.fragmentation}}
    write_report(args, report, start)


if __name__ == "__main__":
    main()
