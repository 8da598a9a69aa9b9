"""One process for tests/test_dimension_compressor.py: the dimension compressor's command line on a checkpoint
(hidden states extracted on the fly at TP=1, then a sweep), then an independent check that the stored states are the
final post-norm states: with tied embeddings the LM's logits must equal hidden @ embedding^T.

usage: hidden_state_scenario.py CKPT JSONL OUT_DIR  (writes OUT_DIR/scenario.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from megatron_ext import dimension_compressor, distributed
from megatron_ext.hidden_states import HiddenStore, record_text
from megatron_ext.training.inference import find_checkpoint, load_model


def main() -> None:
    ckpt, jsonl, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    argv = ["--load", ckpt, "--input", jsonl, "--max-seq-length", "64", "--extract-batch-size", "5",
            "--num-samples", "12", "--valid-fraction", "0.25", "--sweep", "--num-epochs", "2", "--batch-size", "4",
            "--output-dir", str(out / "run")]  # fmt: skip
    rc = dimension_compressor.main(argv)
    (store_dir,) = (out / "run" / "hidden").iterdir()
    store = HiddenStore(store_dir)
    model, tokenizer, device, cfg, _ = load_model(find_checkpoint(ckpt))
    worst = 0.0
    try:
        gpt = model.module if hasattr(model, "module") else model
        embedding = gpt.embedding.word_embeddings.weight.detach().float()
        with open(jsonl) as f:
            texts = [record_text(json.loads(line)) for line in f][:3]
        for i, text in enumerate(texts):
            ids = tokenizer.tokenize(text)[:64]
            tokens = torch.tensor([ids])
            with torch.no_grad():
                logits = model(tokens, torch.arange(len(ids)).unsqueeze(0), None)[0].float()
            hidden = torch.from_numpy(np.array(store.hidden[store.offsets[i] : store.offsets[i + 1]]))
            worst = max(worst, float((hidden @ embedding.T - logits).abs().max()))
    finally:
        distributed.destroy()
    (out / "scenario.json").write_text(json.dumps({"rc": rc, "store": str(store_dir), "logits_max_diff": worst}))


if __name__ == "__main__":
    main()
