"""One training caption per kept image of the style set, written by a captioner (caption.backend:
Data-Juicer's image captioning op or an OpenAI-compatible vision model, writing.captioners).

* A row whose user wrote a caption (sidecar, metadata file, dataset column: the row's `caption`)
  keeps its training text and is not sent, with caption.keep_existing (the default).
* Every other image's caption comes from the cache or the captioner. The cache (reply_cache, one
  atomic file an entry) is keyed by the sha256 of the image's bytes, the backend, the model, the
  prompt, the generation settings and the seed, not by caption.template: a template edit captions
  nothing again, an added image captions that image only. A failed request caches nothing.
* An empty caption falls back to the user's caption, else dataset.default_caption, with a warning
  naming the image: nothing trains on empty text. A caption over ChatGLM's 256 tokens is cut to
  what ChatGLM keeps, with a warning naming the image and its count.
* caption.template joins {trigger} (bundle.trigger_words: the words the model card says call the
  style), {caption} (the generated caption, or its fallback) and {user_caption}; separators left
  at either end by an empty field are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kolors_story.chatglm_tokens import MAX_TOKENS, count_tokens, fitting_text
from kolors_story.errors import UserError
from kolors_story.files import sha256_file
from kolors_story.run_files import CAPTION_FILES
from kolors_story.writing.captioners import DEFAULT_OPENAI_PROMPT, Captioner
from kolors_story.writing.llm_client import DASHSCOPE_URL, ChatSettings
from kolors_story.writing.reply_cache import ReplyCache

log = logging.getLogger(__name__)

BACKENDS = ("none", "data_juicer", "openai")
TEMPLATE_FIELDS = ("trigger", "caption", "user_caption")
END_SEPARATORS = " \t,，、;；:：|"


@dataclass(frozen=True)
class CaptionSettings:
    """caption.* of the config (schemas/config.schema.yaml holds the defaults and the meanings)."""

    backend: str = "none"
    model: str | None = None  # data_juicer: the model folder; openai: the server's model name
    prompt: str | None = None  # None: the backend's default (openai: a Chinese caption)
    template: str = "{trigger}，{caption}"
    keep_existing: bool = True
    seed: int = 0
    base_url: str = DASHSCOPE_URL
    api_key_env: str | None = "DASHSCOPE_API_KEY"
    temperature: float = 0.0
    timeout_s: float = 60.0
    max_retries: int = 3

    def effective_prompt(self) -> str | None:
        if self.prompt is not None:
            return self.prompt
        return DEFAULT_OPENAI_PROMPT if self.backend == "openai" else None

    def identity(self) -> dict[str, Any]:
        """What makes a caption: part of each image's cache key. Not the template or keep_existing
        (they use captions, not make them), nor the key's variable, the timeout or the retries."""
        record = {"backend": self.backend, "model": self.model, "prompt": self.effective_prompt(), "seed": self.seed}
        if self.backend == "openai":
            record.update(base_url=self.base_url, temperature=self.temperature)
        return record

    def chat_settings(self) -> ChatSettings:
        return ChatSettings(backend="openai", base_url=self.base_url, model=str(self.model),
                            api_key_env=self.api_key_env, temperature=self.temperature, seed=self.seed,
                            timeout_s=self.timeout_s, max_retries=self.max_retries, json_mode=False,
                            owner="caption")


def check_template(template: str, key: str = "caption.template") -> None:
    """UserError naming `key` for a template with a field other than {trigger}, {caption},
    {user_caption}, a positional or formatted field, or unbalanced braces."""
    allowed = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UserError(f"config key '{key}': {template!r} is not a valid template ({exc}); write a literal "
                        "brace as {{ or }}") from None
    for name, spec, conv in fields:
        if name not in TEMPLATE_FIELDS or spec or conv:
            raise UserError(f"config key '{key}': unknown field {{{name}}} in {template!r}; the fields are "
                            f"{allowed} (a literal brace is written {{{{ or }}}})")
    if not any(name in ("caption", "user_caption") for name, _, _ in fields):
        raise UserError(f"config key '{key}': {template!r} uses neither {{caption}} nor {{user_caption}}; every "
                        "image would get the same text")


def fill_template(template: str, trigger: str, caption: str, user_caption: str) -> str:
    text = template.format(trigger=trigger.strip(), caption=caption.strip(), user_caption=user_caption.strip())
    return text.strip(END_SEPARATORS)


def image_seed(seed: int, image_sha256: str) -> int:
    """The sampling seed of one image: from caption.seed and the image's bytes, so that an image's
    caption does not depend on which other images the job captions, or in what order."""
    return int(hashlib.sha256(f"{seed}:{image_sha256}".encode()).hexdigest()[:8], 16)


def user_caption(row: dict) -> str:
    """The caption the user gave the row: its `caption`, "" when dataset.default_caption made its
    text (data/rows.py) or for a row read before rows carried one."""
    return str(row.get("caption") or "").strip()


