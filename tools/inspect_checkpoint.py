"""Inspect a checkpoint, or compare two: counters, saved layout, key config, and every tensor's shape, dtype, norm.

    python tools/inspect_checkpoint.py CKPT [--iteration N] [--compare OTHER] [--json] [--no-tensors] [--no-progress]

CKPT and OTHER are a checkpoint root (latest_checkpointed_iteration.txt + iter_*/; --iteration picks one of CKPT's,
else the tracker's), an iter_* folder, or a universal folder (universal.json + zero/<name>/<state>.pt).

Tables: one row per tensor (stacked layer keys as saved; one row per layer when compared with a universal folder)
with its state (model weight, fp32 main weight, exp_avg, exp_avg_sq), shape, dtype and L2 norm (float64).
--compare: for each tensor in both, max |a-b| and the relative difference ||a-b|| / max(||a||, ||b||); then the
tensors only in one. Vocabulary tensors (word embeddings, output layer) whose row counts differ (a universal folder
keeps only the tokenizer's rows) are compared on their common leading rows, and the row says so. Against a universal
folder, layer i of `decoder.layers.X` is `decoder.layers.i.X`, `optimizer.state.exp_avg.<key>` is
`zero/<name>/exp_avg.pt`, and the fp32 main weights (`optimizer.state.fp32_param.<key>` or `...param.<key>`; in an
fp32 run without them, the model weight) are `fp32.pt`.

The last line of a comparison is its verdict: `identical` when every tensor in both is equal element for element
(over the compared rows) and none is only in one, else `differ`. Exit status: 0 whenever the inspection ran, whatever
the verdict; 2 with one `error: ...` line on stderr for a bad input (nothing to read, unreadable or damaged files).
The checkpoints are read by megatron_ext/convert/reader.py, a block of rows at a time (memory stays bounded).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_ext.cli import OneLineParser, UserError, human_bytes
from megatron_ext.convert.reader import (
    BLOCK_BYTES,
    DistCheckpoint,
    Entry,
    Shape,
    Source,
    UniversalCheckpoint,
    dtype_name,
    entry_order,
    open_checkpoint,
    plain,
)
from megatron_ext.training.universal import META, VOCAB_KEYS

PROGRESS_MIN_BYTES = 256 << 20  # a progress bar only for inspections that read at least this much

# ---- summary of the saved state ---------------------------------------------------------------------------------


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _schedule_lines(sched: dict[str, Any] | None) -> list[str]:
    """Our scheduler state described by the schedules module (older megatron-core states: their fields)."""
    if not sched:
        return ["not saved"]
    if "config" not in sched:
        return [", ".join(f"{k} {v}" for k, v in sched.items())]
    from megatron_ext.lr_schedule import ScheduleConfig, describe, lr_at, to_samples

    try:
        cfg = ScheduleConfig.from_dict(sched["config"])
        lines = describe(cfg).splitlines()
        pos = float(sched.get("position", 0))
        where = f"{cfg.unit} {_count(pos)}"
        if cfg.unit != "samples":
            where += f" (samples {_count(to_samples(cfg, pos))})"
        lines.append(f"now at {where}: lr {lr_at(cfg, pos):.4g}")
        return [line.strip().removeprefix("lr schedule: ") for line in lines]
    except Exception as e:  # a schedule this version cannot follow still gets its raw fields shown
        return [f"{sched['config']} ({type(e).__name__}: {e})"]


def describe_config(h: dict[str, Any], params: int, vocab_rows: int | None) -> dict[str, str]:
    """The lines a person checks first: progress, layout, model shape, precision and optimizer, tokenizer, data."""
    cfg = h.get("config") or {}
    m, par, prec = cfg.get("model", {}), cfg.get("parallel", {}), cfg.get("precision", {})
    opt, data, ts = cfg.get("optimizer", {}), cfg.get("data", {}), h.get("train_state") or {}
    out = {
        "progress": f"iteration {h.get('iteration')}, consumed samples {ts.get('consumed_samples')}, consumed tokens "
        f"{ts.get('consumed_tokens')}, skipped steps {ts.get('skipped_total', 0)}"
    }
    lay = h["layout"]
    tp, pp = lay.get("tensor_model_parallel_size"), lay.get("pipeline_model_parallel_size")
    text = f"{'universal (no layout), converted from' if lay.get('universal') else 'saved with'} TP={tp} PP={pp}"
    if par.get("num_layers_per_virtual_pipeline_stage"):
        text += f" (virtual stages of {par['num_layers_per_virtual_pipeline_stage']} layers)"
    text += f", sequence parallel {'on' if par.get('sequence_parallel') else 'off'}"
    text += f", distributed optimizer {'on' if par.get('use_distributed_optimizer') else 'off'}"
    out["layout"] = text + ("" if lay.get("universal") else "; any data-parallel size can resume")
    if m:
        groups = m.get("num_query_groups") if m.get("group_query_attention") else None
        pos = m.get("position_embedding_type")
        base = f" (base {m.get('rotary_base')})" if pos == "rope" else ""
        out["model"] = (
            f"{m.get('num_layers')} layers, hidden {m.get('hidden_size')}, {m.get('num_attention_heads')} heads"
            + (f" ({groups} query groups)" if groups else "")
            + f", ffn {m.get('ffn_hidden_size')}, seq {m.get('seq_length')} (max positions "
            f"{m.get('max_position_embeddings')}), {m.get('normalization')}, {'SwiGLU' if m.get('swiglu') else 'GELU'}"
            f", {pos}{base} positions, {'untied' if m.get('untie_embeddings_and_output_weights') else 'tied'} "
            f"embeddings, {'no biases' if m.get('disable_bias_linear') else 'biases'}"
        )
    vocab = f"{vocab_rows} embedding rows" if vocab_rows else "no embedding"
    if h.get("vocab_size"):
        vocab += f" (tokenizer: {h['vocab_size']})"
    out["parameters"] = f"{_count(params)} ({params:,}); {vocab}"
    if prec or opt:
        kind = "bf16" if prec.get("bf16") else "fp16" if prec.get("fp16") else "fp32"
        out["precision"] = (
            f"{kind}; {opt.get('optimizer', '?')} lr {opt.get('lr')} min_lr {opt.get('min_lr')} wd "
            f"{opt.get('weight_decay')} betas ({opt.get('adam_beta1')}, {opt.get('adam_beta2')}) eps "
            f"{opt.get('adam_eps')} clip {opt.get('clip_grad')}; optimizer step {h.get('optimizer_step')}"
        )
    if data:
        model_file = f" ({data['tokenizer_model']})" if data.get("tokenizer_model") else ""
        out["tokenizer"] = f"{data.get('tokenizer_type')}{model_file}"
        out["data"] = str(data.get("data_file_list") or data.get("data_path") or "built-in corpus")
        per_corpus = (h.get("data_state") or {}).get("consumed_per_corpus")
        if per_corpus:
            out["data"] += f"; samples per corpus {per_corpus}"
    return out


# ---- reading tensors --------------------------------------------------------------------------------------------


def _blocks(e: Entry, rows: int, other_row_bytes: int = 0) -> Iterator[tuple[int, int]]:
    step = max(1, BLOCK_BYTES // max(1, e.row_bytes, other_row_bytes))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def _bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    show = enabled and total >= PROGRESS_MIN_BYTES
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, disable=not show, leave=False)


def norm(src: Source, e: Entry, bar: Any = None) -> float:
    """L2 norm in float64, one block of rows at a time."""
    total = 0.0
    for lo, hi in _blocks(e, e.rows):
        x = src.read_rows(e, lo, hi).reshape(-1).double()
        total += float(torch.dot(x, x))
        if bar is not None:
            bar.update((hi - lo) * e.row_bytes if e.shape else e.nbytes)
    return math.sqrt(total)


@dataclass
class Diff:
    """The comparison of one tensor present in both checkpoints."""

    name: str
    state: str
    shape_a: Shape
    shape_b: Shape
    dtype_a: str
    dtype_b: str
    max_abs: float | None = None
    rel: float | None = None
    note: str = ""

    @property
    def same(self) -> bool:
        return self.max_abs == 0.0 and not self.note.startswith("shape")


def compare_entries(a: Source, ea: Entry, b: Source, eb: Entry, state: str, read: bool, bar: Any) -> Diff:
    """max |a-b| and ||a-b|| / max(||a||, ||b||), in float64 over aligned row blocks."""
    d = Diff(ea.name, state, ea.shape, eb.shape, dtype_name(ea.dtype), dtype_name(eb.dtype))
    rows = ea.rows
    if ea.shape != eb.shape:
        vocab = ea.name in VOCAB_KEYS and len(ea.shape) == len(eb.shape) > 0 and ea.shape[1:] == eb.shape[1:]
        if not vocab:
            d.note = "shape differs: not compared"
            return d
        rows = min(ea.shape[0], eb.shape[0])
        d.note = f"first {rows} rows compared ({ea.shape[0]} / {eb.shape[0]}: vocabulary padding differs)"
    if not read:
        return d
    max_abs, dd, na, nb = 0.0, 0.0, 0.0, 0.0
    for lo, hi in _blocks(ea, rows, eb.row_bytes):
        x = a.read_rows(ea, lo, hi).reshape(-1).double()
        y = b.read_rows(eb, lo, hi).reshape(-1).double()
        na, nb = na + float(torch.dot(x, x)), nb + float(torch.dot(y, y))
        x -= y
        dd += float(torch.dot(x, x))
        if x.numel():
            m = float(x.abs_().max())  # NaN propagates: a NaN on either side is a difference
            max_abs = math.nan if math.isnan(m) or math.isnan(max_abs) else max(max_abs, m)
        bar.update((hi - lo) * (ea.row_bytes + eb.row_bytes) if ea.shape else ea.nbytes + eb.nbytes)
    scale = math.sqrt(max(na, nb))
    d.max_abs = max_abs
    d.rel = math.sqrt(dd) / scale if scale > 0 else (0.0 if dd == 0 else math.inf)
    return d


def _pairing(src: Source, other: Source) -> tuple[dict[tuple[str, str], Entry], list[str]]:
    """Entries keyed by (name, state) as they pair with `other`; against a universal folder our fp32 main weights
    are its fp32 state (the model weight when there are none) and a lower-precision model copy is left out."""
    keyed = {(e.name, e.state): e for e in src.entries}
    notes = []
    if isinstance(src, DistCheckpoint) and isinstance(other, UniversalCheckpoint):
        dropped = 0
        for name, state in list(keyed):
            if state != "model":
                continue
            e = keyed.pop((name, state))
            if (name, "fp32") in keyed:
                dropped += 1
            else:
                keyed[(name, "fp32")] = e
        if dropped:
            notes.append(
                f"{src.path}: its {dropped} model weights are not compared; their fp32 main copies (optimizer "
                "state) are, as the universal format keeps only those"
            )
    return keyed, notes


@dataclass
class Pairing:
    """Which tensors of A and B pair up (name, state) and which are only in one, decided before reading values."""

    pairs: list[tuple[Entry, Entry, str]]
    only_a: list[str]
    only_b: list[str]
    notes: list[str]


def pair(a: Source, b: Source) -> Pairing:
    ka, notes_a = _pairing(a, b)
    kb, notes_b = _pairing(b, a)
    both = sorted(set(ka) & set(kb), key=entry_order)
    only_a = [f"{n} [{s}]" for n, s in sorted(set(ka) - set(kb), key=entry_order)]
    only_b = [f"{n} [{s}]" for n, s in sorted(set(kb) - set(ka), key=entry_order)]
    return Pairing([(ka[k], kb[k], k[1]) for k in both], only_a, only_b, notes_a + notes_b)


def compare(a: Source, b: Source, p: Pairing, read: bool, progress: bool) -> Iterator[Diff]:
    """One Diff per pair, in table order (values are read pair by pair)."""
    total = sum(ea.nbytes + eb.nbytes for ea, eb, _ in p.pairs) if read else 0
    with _bar(total, progress, "compare") as bar:
        for ea, eb, state in p.pairs:
            yield compare_entries(a, ea, b, eb, state, read, bar)


def verdict(diffs: list[Diff], p: Pairing, read: bool) -> str:
    if not read:
        return "not compared (--no-tensors)"
    return "identical" if all(d.same for d in diffs) and not p.only_a and not p.only_b else "differ"


def _sorted(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: entry_order((e.name, e.state)))


def tensor_rows(src: Source, read: bool, progress: bool) -> Iterator[dict[str, Any]]:
    """One row per tensor in table order, each norm read when its row is due."""
    entries = _sorted(src.entries)
    with _bar(sum(e.nbytes for e in entries) if read else 0, progress, "norms") as bar:
        for e in entries:
            value = norm(src, e, bar) if read else None
            yield {
                "name": e.name,
                "state": e.state,
                "shape": list(e.shape),
                "dtype": dtype_name(e.dtype),
                "norm": value,
            }


# ---- output -----------------------------------------------------------------------------------------------------


def summary(src: Source) -> dict[str, Any]:
    h = src.header()
    model = [e for e in src.entries if e.state == "model"] or [e for e in src.entries if e.state == "fp32"]
    emb = next((e for e in src.entries if e.name == VOCAB_KEYS[0] and e.shape), None)
    h["lines"] = describe_config(h, sum(math.prod(e.shape) for e in model), emb.shape[0] if emb else None)
    h["schedule"] = _schedule_lines(h.get("scheduler"))
    return h


def _print_header(h: dict[str, Any], label: str = "") -> None:
    print(f"{label}checkpoint  {h['path']}")
    print(f"  format      {h['format']}; {h['files']} files, {human_bytes(h['bytes'])}; integrity {h['integrity']}")
    for key, text in h["lines"].items():
        print(f"  {key:11} {text}")
    for i, line in enumerate(h["schedule"]):
        print(f"  {'lr schedule' if i == 0 else '':11} {line}")


def _emit(line: str) -> None:
    """A table row, printed above the progress bar (on stderr) rather than through it."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _print_tensors(src: Source, rows: Iterator[dict[str, Any]]) -> None:
    width = max([len(e.name) for e in src.entries] + [6])
    print(f"\n{'tensor':{width}}  {'state':10} {'shape':20} {'dtype':9} {'norm':>14}", flush=True)
    n = values = 0
    for r in rows:
        _emit(f"{r['name']:{width}}  {r['state']:10} {str(r['shape']):20} {r['dtype']:9} {_fmt(r['norm']):>14}")
        n, values = n + 1, values + math.prod(r["shape"])
    print(f"{n} tensors, {values:,} values")


