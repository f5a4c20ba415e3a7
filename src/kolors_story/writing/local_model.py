"""The prompt writer's local backend, for a GPU host without a server: a chat model folder
(`Qwen/Qwen2.5-7B-Instruct` from ModelScope, or any transformers causal LM with a chat template)
run in the writer's own job through transformers.

Constrained decoding: the reply's JSON skeleton is fixed by the outline, so the model writes only
the strings. It is shown `{"scenes": [{"id": "s1", "prompt": "` and continues until it closes the
string (a `"`, a line break, its end-of-turn token or `max_new_tokens`); then the skeleton goes
on with the next field. The reply is that skeleton with the strings in it, serialised by `json`:
always JSON of the asked form, whatever the model, and the writer's checks judge the words (a
character's description missing, too many tokens) as they judge a server's reply.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolors_story.writing.llm_client import ChatSettings, LLMError

log = logging.getLogger(__name__)
STOPS = ('"', "\n")  # what ends a string: its closing quote, or a line break no prompt holds


def _skeleton_head(scene_id: str, first: bool) -> str:
    return ('{"scenes": [' if first else ", ") + f'{{"id": {json.dumps(scene_id, ensure_ascii=False)}, '


@dataclass
class LocalWriter:
    """One model loaded once for every reply of a writing (its retries included)."""

    settings: ChatSettings
    ids: list[str]
    _loaded: tuple[Any, Any] | None = field(default=None, repr=False)

    def load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            self._loaded = load_chat_model(Path(self.settings.model))
        return self._loaded

    def ask(self, messages: list[dict[str, str]], settings: ChatSettings) -> str:
        """The reply to `messages`: the outline's skeleton with the model's strings, as JSON text
        (`"prompts": [...]` with prompt_writer.variants > 1, as scene_prompts.reply_format asks)."""
        model, tokenizer = self.load()
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        scenes = []
        for i, scene_id in enumerate(self.ids):
            text += _skeleton_head(scene_id, first=i == 0)
            written: dict[str, Any] = {"id": scene_id}
            if settings.variants == 1:
                text += '"prompt": "'
                written["prompt"], text = self._string(text, settings)
            else:
                text += '"prompts": ["'
                written["prompts"] = []
                for k in range(settings.variants):
                    text += "" if k == 0 else ', "'
                    string, text = self._string(text, settings)
                    written["prompts"].append(string)
                text += "]"
            text += ', "negative_prompt": "'
            written["negative_prompt"], text = self._string(text, settings)
            text += "}"
            scenes.append(written)
        return json.dumps({"scenes": scenes}, ensure_ascii=False)

    def _string(self, text: str, settings: ChatSettings) -> tuple[str, str]:
        """The string the model writes after `text` (an open quote), and `text` with it closed."""
        model, tokenizer = self.load()
        string = continue_string(model, tokenizer, text, settings)
        return string, text + json.dumps(string, ensure_ascii=False)[1:]


def load_chat_model(path: Path) -> tuple[Any, Any]:
    """The model (bf16 on a GPU, fp32 on the CPU) and its tokenizer, from a local folder, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise LLMError(f"prompt_writer.model: {path} is not a model folder (no config.json); give a folder "
                       "laid out like Qwen/Qwen2.5-7B-Instruct, or its ModelScope id")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise LLMError(f"prompt_writer.model: {path} has no chat template (tokenizer_config.json "
                       "chat_template); use an instruct/chat model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    log.info("prompt writer model %s on %s (%s)", path, device, str(dtype).removeprefix("torch."))
    return model, tokenizer


class StringEnd:
    """Stops generating once the new text holds one of STOPS (transformers' stop_strings builds
    tables over the whole 152k vocabulary on every call; this decodes only the new tokens)."""

    def __init__(self, tokenizer: Any, start: int) -> None:
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        text = self.tokenizer.decode(input_ids[0, self.start:], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in STOPS)], device=input_ids.device)


def continue_string(model: Any, tokenizer: Any, text: str, settings: ChatSettings) -> str:
    """What the model writes after `text` up to the string's end (STOPS), stripped."""
    import torch
    from transformers import StoppingCriteriaList

    if settings.seed is not None:
        torch.manual_seed(settings.seed)  # the same request gives the same reply, sampling or not
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    start = inputs["input_ids"].shape[1]
    sampling = settings.temperature > 0
    options: dict[str, Any] = {"do_sample": True, "temperature": settings.temperature} if sampling else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=settings.max_new_tokens,
                             stopping_criteria=StoppingCriteriaList([StringEnd(tokenizer, start)]),
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **options)
    new = tokenizer.decode(out[0, start:], skip_special_tokens=True)
    for stop in STOPS:
        new = new.split(stop)[0]
    return new.strip()
