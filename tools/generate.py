"""Sample text from a checkpoint so a user can eyeball what a model has learnt.

    python tools/generate.py --load CKPT_DIR [--prompt TEXT | --prompt-file F] [--max-new-tokens 100]
                             [--greedy | --temperature 0.8 --top-p 0.9 --top-k 0] [--seed 1] [--iteration N] [--json]

The model shape and tokenizer come from the checkpoint itself (its common state holds the run's Config), so no
model flags are repeated here. One process (TP=1, PP=1) loads any layout: dist_checkpointing reshards on load
(megatron_ext/training/inference.py).
Decoding runs a full forward over the growing sequence each step (no KV cache): simple, and fast enough for
eyeballing. User mistakes end in one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_ext.cli import OneLineParser, UserError, first_line, report
from megatron_ext.training.inference import find_checkpoint, load_model

if TYPE_CHECKING:
    import torch


class GenerateError(UserError, ValueError):
    """A user mistake (missing prompt file, bad sampling values); the message is one line."""


# ---- decoding ---------------------------------------------------------------------------------------------


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids from logits [..., vocab]: greedy when temperature is 0, else temperature, top-k, top-p.

    Filters apply in that order (as in Hugging Face), so top-p sees the tempered distribution. Top-k keeps
    ties with the k-th score; top-p keeps the smallest set of most likely tokens whose mass reaches p (always at
    least one). Ids masked to -inf by the caller (padded vocabulary) are never drawn.
    """
    import torch  # here, not at the top: a mistyped --load should fail without the slow imports

    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise GenerateError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.size(-1):
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    drawn = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator)
    return drawn.reshape(probs.shape[:-1])


def generate(
    model: Callable[..., torch.Tensor],
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    context_length: int,
    vocab_size: int,
    eod: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> list[int]:
    """New token ids after `prompt_ids` (eod excluded), stopping at eod or after `max_new_tokens`.

    `model(tokens, position_ids, None)` must return logits [1, s, padded vocab]; only the last
    `context_length` tokens are fed (the model never saw longer sequences), and ids >= `vocab_size` (vocabulary
    padding) are masked out. An empty prompt starts from eod, i.e. at a document boundary.
    """
    import torch

    ids = list(prompt_ids) or [eod]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            window = ids[-context_length:]
            tokens = torch.tensor([window], dtype=torch.long, device=device)
            positions = torch.arange(len(window), dtype=torch.long, device=device).unsqueeze(0)
            last = model(tokens, positions, None)[0, -1].float().cpu()
            last[vocab_size:] = float("-inf")
            token = int(sample_next(last, temperature, top_k, top_p, generator))
            if token == eod:
                break
            ids.append(token)
            new.append(token)
    return new


# ---- command line -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="tools/generate.py",
        description="Sample text from a checkpoint (model and tokenizer settings come from the checkpoint).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--load", required=True, help="Checkpoint folder (holding latest_checkpointed_iteration.txt).")
    p.add_argument("--iteration", type=int, default=None, help="Iteration to load (default: the latest).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="Prompt text (default: empty, start at a document boundary).")
    src.add_argument("--prompt-file", default=None, help="Read the prompt from this UTF-8 file.")
    p.add_argument("--max-new-tokens", type=int, default=100, help="Tokens to generate at most (stops at eod).")
    p.add_argument("--greedy", action="store_true", help="Always take the most likely token (= --temperature 0).")
    p.add_argument("--temperature", type=float, default=0.8, help="Softmax temperature; 0 is greedy.")
    p.add_argument("--top-k", type=int, default=0, help="Sample from the k most likely tokens only (0: all).")
    p.add_argument("--top-p", type=float, default=0.9, help="Nucleus sampling: smallest set reaching this mass.")
    p.add_argument("--seed", type=int, default=1, help="Sampling seed (same seed, same text).")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "xpu", "cpu"], help="Where to run.")
    p.add_argument("--tokenizer-model", default=None, help="Override the saved tokenizer model path (if moved).")
    p.add_argument("--json", action="store_true", help='Print {"prompt", "completion", "tokens"} (new ids) as JSON.')
    return p


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    path = Path(args.prompt_file)
    if not path.is_file():
        raise GenerateError(
            f"--prompt-file {path}: {'is a folder' if path.is_dir() else 'no such file'}; expected a text file"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GenerateError(f"--prompt-file {path}: not UTF-8 text (byte {e.start})") from None


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise GenerateError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    if args.temperature < 0:
        raise GenerateError(f"--temperature {args.temperature} must be >= 0 (0 is greedy)")
    if args.top_k < 0:
        raise GenerateError(f"--top-k {args.top_k} must be >= 0 (0 disables it)")
    if not 0 < args.top_p <= 1:
        raise GenerateError(f"--top-p {args.top_p} must be in (0, 1]")


def main(argv: list[str] | None = None) -> int:
    """Parse, load, sample, print; user mistakes end in one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        prompt = _read_prompt(args)
        ckpt = find_checkpoint(args.load, args.iteration)
    except UserError as e:
        return report(e)

    from megatron_ext.platform import quiet_optional_dependency_warnings

    quiet_optional_dependency_warnings()  # before megatron-core is imported
    import torch
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from megatron_ext import distributed

    try:
        try:
            model, tokenizer, device, cfg, common = load_model(ckpt, args.device, args.tokenizer_model, args.seed)
        except (UserError, CheckpointingException, ValueError, OSError) as e:
            print(f"error: {first_line(e)}", file=sys.stderr)
            return 2
        iteration = common.get("iteration", "?")
        print(f"loaded {ckpt} (iteration {iteration})", file=sys.stderr)
        generator = torch.Generator().manual_seed(args.seed)
        new = generate(
            model,
            tokenizer.tokenize(prompt),
            args.max_new_tokens,
            context_length=cfg.model.seq_length,
            vocab_size=tokenizer.vocab_size,
            eod=tokenizer.eod,
            temperature=0.0 if args.greedy else args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
            device=device,
        )
    finally:
        distributed.destroy()
    completion = tokenizer.detokenize(new)
    if args.json:
        print(json.dumps({"prompt": prompt, "completion": completion, "tokens": new}, ensure_ascii=False))
    else:
        print(prompt + completion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
