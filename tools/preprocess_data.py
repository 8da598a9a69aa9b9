"""Tokenize jsonl corpora into Megatron .bin/.idx datasets (see megatron_ext.data.preprocess for the details).

    python tools/preprocess_data.py --input data/ --output-prefix out/corpus --tokenizer-type ByteTokenizer \\
        --append-eod --workers 4

Writes ``{PREFIX}_{key}_document.bin/.idx`` per ``--json-keys`` key. Mistakes end in one ``error: ...`` line
and exit status 2; an interrupt leaves no partial output.
"""

import sys

from megatron_ext.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
