"""Tiny random-weight stand-ins for the real models, built in code so tests and the demo run offline.

Each builder writes a folder in the same layout as the real hub repo, so the code that loads the
real model loads the tiny one unchanged.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from aesthetics_predictor import AestheticsPredictorV2Linear
from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizerFast, CLIPVisionConfig
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from kolors_story.models.hub import check_aesthetic_dir

# ---------------------------------------------------------------------------------------------
# Aesthetic predictor (the challenge metric): AestheticsPredictorV2Linear + CLIPProcessor
# ---------------------------------------------------------------------------------------------

# The real predictor's preprocessing (CLIP ViT-L/14): bicubic short side 224, centre crop 224.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CLIP_IMAGE_SIZE = 224
BICUBIC = 3  # PIL.Image.BICUBIC, as stored in the real preprocessor_config.json

# Score the tiny head gives an image of the CLIP mean colour; others spread around it.
TINY_SCORE_CENTRE = 5.0
# Gain on the last head layer: with it random images spread by about one point (seed dependent).
TINY_HEAD_GAIN = 15.0



def tiny_clip_vision_config() -> CLIPVisionConfig:
    """A 2-layer CLIP vision tower that still takes real 224 px CLIP inputs (7x7 patches of 32)."""
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=32,
        projection_dim=32,
    )


def _init_predictor_weights(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from one generator, in name order, so a seed fixes the weights.

    Layer norms are identity; matrices are N(0, 1/fan_in) so activations keep their scale through
    the tower and the 32-1024-128-64-16-1 head.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            elif param.dim() == 1:  # class embedding
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))


def _centre_head(model: torch.nn.Module, pixels: int) -> None:
    """Scale the last layer and set its bias so an image of the CLIP mean colour scores 5.

    Random towers map all images near one common direction; without centring, scores of a seed
    sit far from the real metric's range. Centring on a fixed input keeps this deterministic.
    """
    last = model.layers[-1]
    with torch.no_grad():
        last.weight.mul_(TINY_HEAD_GAIN)
        last.bias.zero_()
        mean_colour = torch.zeros(1, 3, pixels, pixels)  # normalised mean colour = 0
        raw = model(pixel_values=mean_colour).logits[0, 0]
        last.bias.fill_(TINY_SCORE_CENTRE - float(raw))


def _write_tiny_clip_tokenizer_files(tok_dir: Path) -> None:
    """Write a byte-level CLIP BPE vocab with a few merges (CLIPProcessor needs a tokenizer)."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    vocab += ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tok_dir / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (tok_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def _clip_processor() -> CLIPProcessor:
    """The real CLIP ViT-L/14 image preprocessing plus the tiny tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        _write_tiny_clip_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizerFast(
            vocab_file=str(tok_dir / "vocab.json"), merges_file=str(tok_dir / "merges.txt")
        )
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        resample=BICUBIC,
        do_center_crop=True,
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def full_clip_vision_config() -> CLIPVisionConfig:
    """CLIP ViT-L/14's vision tower, the real predictor's (FACTS.md): 24 layers of width 1024."""
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=CLIP_IMAGE_SIZE, patch_size=14, projection_dim=768)


def build_tiny_aesthetic_predictor(out_dir: Path, seed: int = 0, config: CLIPVisionConfig | None = None) -> Path:
    """Save a tiny random AestheticsPredictorV2Linear in the real predictor repo's layout.

    Loads with `AestheticsPredictorV2Linear.from_pretrained(out_dir)` and
    `CLIPProcessor.from_pretrained(out_dir)` offline; same seed -> same weights and scores.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or tiny_clip_vision_config()  # full_clip_vision_config(): the real shapes
    model = AestheticsPredictorV2Linear(config).eval()
    _init_predictor_weights(model, seed)
    _centre_head(model, config.image_size)
    # The real predictor ships a pickle (pytorch_model.bin), not safetensors (FACTS.md).
    model.save_pretrained(out_dir, safe_serialization=False)
    _clip_processor().save_pretrained(out_dir)
    check_aesthetic_dir(out_dir)
    return out_dir
