"""Extract a frozen LM's final-layer post-norm hidden states (fp32) once, into a memory-mapped store that the
dimension compressor's training and PCA read (`python -m megatron_ext.dimension_compressor --hidden-store DIR`).

    python tools/extract_hidden.py --load CKPT --output STORE [--input chat.jsonl | --data-file-list L.txt]
        [--num-samples 50000] [--max-seq-length 512] [--extract-batch-size 8]
    torchrun --nproc-per-node 2 tools/extract_hidden.py --load CKPT --output STORE --tensor-model-parallel-size 2

A checkpoint of any layout loads at any tensor-parallel size (the world must be that size); every rank computes
the whole hidden state and rank 0 writes it. Interrupted, the same command continues after the last sequences
written; a store made from other inputs is refused. Store format and text sources: megatron_ext/hidden_states.py.
User mistakes end in one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.cli import OneLineParser, UserError, report
from megatron_ext.config import add_section
from megatron_ext.hidden_states import HiddenSourceConfig, extract, prepare


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tools/extract_hidden.py",
        description="Extract a frozen LM's final-layer hidden states into a memory-mapped store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="The store folder (made, or continued when interrupted).")
    add_section(parser, "hidden", HiddenSourceConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_ext.platform import quiet_optional_dependency_warnings

    quiet_optional_dependency_warnings()
    args = vars(build_parser().parse_args(argv))
    output = args.pop("output")
    try:
        source = HiddenSourceConfig(**{key.split(".", 1)[1]: value for key, value in args.items()})
        extract(source, prepare(source), output, log=lambda line: print(line, file=sys.stderr))
    except (UserError, OSError) as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
