"""The story's words written by a language model: the one OpenAI-compatible chat client
(llm_client: DashScope's compatible mode by default, vLLM, Ollama or any server by base_url), the
cache of its replies keyed by request (reply_cache), and the scene prompt writer that turns the
story outline into checked prompts (scene_prompts), and the captions of the style images
(captions: keep, cache, template, fallback; captioners: Data-Juicer's captioning op or an
OpenAI-compatible vision model through the same client).

Imports nothing of the library but the package root's shared modules: plan and host call it.
"""
