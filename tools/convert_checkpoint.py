"""Convert checkpoints between our Megatron layout and other formats.

    python tools/convert_checkpoint.py to-hf   --load CKPT_DIR --save HF_DIR [--iteration N] [--dtype bfloat16]
                                               [--keep-padded-vocab] [--tokenizer-model PATH] [--dry-run]
    python tools/convert_checkpoint.py from-hf --load HF_DIR --save CKPT_DIR [--dtype float32]
                                               [--tokenizer-type T --tokenizer-model PATH] [--seq-length N] [--dry-run]

    python tools/convert_checkpoint.py to-universal --load CKPT_DIR --save UNIV_DIR [--iteration N] [--dry-run]
    python tools/convert_checkpoint.py from-universal --load UNIV_DIR --save CKPT_DIR [--target-tp N --target-pp N]
    python tools/convert_checkpoint.py reshard --load CKPT_DIR --save CKPT_DIR [--iteration N] --target-tp N ...
    python tools/convert_checkpoint.py grow --load CKPT_DIR --save CKPT_DIR --target-layers N [--growth stack]
                                            [--function-preserving] [--reset-progress]
    python tools/convert_checkpoint.py from-deepspeed --load DS_UNIVERSAL_DIR --save UNIV_DIR [-- MODEL FLAGS]

A universal folder loads directly with `pretrain_gpt.py --load UNIV_DIR` at any TP/PP/DP (optimizer moments
included); `from-universal` and `reshard` write a regular checkpoint in a chosen layout.

Each subcommand is a thin parser over a function in megatron_ext.convert (more formats plug in the same way).
Output is written to a temporary sibling folder and renamed when complete; user mistakes end in one
`error: ...` line on stderr, exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_ext.cli import OneLineParser, UserError, first_line
from megatron_ext.config import PRECISIONS

DTYPE_CHOICES = list(PRECISIONS.values())


def _print_mapping(rows: list, dry_run: bool, save: str) -> None:
    if dry_run:
        for row in rows:
            print(row)
        print(f"dry run: {len(rows)} tensors mapped, nothing written", file=sys.stderr)
    else:
        print(f"wrote {save} ({len(rows)} tensors)", file=sys.stderr)


def to_hf(args: argparse.Namespace) -> None:
    from megatron_ext.convert.hf import export_hf

    rows = export_hf(
        args.load,
        args.save,
        args.iteration,
        args.dtype,
        dry_run=args.dry_run,
        keep_padded_vocab=args.keep_padded_vocab,
        tokenizer_model=args.tokenizer_model,
        progress=not args.no_progress,
    )
    _print_mapping(rows, args.dry_run, args.save)


def from_hf(args: argparse.Namespace) -> None:
    from megatron_ext.convert.hf import import_hf

    rows = import_hf(
        args.load,
        args.save,
        dtype=args.dtype,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        seq_length=args.seq_length,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        dry_run=args.dry_run,
        progress=not args.no_progress,
    )
    _print_mapping(rows, args.dry_run, args.save)
    if not args.dry_run:
        print(
            f"generate with: python tools/generate.py --load {args.save}; the model flags for training are in "
            f"{Path(args.save) / 'config.json'}",
            file=sys.stderr,
        )


def to_universal(args: argparse.Namespace) -> None:
    from megatron_ext.convert.universal import to_universal as convert

    rows = convert(
        args.load,
        args.save,
        args.iteration,
        dry_run=args.dry_run,
        tokenizer_model=args.tokenizer_model,
        progress=not args.no_progress,
    )
    _print_mapping(rows, args.dry_run, args.save)
    if not args.dry_run:
        print(f"resume at any layout with: pretrain_gpt.py --load {args.save} ...", file=sys.stderr)


def _layout(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "tensor_model_parallel_size": args.target_tp,
        "pipeline_model_parallel_size": args.target_pp,
        "use_distributed_optimizer": args.use_distributed_optimizer,
    }


def from_universal(args: argparse.Namespace) -> None:
    from megatron_ext.convert.reshard import from_universal as convert

    for line in convert(args.load, args.save, dry_run=args.dry_run, progress=not args.no_progress, **_layout(args)):
        print(line)
    print("dry run: nothing written" if args.dry_run else f"wrote {args.save}", file=sys.stderr)


def reshard(args: argparse.Namespace) -> None:
    from megatron_ext.convert.reshard import reshard as convert

    rows = convert(
        args.load, args.save, args.iteration, dry_run=args.dry_run, progress=not args.no_progress, **_layout(args)
    )
    for line in rows:
        print(line)
    print("dry run: nothing written" if args.dry_run else f"wrote {args.save}", file=sys.stderr)


def grow(args: argparse.Namespace) -> None:
    from megatron_ext.convert.grow import grow as convert

    rows = convert(
        args.load, args.save, args.target_layers, growth=args.growth, function_preserving=args.function_preserving,
        reset_progress=args.reset_progress, iteration=args.iteration, dry_run=args.dry_run,
        progress=not args.no_progress,
    )  # fmt: skip
    for line in rows:
        print(line)
    print("dry run: nothing written" if args.dry_run else f"wrote {args.save}", file=sys.stderr)


def _layout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-tp", type=int, default=None, help="Tensor-parallel size to write (default: as saved).")
    p.add_argument("--target-pp", type=int, default=None, help="Pipeline-parallel size to write (default: as saved).")
    p.add_argument(
        "--use-distributed-optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Write the distributed optimizer's state layout (default: as saved). Any data-parallel size loads it.",
    )


def from_deepspeed(args: argparse.Namespace) -> None:
    from megatron_ext.convert.deepspeed import import_deepspeed

    rows = import_deepspeed(args.load, args.save, args.model_flags, dry_run=args.dry_run, progress=not args.no_progress)
    _print_mapping(rows, args.dry_run, args.save)
    if not args.dry_run:
        print(f"continue with: pretrain_gpt.py --load {args.save} [--finetune] ...", file=sys.stderr)


def _common(p: argparse.ArgumentParser, load_help: str, save_help: str) -> None:
    p.add_argument("--load", required=True, help=load_help)
    p.add_argument("--save", required=False, default=None, help=save_help)
    p.add_argument("--dry-run", action="store_true", help="List the tensor mapping (source -> target); write nothing.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="tools/convert_checkpoint.py",
        description="Convert checkpoints between our Megatron layout and other formats.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    hf = sub.add_parser("to-hf", help="Our checkpoint -> Hugging Face Llama folder (Llama-like models only).")
    _common(hf, "Our checkpoint folder (with latest_checkpointed_iteration.txt) or an iter_* folder.", "New folder.")
    hf.add_argument("--iteration", type=int, default=None, help="Iteration to convert (default: the latest).")
    hf.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="dtype of the written tensors.")
    hf.add_argument(
        "--keep-padded-vocab",
        action="store_true",
        help="Keep megatron's padded vocabulary rows (default: cut to the tokenizer's size).",
    )
    hf.add_argument("--tokenizer-model", default=None, help="The tokenizer file/folder, if it moved since training.")
    hf.set_defaults(func=to_hf)

    tu = sub.add_parser("to-universal", help="Our checkpoint -> universal folder (full tensors + Adam moments).")
    _common(tu, "Our checkpoint folder (with latest_checkpointed_iteration.txt) or an iter_* folder.", "New folder.")
    tu.add_argument("--iteration", type=int, default=None, help="Iteration to convert (default: the latest).")
    tu.add_argument("--tokenizer-model", default=None, help="The tokenizer file/folder, if it moved since training.")
    tu.set_defaults(func=to_universal)

    fu = sub.add_parser("from-universal", help="Universal folder -> our checkpoint in a chosen TP/PP layout.")
    _common(fu, "A universal folder (with universal.json).", "New checkpoint folder.")
    _layout_flags(fu)
    fu.set_defaults(func=from_universal)

    rs = sub.add_parser("reshard", help="Our checkpoint -> our checkpoint in another TP/PP layout (moments kept).")
    _common(rs, "Our checkpoint folder (with latest_checkpointed_iteration.txt) or an iter_* folder.", "New folder.")
    rs.add_argument("--iteration", type=int, default=None, help="Iteration to convert (default: the latest).")
    _layout_flags(rs)
    rs.set_defaults(func=reshard)

    gr = sub.add_parser("grow", help="Our checkpoint -> a deeper one (layers copied, progressive growth).")
    _common(gr, "Our checkpoint folder (with latest_checkpointed_iteration.txt) or an iter_* folder.", "New folder.")
    gr.add_argument("--iteration", type=int, default=None, help="Iteration to grow (default: the latest).")
    gr.add_argument("--target-layers", type=int, required=True, help="Layers of the grown model (a multiple).")
    gr.add_argument(
        "--growth", choices=["stack", "interpolate"], default=None,
        help="Target layer j copies source layer j mod N (stack; the default) or floor(j N / T) (interpolate); a "
        "--model-variant progressive checkpoint uses its own.",
    )  # fmt: skip
    gr.add_argument(
        "--function-preserving", action="store_true",
        help="Zero the output projections of the added copies: the grown model's logits equal the source's.",
    )  # fmt: skip
    gr.add_argument(
        "--reset-progress", action="store_true",
        help="Start over at iteration 0 (schedule and data position afresh); default: keep the source's progress.",
    )  # fmt: skip
    gr.set_defaults(func=grow)

    fd = sub.add_parser(
        "from-deepspeed",
        help="DeepSpeed universal checkpoint (Megatron-DeepSpeed GPT, after ds_to_universal) -> our universal folder.",
    )
    _common(fd, "The output folder of DeepSpeed's ds_to_universal (with zero/).", "New universal folder.")
    fd.add_argument(
        "model_flags",
        nargs=argparse.REMAINDER,
        help="After --: pretrain_gpt.py model flags completing or overriding the DeepSpeed run's saved args.",
    )
    fd.set_defaults(func=from_deepspeed)

    fh = sub.add_parser("from-hf", help="Hugging Face Llama folder -> our checkpoint (weights only, iteration 0).")
    _common(fh, "Hugging Face folder (config.json + *.safetensors).", "New checkpoint folder.")
    fh.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="Parameter dtype of the checkpoint.")
    fh.add_argument(
        "--tokenizer-type",
        default=None,
        choices=["ByteTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer"],
        help="Our tokenizer type (default: from the folder's files).",
    )
    fh.add_argument("--tokenizer-model", default=None, help="Tokenizer file/folder (default: the HF folder).")
    fh.add_argument("--seq-length", type=int, default=None, help="Saved --seq-length (default: max positions).")
    fh.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=None, help="Vocabulary padding multiple (default 128)."
    )
    fh.set_defaults(func=from_hf)
    return p


def _user_error(e: Exception) -> bool:
    """Mistakes in the input (ours, config checks, unreadable files, megatron-core's checkpoint errors)."""
    checkpointing = sys.modules.get("megatron.core.dist_checkpointing.core")
    known: tuple[type, ...] = (UserError, ValueError, OSError)
    if checkpointing is not None:
        known += (checkpointing.CheckpointingException,)
    return isinstance(e, known)


def main(argv: list[str] | None = None) -> int:
    """Parse and dispatch to the subcommand's function; user mistakes end in one line and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.save is None and not args.dry_run:
        parser.error(f"{args.command} needs --save DIR (or --dry-run)")
    func: Callable[[argparse.Namespace], None] = args.func
    from megatron_ext.platform import quiet_optional_dependency_warnings

    quiet_optional_dependency_warnings()  # before megatron-core is imported
    try:
        func(args)
    except Exception as e:
        if not _user_error(e):
            raise
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
