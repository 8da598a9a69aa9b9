"""tools/inspect_checkpoint.py on a real (tiny) checkpoint: counters and layout shown, norms equal to torch's reading
of the same tensors, comparisons that say identical / differ, a hand-made universal folder read and paired with our
stacked keys, and bad input reported in one line with exit status 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from launchers import clean_env

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "inspect_checkpoint.py"
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 --lr 1e-3 "
    "--log-interval 1 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 --lr-decay-style constant"
).split()
VOCAB = 258  # ByteTokenizer; the checkpoint pads the embedding to 384 rows


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("inspect_checkpoint_tool", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tool = _tool()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints of iterations 2 and 4 of a tiny fp32 run (about 20 s)."""
    tmp = tmp_path_factory.mktemp("inspect")
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *TINY, "--data-cache-path", str(tmp / "data")]
    argv += ["--train-iters", "4", "--save", str(tmp / "ckpt"), "--save-interval", "2"]
    env = {**clean_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return tmp / "ckpt"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = tool.main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _torch_read(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist_checkpointing folder, read whole by torch.distributed.checkpoint (not by the tool)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    state = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(state, checkpoint_id=str(folder))
    return state


def _stored_key(name: str, state: str) -> str:
    return name if state == "model" else f"optimizer.state.{state}.{name}"


def test_inspection_shows_counters_layout_and_exact_norms(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, str(ckpt))
    assert code == 0
    assert f"checkpoint  {ckpt / 'iter_0000004'}" in out
    assert "iteration 4, consumed samples 8, consumed tokens 512" in out  # 4 steps x 2 samples x 64 tokens
    assert "saved with TP=1 PP=1" in out and "2 layers, hidden 64, 4 heads" in out and "ByteTokenizer" in out
    assert "lr schedule constant" in out and "optimizer step 4" in out
    assert out.rstrip().endswith("48 tensors, 386,304 values")

    code, out, _ = _run(capsys, str(ckpt), "--json")
    report = json.loads(out)
    head = report["checkpoint"]
    assert head["iteration"] == 4 and head["train_state"]["consumed_tokens"] == 512
    assert head["layout"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    tensors = _torch_read(ckpt / "iter_0000004")
    rows = {_stored_key(r["name"], r["state"]): r for r in report["tensors"]}
    assert set(rows) == set(tensors)
    for key, t in tensors.items():
        assert rows[key]["shape"] == list(t.shape) and rows[key]["dtype"] == "float32"
        assert rows[key]["norm"] == pytest.approx(torch.linalg.norm(t.double()).item(), rel=1e-12, abs=1e-300)

    code, out, _ = _run(capsys, str(ckpt), "--iteration", "2", "--no-tensors", "--json")
    report = json.loads(out)
    assert report["checkpoint"]["iteration"] == 2 and all(r["norm"] is None for r in report["tensors"])


def test_compare_identical_and_differing(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, str(ckpt), "--compare", str(ckpt / "iter_0000004"))
    assert code == 0 and out.rstrip().endswith(
        "compared 48 tensors in both (0 not equal), 0 only in A, 0 only in B: identical"
    )

    code, out, _ = _run(capsys, str(ckpt), "--iteration", "2", "--compare", str(ckpt))
    last = out.rstrip().splitlines()[-1]
    assert code == 0 and ": differ; largest rel diff" in last  # differ is no error: exit status 0
    assert "counters differ: iteration 2 vs 4; consumed_samples 4 vs 8; consumed_tokens 256 vs 512" in out

    code, out, _ = _run(capsys, str(ckpt), "--iteration", "2", "--compare", str(ckpt), "--json")
    c = json.loads(out)["compare"]
    assert c["verdict"] == "differ" and not c["only_a"] and not c["only_b"]
    assert all(d["max_abs"] > 0 and 0 < d["rel"] for d in c["diffs"] if d["name"].endswith(".weight"))


def _write_universal(ckpt: Path, out: Path, skip: str | None = None) -> dict:
    """A universal folder by hand from the checkpoint's tensors, following the format's description (not the
    converter): per-layer names, fp32 = the model weight of this fp32 run, vocabulary rows cut to the tokenizer's."""
    tensors = _torch_read(ckpt / "iter_0000004")
    common = torch.load(ckpt / "iter_0000004" / "common.pt", weights_only=False)
    params: dict[str, dict] = {}
    for key, t in tensors.items():
        state, name = "fp32", key
        if key.startswith("optimizer.state."):
            state, _, name = key[len("optimizer.state.") :].partition(".")
        pieces = [(name, t)]
        if name.startswith("decoder.layers."):  # layer i of decoder.layers.X is decoder.layers.i.X
            pieces = [(name.replace("layers.", f"layers.{i}.", 1), t[i]) for i in range(t.shape[0])]
        for per_layer, value in pieces:
            if per_layer == "embedding.word_embeddings.weight":
                value = value[:VOCAB]
            if per_layer == skip:
                continue
            entry = params.setdefault(per_layer, {"shape": list(value.shape), "dtype": "float32", "states": []})
            entry["states"].append(state)
            (out / "zero" / per_layer).mkdir(parents=True, exist_ok=True)
            torch.save({"param": value.clone()}, out / "zero" / per_layer / f"{state}.pt")
            torch.save(torch.tensor(4.0), out / "zero" / per_layer / "step.pt")
    meta = {
        "format": "megatron_ext.universal/1",
        "iteration": common["iteration"],
        "config": common["config"],
        "train_state": common["train_state"],
        "data_state": common["data_state"],
        "scheduler": common["scheduler"],
        "source": str(ckpt / "iter_0000004"),
        "params": params,
    }
    (out / "universal.json").write_text(json.dumps(meta))
    return params


def test_universal_folder_reads_and_pairs_with_stacked_keys(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    univ = tmp_path / "univ"
    params = _write_universal(ckpt, univ)
    code, out, _ = _run(capsys, str(univ), "--json")
    report = json.loads(out)
    assert code == 0 and report["checkpoint"]["iteration"] == 4
    assert report["checkpoint"]["train_state"]["consumed_tokens"] == 512
    rows = {(r["name"], r["state"]): r for r in report["tensors"]}
    assert len(rows) == sum(len(p["states"]) for p in params.values()) == 84  # 2 layers x 12 + 4 others, 3 states each
    for (name, state), row in rows.items():
        saved = torch.load(univ / "zero" / name / f"{state}.pt", weights_only=True)["param"]
        assert row["shape"] == list(saved.shape)
        assert row["norm"] == pytest.approx(torch.linalg.norm(saved.double()).item(), rel=1e-12, abs=1e-300)
    assert rows[("embedding.word_embeddings.weight", "fp32")]["shape"] == [VOCAB, 64]

    for a, b in ((ckpt, univ), (univ, ckpt)):  # either side may be the universal folder
        code, out, _ = _run(capsys, str(a), "--compare", str(b))
        assert code == 0 and out.rstrip().endswith(
            "84 tensors in both (0 not equal), 0 only in A, 0 only in B: identical"
        )
        assert "decoder.layers.1.mlp.linear_fc1.weight" in out
        rows_cut = [line for line in out.splitlines() if line.startswith("embedding.word_embeddings.weight")]
        assert len(rows_cut) == 3 and all(f"first {VOCAB} rows compared" in line for line in rows_cut)

    changed = tmp_path / "changed"
    _write_universal(ckpt, changed, skip="decoder.layers.1.mlp.linear_fc2.bias")
    f = changed / "zero" / "decoder.layers.0.self_attention.linear_qkv.weight" / "exp_avg.pt"
    t = torch.load(f, weights_only=True)["param"]
    t[3, 5] += 0.5
    torch.save({"param": t}, f)
    code, out, _ = _run(capsys, str(ckpt), "--compare", str(changed), "--json")
    c = json.loads(out)["compare"]
    assert c["verdict"] == "differ"
    assert [d["name"] + " " + d["state"] for d in c["diffs"] if not d["identical"]] == [
        "decoder.layers.0.self_attention.linear_qkv.weight exp_avg"
    ]
    bad = next(d for d in c["diffs"] if not d["identical"])
    assert bad["max_abs"] == pytest.approx(0.5, rel=1e-6)
    assert c["only_a"] == [f"decoder.layers.1.mlp.linear_fc2.bias [{s}]" for s in ("fp32", "exp_avg", "exp_avg_sq")]


def test_bad_input_is_one_line_and_exit_2(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(tmp_path / "missing")], capture_output=True, text=True, env=clean_env()
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'missing'}: no such file or folder"]

    cases = [
        ([str(tmp_path)], "not a checkpoint"),
        ([str(ckpt), "--iteration", "3"], "no checkpoint of iteration 3 (iterations found: 2, 4)"),
        ([str(ckpt), "--compare", str(tmp_path / "missing")], "no such file or folder"),
    ]
    for args, message in cases:
        code, out, err = _run(capsys, *args)
        assert code == 2 and err.splitlines() == [err.strip()] and err.startswith("error: ") and message in err, err
    with pytest.raises(SystemExit) as stop:  # argparse mistakes: the same one line, from the parser
        tool.main([str(ckpt), "--iteration", "x"])
    err = capsys.readouterr().err
    assert (
        stop.value.code == 2
        and err.startswith("error: argument --iteration: invalid int value")
        and err.count("\n") == 1
    )

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in (ckpt / "iter_0000004").iterdir():
        (damaged / f.name).write_bytes(
            f.read_bytes()[: f.stat().st_size // 2] if f.suffix == ".distcp" else f.read_bytes()
        )
    code, out, err = _run(capsys, str(damaged))
    assert code == 2 and err.count("\n") == 1 and ("damaged" in err or "truncated" in err), err
    assert "integrity DAMAGED" in out  # the header, printed before any tensor is read, already says so
