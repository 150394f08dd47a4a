"""Prompt text -> token ids with a checkpoint's tokenizer and chat template (every engine family)."""

from __future__ import annotations

from .params import InvalidRequest


def encode_completion(tokenizer, prompt: str) -> list[int]:
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string", param="prompt")
    return list(tokenizer(prompt)["input_ids"])


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest("each message must be an object with a string role")
        if not isinstance(message.get("content"), str):
            # Multimodal parts (images, audio) are out of scope: say so rather than drop them.
            raise InvalidRequest(f"messages[{i}].content: only text message content is supported")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # jinja raises its own types, e.g. for an unknown role
        raise InvalidRequest(f"chat template failed: {error}") from error
    # The template writes the special tokens itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
