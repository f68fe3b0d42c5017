"""``llmserve``: command-line client and local stack launcher.

- ``llmserve generate --target HOST:PORT --model NAME "prompt"`` streams the completion to
  stdout (``--chat`` sends the prompt as a user message through the chat template).
- ``llmserve models --target HOST:PORT`` lists the served models.
- ``llmserve up`` starts a local stack. This torch-free package does not import it: the worker
  package registers the command under the entry-point group ``llmserve.commands``
  (``gpu_worker.stack:register``), found here when the worker is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from typing import Any

from llmserve.client import Client, LLMServeError

DEFAULT_TARGET = "localhost:50051"
# flag -> (type, help); the flag names are the sampling parameter names.
_SAMPLING_FLAGS: dict[str, tuple[Any, str]] = {
    "max_tokens": (int, "most tokens to generate (server default 16)"),
    "min_tokens": (int, "fewest tokens before EOS may end the sequence"),
    "temperature": (float, "0 = greedy (server default 1.0)"),
    "top_p": (float, "nucleus sampling threshold in (0, 1]"),
    "top_k": (int, "keep the k most likely tokens (0 = off)"),
    "min_p": (float, "drop tokens below min_p times the top probability"),
    "seed": (int, "sampling seed"),
    "presence_penalty": (float, "in [-2, 2]"),
    "frequency_penalty": (float, "in [-2, 2]"),
    "repetition_penalty": (float, "in (0, 2]"),
    "n": (int, "number of sequences (printed one after another)"),
}


def _add_generate(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="stream a completion to stdout")
    p.add_argument("prompt", help="the prompt text (or the user message with --chat)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="router or worker address host:port")
    p.add_argument("--model", required=True, help="model name, as listed by `llmserve models`")
    p.add_argument("--chat", action="store_true", help="send the prompt as a chat user message")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating past EOS")
    p.add_argument("--timeout-s", type=float, default=None, help="deadline of the request")
    p.add_argument("--usage", action="store_true", help="print token usage to stderr at the end")
    _add_connection_flags(p)
    for name, (kind, help_text) in _SAMPLING_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text)
    p.set_defaults(func=_run_generate)


def _add_models(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="list served models")
    p.add_argument("--target", default=DEFAULT_TARGET, help="router or worker address host:port")
    p.add_argument("--timeout-s", type=float, default=10.0)
    _add_connection_flags(p)
    p.set_defaults(func=_run_models)


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=os.environ.get("LLMSERVE_API_KEY"),
                   help="API key sent as 'authorization: Bearer' (default: $LLMSERVE_API_KEY)")
    p.add_argument("--tls", action="store_true", help="dial over TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", default=None, help="dial over TLS, trusting this PEM CA bundle")


def _client(args: argparse.Namespace, **kwargs: Any) -> Client:
    return Client(args.target, api_key=args.api_key, tls=args.tls, tls_ca=args.tls_ca, **kwargs)


COMMANDS_GROUP = "llmserve.commands"


def _add_installed_commands(subparsers: Any) -> None:
    """Subcommands other installed packages register (``llmserve up`` from ``gpu_worker``).

    Each entry point of :data:`COMMANDS_GROUP` names a ``register(subparsers)`` function. Without
    the worker installed, ``up`` still parses and explains what is missing.
    """
    names = set()
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry.load()(subparsers)
        names.add(entry.name)
    if "up" not in names:
        p = subparsers.add_parser("up", help="start a local stack (needs the worker: llmserve[worker])")
        missing = "`llmserve up` needs the worker package (pip install llmserve[worker])"
        p.set_defaults(func=lambda args: _fail(missing))


def _fail(message: str) -> int:
    print(f"llmserve: {message}", file=sys.stderr)
    return 2


def _run_generate(args: argparse.Namespace) -> int:
    sampling = {name: getattr(args, name) for name in _SAMPLING_FLAGS}
    sampling["stop"] = args.stop
    sampling["ignore_eos"] = args.ignore_eos
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        inputs: dict[str, Any] = {"messages": messages}
    else:
        inputs = {"prompt": args.prompt}
    out = sys.stdout
    with _client(args) as client:
        last_index = 0
        for chunk in client.generate(args.model, timeout_s=args.timeout_s, **inputs, **sampling):
            if chunk.index != last_index:
                out.write("\n")
                last_index = chunk.index
            out.write(chunk.text)
            out.flush()
            if chunk.usage is not None and args.usage:
                u = chunk.usage
                print(
                    f"\n[prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens} "
                    f"cached_prompt_tokens={u.cached_prompt_tokens} device_seconds={u.device_seconds:.6f} "
                    f"worker={chunk.worker_id}]",
                    file=sys.stderr,
                )
    out.write("\n")
    return 0


def _run_models(args: argparse.Namespace) -> int:
    with _client(args, timeout_s=args.timeout_s) as client:
        for model in client.list_models():
            print(f"{model.name}\tmax_model_len={model.max_model_len}\tworkers={model.num_workers}"
                  f"\tstandby={model.num_standby_workers}\tquantization={model.quantization or '?'}"
                  f"\tkv_cache_dtype={model.kv_cache_dtype or '?'}"
                  f"\tweight_GiB={model.weight_bytes / 2**30:.2f}\tkv_cache_tokens={model.kv_cache_tokens}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_models(subparsers)
    _add_installed_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LLMServeError as err:
        return _fail(f"request failed: {err}")
    except ValueError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
