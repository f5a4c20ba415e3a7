"""ChatGLM prompt encoding exactly as KolorsPipeline.encode_prompt does it."""

from __future__ import annotations

import torch

MAX_SEQUENCE_LENGTH = 256  # Kolors' ChatGLM context for prompts


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (prompt_embeds [B, 256, W], pooled [B, W]) for a list of prompts.

    Prompt embeddings are ChatGLM's hidden_states[-2]; the pooled vector is the last token of
    hidden_states[-1] (what Kolors' UNet takes as `text_embeds`).
    """
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=MAX_SEQUENCE_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).to(device)
    output = text_encoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        position_ids=inputs["position_ids"],
        output_hidden_states=True,
    )
    prompt_embeds = output.hidden_states[-2].permute(1, 0, 2).clone()
    pooled = output.hidden_states[-1][-1, :, :].clone()
    return prompt_embeds, pooled
