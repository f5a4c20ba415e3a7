"""The two captioners behind caption.backend, each turning one image (and a seed) into one caption:

* `DataJuicerCaptioner`: Data-Juicer's own `image_captioning_mapper` (a BLIP or BLIP-2 model
  folder, loaded by Data-Juicer through AutoProcessor and the class its config.json names). The op
  calls generate() with `do_sample=True` hard-coded (py-data-juicer 1.6.1), so every random
  generator it can reach (torch, CUDA, numpy, random) is seeded before each image: the same image,
  model, prompt and seed give the same caption, whatever else the job captions.
* `OpenAICaptioner`: an OpenAI-compatible vision chat model (qwen-vl-plus on DashScope, Qwen2.5-VL
  on a vLLM server), the image sent inline as a base64 data URL, through the prompt writer's client
  (llm_client: the key from the environment only, one line for each way a request fails).

Both are built only when an image misses the cache (writing.captions), so a run whose captions are
all cached loads no model and opens no connection.
"""

from __future__ import annotations

import base64
import logging
import os
import random
from pathlib import Path
from typing import Any, Protocol

from kolors_story.errors import UserError
from kolors_story.writing.llm_client import ChatSettings, LLMError, chat

log = logging.getLogger(__name__)

# What a style LoRA's captions should say: the content, not the style (the LoRA learns the style
# from what the captions leave out), in Chinese, the language Kolors' ChatGLM was trained on.
DEFAULT_OPENAI_PROMPT = ("用一句简洁的中文描述这张图片的内容：画面主体、动作、场景与构图。"
                         "不要描述画风或艺术风格，不要超过六十个字，只输出这句描述。")
IMAGE_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif", b"BM": "image/bmp"}


class Captioner(Protocol):
    def caption(self, image: Path, seed: int) -> str:
        """One caption of `image` (may be empty), or UserError naming the image."""


def seed_everything(seed: int) -> None:
    """Seed every generator a sampling generate() can draw from (Data-Juicer picks with `random`)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device's generator


class DataJuicerCaptioner:
    """Data-Juicer's `image_captioning_mapper` on one image at a time, seeded per image."""

    def __init__(self, model_dir: str, prompt: str | None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a folder: never a hub lookup (FACTS.md: ~49 s a row)
        if not (Path(model_dir) / "config.json").is_file():
            raise UserError(f"caption.model: '{model_dir}' is not a model folder (no config.json); give a "
                            "BLIP or BLIP-2 folder or ModelScope id (e.g. the demo's resources/tiny/blip)")
        from data_juicer.ops.mapper.image_captioning_mapper import ImageCaptioningMapper

        self.model_dir = model_dir
        self.op = ImageCaptioningMapper(hf_img2seq=str(model_dir), caption_num=1, keep_candidate_mode="random_any",
                                        keep_original_sample=False, prompt=prompt or None)
        self._load()
        log.info("captioning with Data-Juicer's image_captioning_mapper, model %s", model_dir)

    def _load(self) -> None:
        """The model loaded now, not inside the first caption: loading draws from torch's generator
        (weights initialised before the file's are copied in), which would unseed the first image."""
        from data_juicer.utils.model_utils import get_model

        try:
            get_model(self.op.model_key, None, self.op.use_cuda())
        except (OSError, ValueError) as exc:
            raise UserError(f"caption.model: cannot load {self.model_dir} as a captioning model "
                            f"({type(exc).__name__}: {exc}); give a BLIP or BLIP-2 folder") from exc

    def caption(self, image: Path, seed: int) -> str:
        from data_juicer.utils.mm_utils import SpecialTokens, remove_special_tokens

        seed_everything(seed)
        sample = {self.op.text_key: [SpecialTokens.image], self.op.image_key: [[str(image)]]}
        try:
            out = self.op.process_batched(sample)
        except Exception as exc:  # noqa: BLE001 (the op raises whatever its model raises)
            raise UserError(f"caption of {image}: Data-Juicer's image_captioning_mapper with model "
                            f"{self.model_dir} failed ({type(exc).__name__}: {exc})") from exc
        texts = out.get(self.op.text_key) or [""]
        return remove_special_tokens(texts[0]).strip()


def image_data_url(image: Path) -> str:
    """The image as a `data:<type>;base64,...` URL (what OpenAI-compatible vision models take inline)."""
    data = Path(image).read_bytes()
    kind = next((t for magic, t in IMAGE_TYPES.items() if data.startswith(magic)), None)
    if kind is None:
        kind = "image/webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def vision_messages(image: Path, prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                         {"type": "text", "text": prompt}]}]


class OpenAICaptioner:
    """A vision chat model behind an OpenAI-compatible endpoint (llm_client.chat)."""

    def __init__(self, settings: ChatSettings, prompt: str) -> None:
        self.settings, self.prompt = settings, prompt

    def caption(self, image: Path, seed: int) -> str:
        try:
            return chat(vision_messages(image, self.prompt), self.settings).strip()
        except LLMError as err:
            raise LLMError(f"caption of {image}: {err}") from None