@dataclass
class CaptionRecord:
    """One kept image's line of captions.jsonl: its final text and where it came from."""

    id: str
    image: str  # the image as the user knows it: its file in dataset.path, else its file name
    text: str  # the training text
    source: str  # user | generated | fallback
    generated: str | None  # the captioner's caption (after any cut), None when not asked
    user_caption: str
    model: str | None
    tokens: int  # ChatGLM tokens of `text`
    cached: bool = False
    warnings: list[str] = field(default_factory=list)
    request: dict[str, Any] | None = None  # its cache key (the image's sha256 and what made the caption)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CaptionRun:
    """Captions for rows under one CaptionSettings: the captioner is made on the first cache miss."""

    def __init__(self, settings: CaptionSettings, make_captioner: Callable[[], Captioner], cache: ReplyCache,
                 trigger: str, default_caption: str) -> None:
        if settings.backend not in BACKENDS[1:]:
            raise UserError(f"config key 'caption.backend': {settings.backend!r} writes no captions; "
                            f"use one of {', '.join(BACKENDS[1:])}")
        check_template(settings.template)
        self.settings, self.cache, self._make = settings, cache, make_captioner
        self.trigger, self.default_caption = trigger, default_caption
        self._captioner: Captioner | None = None
        self.asked = 0  # images sent to the captioner in this run

    def request(self, image_sha256: str) -> dict[str, Any]:
        """An image's cache key: its bytes' digest and what makes its caption."""
        return {"image_sha256": image_sha256, **self.settings.identity()}

    def generated(self, image: Path) -> tuple[str, bool, dict[str, Any]]:
        """(caption, from the cache, cache key) of one image; the captioner asked, and its answer
        cached, on a miss."""
        digest = sha256_file(image)
        request = self.request(digest)
        cached = self.cache.get(request)
        if cached is not None:
            return cached, True, request
        if self._captioner is None:
            self._captioner = self._make()
        caption = self._captioner.caption(image, image_seed(self.settings.seed, digest))  # raises: nothing cached
        self.asked += 1
        self.cache.put(request, caption)
        return caption, False, request

    def _fit(self, record: CaptionRecord, caption: str) -> str:
        n = count_tokens(caption)
        if n <= MAX_TOKENS:
            return caption
        record.warnings.append(f"generated caption of {record.image}: {n} tokens, more than ChatGLM's "
                               f"{MAX_TOKENS}; cut to the first {MAX_TOKENS} (what ChatGLM would keep)")
        return fitting_text(caption)

    def caption_row(self, row: dict) -> CaptionRecord:
        """The record of one row: its user's caption kept, or one generated (or its fallback)."""
        user, image = user_caption(row), Path(row["image"])
        name = str(row.get("source") or image.name)  # in warnings and records: no absolute paths in results
        fallback = user or self.default_caption
        record = CaptionRecord(id=str(row["id"]), image=name, text="", source="generated",
                               generated=None, user_caption=user, model=self.settings.model, tokens=0)
        if user and self.settings.keep_existing:
            record.text, record.source, record.model = str(row["text"]), "user", None
        else:
            caption, record.cached, record.request = self.generated(image)
            record.generated = self._fit(record, caption.strip())
            if not record.generated:
                record.source = "fallback"
                record.warnings.append(f"empty caption for {name} from {self.settings.model}; using "
                                       f"{'its own caption' if user else 'dataset.default_caption'} {fallback!r}")
            record.text = fill_template(self.settings.template, self.trigger, record.generated or fallback, user)
        if not record.text:
            record.text, record.source = self.default_caption, "fallback"
            record.warnings.append(f"caption.template gave {name} an empty text; using dataset.default_caption")
        record.tokens = count_tokens(record.text)
        return record

    def caption_rows(self, rows: list[dict]) -> tuple[list[dict], list[CaptionRecord]]:
        """(rows with `text` the final caption and `caption_source`, one record per row), in order."""
        from tqdm import tqdm

        out, records = [], []
        for row in tqdm(rows, desc="captioning", unit="image", file=sys.stderr, mininterval=5):
            record = self.caption_row(row)
            for warning in record.warnings:
                log.warning("%s", warning)
            records.append(record)
            out.append({**row, "text": record.text, "caption_source": record.source})
        counts = {s: sum(r.source == s for r in records) for s in ("user", "generated", "fallback")}
        log.info("captions: %(user)d kept from the user, %(generated)d generated, %(fallback)d fallbacks", counts)
        log.info("%d image(s) sent to the captioner, %d from the cache", self.asked,
                 sum(r.cached for r in records))
        return out, records


def captioner_for(settings: CaptionSettings) -> Callable[[], Captioner]:
    """The backend's captioner, made when first needed (a fully cached run loads and asks nothing)."""
    from kolors_story.writing.captioners import DataJuicerCaptioner, OpenAICaptioner

    if not settings.model:
        raise UserError(f"config key 'caption.model': caption.backend {settings.backend} needs a model")
    if settings.backend == "data_juicer":
        return lambda: DataJuicerCaptioner(str(settings.model), settings.effective_prompt())
    return lambda: OpenAICaptioner(settings.chat_settings(), str(settings.effective_prompt()))


def seed_cache(records: list[dict[str, Any]], cache: ReplyCache) -> int:
    """Put each generated caption of a captions.jsonl (results/<run>/data/) into the cache, so that
    a run reproduced in another folder captions nothing; returns how many entries were added. An
    entry is keyed as the job keys it, so a caption only ever answers the same image and settings."""
    added = 0
    for record in records:
        request, caption = record.get("request"), record.get("generated")
        if request and caption is not None and cache.get(request) is None:
            cache.put(request, caption)
            added += 1
    return added


RECORDS = Path("data") / CAPTION_FILES["record"]  # a run's captions record, under results/<run>/


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def seed_from_results(results: Path, cache: ReplyCache) -> int:
    """Every results/<run>/data/captions.jsonl into the cache (entries it lacks only); returns how
    many were added. A record that cannot be read is skipped with a warning: it only saves calls."""
    added = 0
    for path in sorted(Path(results).glob(f"*/{RECORDS}")):
        try:
            added += seed_cache(read_records(path), cache)
        except (OSError, ValueError) as err:
            log.warning("captions record %s not read (%s); its images are captioned again", path, err)
    return added
