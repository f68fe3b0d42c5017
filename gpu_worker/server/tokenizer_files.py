"""A tokenizer as a set of files, so a router can rebuild it with ``AutoTokenizer``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from llmserve.multimodal import IMAGE_TOKENS_FILE, ImageTokens

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def tokenizer_files(tokenizer: Any, image_tokens: ImageTokens | None = None) -> dict[str, bytes]:
    """Files written by ``tokenizer.save_pretrained``, plus the chat template as
    ``chat_template.jinja`` when the tokenizer has one and did not write it itself, and for a
    model that takes images how it marks them (``IMAGE_TOKENS_FILE``: the router expands image
    tokens as the worker does)."""
    with tempfile.TemporaryDirectory(prefix="llmserve-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and CHAT_TEMPLATE_FILE not in files:
        files[CHAT_TEMPLATE_FILE] = template.encode()
    if image_tokens is not None:
        files[IMAGE_TOKENS_FILE] = image_tokens.to_json()
    return files
