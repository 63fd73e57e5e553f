"""One-off generation: python -m launch.generate CHECKPOINT "prompt" [--max-tokens N] [--temperature T]
or, against a running server: python -m launch.generate --url http://127.0.0.1:8000 "prompt"

CHECKPOINT is a run directory, one of its checkpoints or a Hugging Face Llama directory; the model
runs in this process with the same engine as a serving replica (block KV cache)."""
from __future__ import annotations

import argparse
import sys

from orchestrator.errors import ConfigError


# The engine's request fields, as this command's options.
OPTIONS = {"prompt": "PROMPT", "max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
           "seed": "--seed", "stop": "--stop"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", help="checkpoint (omit with --url)")
    ap.add_argument("prompt")
    ap.add_argument("--url", help="a running launch.serve server")
    ap.add_argument("--token", help="its bearer token, where it needs one")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[])
    args = ap.parse_args(argv)
    if args.url:
        import urllib.error
        import urllib.parse

        from orchestrator.inference.client import Client, ServerError

        parsed = urllib.parse.urlparse(args.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            ap.error(f"--url: {args.url!r} is not a server address; expected http://HOST:PORT")
        try:
            for piece in Client(args.url, args.token).stream(args.prompt, max_tokens=args.max_tokens,
                                                             temperature=args.temperature, top_p=args.top_p,
                                                             seed=args.seed, stop=args.stop or None):
                print(piece, end="", flush=True)
        except ServerError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            sys.exit(2)
        except (urllib.error.URLError, OSError) as exc:
            print(f"\nerror: --url {args.url}: no server answers ({getattr(exc, 'reason', exc)})", file=sys.stderr)
            sys.exit(2)
        print()
        return
    if not args.target:
        ap.error("name a checkpoint, or a server with --url")
    from orchestrator.inference.engine import GenerationEngine, Request, check_request
    from orchestrator.inference.replica import load_model

    try:
        model, tok, eos = load_model(args.target)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    request = Request("cli", tuple(tok.encode(args.prompt).ids), args.max_tokens, args.temperature, args.top_p,
                      tuple(args.stop), args.seed)
    try:
        check_request(request, model.args.vocab_size, model.args.max_seq_len)
    except ValueError as exc:  # "<field>: why", named as the option that set it
        field, _, why = str(exc).partition(": ")
        print(f"error: {OPTIONS.get(field, field)}: {why}", file=sys.stderr)
        sys.exit(2)
    engine = GenerationEngine(model, tok, eos, num_blocks=model.args.max_seq_len // 16 + 1, max_batch=1)
    engine.add(request)
    print(args.prompt, end="", flush=True)
    while engine.busy:
        for event in engine.step():
            if event.error:
                print(f"\nerror: {event.error}", file=sys.stderr)
                sys.exit(2)
            print(event.text, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
