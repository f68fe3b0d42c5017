"""A tokenizer as a set of files, so a router can rebuild it with ``AutoTokenizer``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """Files written by ``tokenizer.save_pretrained``, plus the chat template as
    ``chat_template.jinja`` when the tokenizer has one and did not write it itself."""
    with tempfile.TemporaryDirectory(prefix="llmserve-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and CHAT_TEMPLATE_FILE not in files:
        files[CHAT_TEMPLATE_FILE] = template.encode()
    return files