def _print_compare(a: Source, b: Source, p: Pairing, read: bool, progress: bool, ha: dict, hb: dict) -> None:
    width = max([len(ea.name) for ea, _, _ in p.pairs] + [6])
    print(f"\n{'tensor':{width}}  {'state':10} {'shape':20} {'max |a-b|':>12} {'rel diff':>12}  note", flush=True)
    diffs = []
    for d in compare(a, b, p, read, progress):
        diffs.append(d)
        shape = str(list(d.shape_a)) if d.shape_a == d.shape_b else f"{list(d.shape_a)}/{list(d.shape_b)}"
        note = d.note + (f"{'; ' if d.note else ''}dtype {d.dtype_a}/{d.dtype_b}" if d.dtype_a != d.dtype_b else "")
        _emit(f"{d.name:{width}}  {d.state:10} {shape:20} {_fmt(d.max_abs):>12} {_fmt(d.rel):>12}  {note}")
    for label, names in (("A", p.only_a), ("B", p.only_b)):
        if names:
            print(f"\nonly in {label} ({len(names)}):")
            for n in names:
                print(f"  {n}")
    for note in p.notes:
        print(f"note: {note}")
    ta, tb = ha.get("train_state") or {}, hb.get("train_state") or {}
    counters = (
        [f"iteration {ha.get('iteration')} vs {hb.get('iteration')}"]
        if ha.get("iteration") != hb.get("iteration")
        else []
    )
    counters += [
        f"{k} {ta.get(k)} vs {tb.get(k)}" for k in ("consumed_samples", "consumed_tokens") if ta.get(k) != tb.get(k)
    ]
    if counters:
        print(f"counters differ: {'; '.join(counters)}")
    result = verdict(diffs, p, read)
    worst = max((d for d in diffs if d.rel is not None), key=lambda d: d.rel or 0.0, default=None)
    tail = ""
    if result == "differ" and worst is not None and worst.rel:
        tail = f"; largest rel diff {worst.rel:.3g} ({worst.name} [{worst.state}])"
    unequal = f" ({sum(not d.same for d in diffs)} not equal)" if read else ""
    print(
        f"compared {len(diffs)} tensors in both{unequal}, {len(p.only_a)} only in A, {len(p.only_b)} only in B: "
        f"{result}{tail}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="tools/inspect_checkpoint.py",
        description="Show a checkpoint's counters, layout, config and per-tensor norms, or compare two checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("ckpt", metavar="CKPT", help="Checkpoint root (with tracker), iter_* folder or universal folder.")
    p.add_argument("--iteration", type=int, default=None, help="Iteration of CKPT to read (default: the latest).")
    p.add_argument("--compare", metavar="OTHER", default=None, help="Compare with this checkpoint (same forms).")
    p.add_argument("--json", action="store_true", help="Print one JSON document instead of tables.")
    p.add_argument("--no-tensors", action="store_true", help="Read no tensor values (shapes and dtypes only).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")
    return p


def _open_pair(args: argparse.Namespace) -> tuple[Source, Source]:
    """Against a universal folder (per-layer names), our stacked keys are split into layers."""
    universal = [(Path(p) / META).is_file() for p in (args.ckpt, args.compare)]
    return (
        open_checkpoint(args.ckpt, args.iteration, per_layer=universal[1]),
        open_checkpoint(args.compare, per_layer=universal[0]),
    )


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the tables show, as one JSON-able dict (--json)."""
    read, progress = not args.no_tensors, not args.no_progress
    if args.compare is None:
        src = open_checkpoint(args.ckpt, args.iteration)
        return {"checkpoint": summary(src), "tensors": list(tensor_rows(src, read, progress))}
    a, b = _open_pair(args)
    p = pair(a, b)
    diffs = list(compare(a, b, p, read, progress))
    rows = [vars(d) | {"identical": d.same} for d in diffs]
    out = {"diffs": rows, "only_a": p.only_a, "only_b": p.only_b, "notes": p.notes, "verdict": verdict(diffs, p, read)}
    return {"a": summary(a), "b": summary(b), "compare": out}


def print_tables(args: argparse.Namespace) -> None:
    """The text form, printed as it is computed (the header before any tensor is read)."""
    read, progress = not args.no_tensors, not args.no_progress
    if args.compare is None:
        src = open_checkpoint(args.ckpt, args.iteration)
        _print_header(summary(src))
        _print_tensors(src, tensor_rows(src, read, progress))
        return
    a, b = _open_pair(args)
    ha, hb = summary(a), summary(b)
    _print_header(ha, "A ")
    _print_header(hb, "B ")
    _print_compare(a, b, pair(a, b), read, progress, ha, hb)


def main(argv: list[str] | None = None) -> int:
    """Inspect or compare; user mistakes (bad paths, unreadable files) end in one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.json:
            print(json.dumps(report(args), indent=1, default=plain))
        else:
            print_tables(args)
    except (UserError, OSError) as e:
        sys.stdout.flush()
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
