"""`helix make-model`: write a random-weight checkpoint of a real family, with its tokenizer.

    helix make-model --family llama|mistral|qwen2 --layers N --hidden H [--heads A] [--kv-heads K]
                     [--intermediate I] [--vocab V] [--tie-embeddings] [--sliding-window W]
                     [--dtype D] [--max-shard-size SIZE] [--seed S] OUT_DIR

The checkpoint loads anywhere a Hugging Face model loads (`from_pretrained`, `helix profile`, a
node), with no download: tests and the demo use it in place of a real model."""

from __future__ import annotations

import argparse

# Spelled out rather than imported: importing the shard package loads torch and transformers,
# which would slow every `helix` command down (all subcommands register at start).
FAMILY_CHOICES = ("llama", "mistral", "qwen2")
DTYPE_CHOICES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-model",
        help="write a random-weight model checkpoint and tokenizer (for tests and demos)",
        description="Write a random-weight checkpoint of a supported family (config, safetensors, and a "
        "byte-level BPE tokenizer) that loads with from_pretrained and needs no download.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    p.add_argument("--family", choices=FAMILY_CHOICES, default="llama", help="model family (default llama)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument(
        "--kv-heads", type=int, default=2, help="key/value heads; fewer than --heads is GQA (default 2)"
    )
    p.add_argument("--intermediate", type=int, help="MLP size (default 2 x hidden)")
    p.add_argument("--vocab", type=int, default=320, help="vocabulary size, >= 259 (default 320)")
    p.add_argument("--tie-embeddings", action="store_true", help="the LM head reuses the embedding matrix")
    p.add_argument(
        "--sliding-window",
        type=int,
        help="attention window in tokens (mistral: every layer; qwen2: upper layers)",
    )
    p.add_argument("--max-positions", type=int, default=2048, help="max_position_embeddings (default 2048)")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random weights (default 0.02)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="stored dtype (default float32)")
    p.add_argument(
        "--max-shard-size", metavar="SIZE", help='split the weights into files of SIZE (e.g. "2GB")'
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from helix_p2p.shard.tiny import TinyModelSpec, make_tiny_model

    spec = TinyModelSpec(
        family=args.family,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        tie_embeddings=args.tie_embeddings,
        max_position_embeddings=args.max_positions,
        sliding_window=args.sliding_window,
        initializer_range=args.init_std,
        seed=args.seed,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
    )
    out = make_tiny_model(args.out_dir, spec)
    print(f"wrote a random {args.family} model ({args.layers} layers, hidden {args.hidden}) to {out}")
    return 0
