"""Export a run as a Hugging Face Llama model: python -m launch.export RUN_DIR OUT_DIR"""
from __future__ import annotations

import argparse
import sys

from orchestrator.errors import ConfigError
from orchestrator.export import export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", help="a run directory, a run's storage (e.g. s3://bucket/run) or one checkpoint")
    ap.add_argument("out_dir", help="where to write model.safetensors, config.json and tokenizer files")
    args = ap.parse_args()
    try:
        ckpt = export(args.run_dir, args.out_dir)
    except ConfigError as exc:
        key = "RUN_DIR" if exc.key == "model.init_from" else exc.key  # the command's own argument
        print(f"error: {key}: {exc.message}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {ckpt} to {args.out_dir}")


if __name__ == "__main__":
    main()
