"""Our top-level ``kernels`` package must never pass for Hugging Face's ``kernels`` package.

transformers looks for the hub package ``kernels`` (``is_kernels_available``) and, when found,
swaps model layers for hub kernels. Ours is importable under the same name, so transformers must
still answer "not available" (it checks the distribution metadata, and our distribution is
``llmserve``).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_transformers_does_not_take_our_kernels_for_the_hub_package() -> None:
    code = (
        "import kernels, transformers\n"
        "from transformers.utils import is_kernels_available\n"
        "assert hasattr(kernels, 'get_ops'), 'our kernels package is not the one imported'\n"
        "print(is_kernels_available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_distribution_named_kernels_is_installed() -> None:
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    assert "kernels" not in names
    assert "llmserve" in names
