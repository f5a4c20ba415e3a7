"""The one owner of the OpenAI-compatible chat endpoint: DashScope's compatible mode by default
(FACTS.md: base URL, `response_format` needs the word JSON in the messages), any vLLM, Ollama or
other server by `base_url`. The `openai` package is the client; every way a request can fail is
turned into one line saying what to check, within seconds (a bounded timeout and retries).

The API key is read from the environment only (the variable `api_key_env` names), never from a
config file, and never written anywhere: not in a request record, a cache entry or a message.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from kolors_story.errors import UserError

DASHSCOPE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"


class LLMError(UserError):
    """A request to the language model that failed: the message says what to check."""


@dataclass(frozen=True)
class ChatSettings:
    """prompt_writer.* of the config (schemas/config.schema.yaml holds the defaults)."""
    backend: str = "openai"  # an OpenAI-compatible server; "local": a model folder in the job (local_model)
    base_url: str = DASHSCOPE_URL
    model: str = "qwen-plus"  # the server's model name; with backend local, the model folder
    api_key_env: str | None = "DASHSCOPE_API_KEY"  # None: a local server that takes no key
    temperature: float = 0.0
    seed: int | None = 0
    timeout_s: float = 60.0
    max_retries: int = 3  # 429, 5xx and lost connections, with the client's backoff
    json_mode: bool = True  # response_format {"type": "json_object"}
    attempts: int = 3  # replies asked for when one fails its checks (the first included)
    max_new_tokens: int = 160  # backend local: the most tokens the model writes for one string
    variants: int = 1  # prompts asked per scene; more than one: the scene's best-of-N picks among them
    owner: str = "prompt_writer"  # the config section these settings come from, named in messages

    def identity(self) -> dict[str, Any]:
        """What makes a reply: part of its cache key. Not the key, the timeout or the retries, nor
        what the other backend alone reads."""
        record = asdict(self)
        for name in ("api_key_env", "timeout_s", "max_retries", "attempts", "owner"):
            record.pop(name)
        record.pop("base_url" if self.backend == "local" else "max_new_tokens")
        return record


def api_key(settings: ChatSettings) -> str:
    if settings.api_key_env is None:
        return "none"  # the client insists on a value; a local server ignores it
    key = os.environ.get(settings.api_key_env, "").strip()
    if not key:
        raise LLMError(f"{settings.owner}: the environment variable {settings.api_key_env} is not set; export "
                       f"your key there (DashScope: the console's API-KEY page), or set "
                       f"{settings.owner}.api_key_env: null for a server that takes no key")
    return key


def chat(messages: list[dict[str, Any]], settings: ChatSettings) -> str:
    """The model's reply to `messages` (its text), or LLMError in one line. A message's content is
    text, or a list of parts (text and image_url, as vision models take it: writing.captioners)."""
    import openai  # here: only the prompt writer's and the captioner's jobs need it

    key = api_key(settings)
    client = openai.OpenAI(api_key=key, base_url=settings.base_url, timeout=settings.timeout_s,
                           max_retries=settings.max_retries)
    options: dict[str, Any] = {"model": settings.model, "messages": messages, "temperature": settings.temperature}
    if settings.seed is not None:
        options["seed"] = settings.seed
    if settings.json_mode:
        options["response_format"] = {"type": "json_object"}
    try:
        reply = client.chat.completions.create(**options)
    except openai.OpenAIError as exc:
        raise LLMError(_explain(exc, settings).replace(key, "***")) from None
    finally:
        client.close()
    if not reply.choices:
        raise LLMError(f"{settings.base_url}: the reply of model {settings.model} holds no choices")
    return reply.choices[0].message.content or ""


def _explain(exc: Exception, settings: ChatSettings) -> str:
    """One line for each way a request fails, naming the setting to check."""
    import openai

    where, tries = f"{settings.base_url} (model {settings.model})", settings.max_retries + 1
    if isinstance(exc, openai.AuthenticationError):
        return (f"{where}: 401, the key in ${settings.api_key_env} was refused; check it (and that it "
                "belongs to this endpoint's region)")
    if isinstance(exc, openai.PermissionDeniedError):
        return f"{where}: 403, this key may not use the model; check the model name and your account"
    if isinstance(exc, openai.NotFoundError):
        return f"{where}: 404, no such model or path; check {settings.owner}.model and {settings.owner}.base_url"
    if isinstance(exc, openai.RateLimitError):
        return (f"{where}: 429 (rate limit or quota) after {tries} tries with backoff; wait and rerun, or "
                "check your quota")
    if isinstance(exc, openai.APITimeoutError):
        return (f"{where}: no reply within {settings.timeout_s:g} s, {tries} tries; check the server, or "
                f"raise {settings.owner}.timeout_s")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return (f"{where}: cannot connect ({type(cause).__name__}: {cause}); check {settings.owner}.base_url "
                "and the network")
    if isinstance(exc, openai.APIStatusError):
        return f"{where}: {exc.status_code} after {tries} tries: {exc.message}"
    return f"{where}: {type(exc).__name__}: {exc}"
