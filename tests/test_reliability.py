"""Bad inputs and faults that must end in one `error:` line naming the culprit and the fix, with nothing lost: the
--nan-policy advice, --load of what is not a checkpoint, full and read-only disks, and a failed run that leaves its
run folder as it was."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext.config import parse_args
from megatron_ext.training import checkpointing, loop, universal
from megatron_ext.training.checkpointing import CheckpointError, find_loadable
from megatron_ext.training.loop import TrainingStopped, TrainState, check_non_finite


@pytest.mark.parametrize(
    ("flags", "advice"),
    [
        (["--nan-policy", "stop"], "use --nan-policy skip."),
        (["--max-skipped-steps", "2"], "raise --max-skipped-steps (2)."),
    ],
)
def test_nan_stop_advises_a_change_not_the_policy_in_effect(flags: list[str], advice: str) -> None:
    """Under skip, a run stopped by --max-skipped-steps was told to 'use --nan-policy skip', which it did."""
    tr = SimpleNamespace(cfg=parse_args(flags), state=TrainState(iteration=7, skipped_in_a_row=3))
    with pytest.raises(TrainingStopped) as e:
        check_non_finite(tr, {"skipped": 1.0, "lm_loss": float("nan"), "grad_norm": float("nan")})  # type: ignore[arg-type]
    assert str(e.value).startswith("iteration 7: non-finite loss nan or grad norm nan (3 in a row)")
    assert str(e.value).endswith(f"Lower --lr, check the data, or {advice}") and "\n" not in str(e.value)


# ---- --load of what is not a checkpoint ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 32 --micro-batch-size 2 --lr 1e-3 "
    "--log-interval 1 --eval-iters 0 --train-iters 4"
).split()


def pretrain(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *TINY, "--data-cache-path", str(cwd / "cache"), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with checkpoints at iterations 2 and 4."""
    tmp = tmp_path_factory.mktemp("load")
    proc = pretrain(tmp, "--save", str(tmp / "ckpt"), "--save-interval", "2")
    assert proc.returncode == 0 and (tmp / "ckpt" / "iter_0000002").is_dir(), proc.stderr[-3000:]
    return tmp


def test_load_of_an_iteration_folder_resumes_that_iteration(saved: Path) -> None:
    """It started from iteration 0 with 'no checkpoint yet'."""
    proc = pretrain(saved, "--load", str(saved / "ckpt" / "iter_0000002"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {saved / 'ckpt' / 'iter_0000002'} at iteration 2\n" in proc.stdout
    assert re.findall(r"^iter (\d+)/4 ", proc.stdout, re.M) == ["3", "4"]


def test_load_of_a_folder_without_a_checkpoint_is_one_error_line(saved: Path) -> None:
    """A folder of other files (a typo, another framework's checkpoint) started a fresh run silently."""
    foreign = saved / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\0" * 8)
    before = checksums(saved / "ckpt")
    proc = pretrain(saved, "--load", str(foreign), "--save", str(saved / "ckpt"))
    expected = f"error: --load {foreign} holds weights.bin but no checkpoint; expected iter_NNNNNNN folders"
    assert (proc.returncode, proc.stdout, proc.stderr.count("\n")) == (2, "", 1), proc.stderr[-3000:]
    assert proc.stderr.startswith(expected) and "Traceback" not in proc.stderr
    assert checksums(saved / "ckpt") == before  # config.json too: it was rewritten before --load was read


def test_what_counts_as_a_checkpoint_an_empty_folder_or_neither(tmp_path: Path) -> None:
    run = tmp_path / "run"  # our own run files only: LOAD=SAVE restarts before the first checkpoint
    (run / "tensorboard").mkdir(parents=True)
    (run / "iter_0000003.tmp").mkdir()
    (run / "config.json").write_text("{}")
    (run / "train.log").write_text("iter 1\n")
    assert find_loadable(run) == (None, []) and find_loadable(tmp_path / "new") == (None, [])
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"^--load {hf} is a Hugging Face model; convert it first: "
                       f"tools/convert_checkpoint.py from-hf --load {hf} --save NEW, then --load NEW"):  # fmt: skip
        find_loadable(hf)
    step = tmp_path / "ckpt" / "iter_0000002"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text("{}")
    (step / "common.pt").write_bytes(b"")
    assert find_loadable(step) == find_loadable(step.parent, 2) == (step, [])
    with pytest.raises(CheckpointError, match="is iteration 2, --ckpt-step 3: give one of them"):
        find_loadable(step, 3)


# ---- disks: read-only and full ------------------------------------------------------------------------------


def test_a_read_only_save_folder_is_one_line_at_start_up(tmp_path: Path, monkeypatch, capsys) -> None:
    """It was an OSError traceback from mkdir (or from opening train.log). EROFS injected: the tests run as root."""
    save = tmp_path / "ro" / "ckpt"
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path)))
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY))
    assert loop.main([*TINY, "--save", str(save)]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: --save {save}: cannot write there ({tmp_path}): read-only file system\n")
    assert not (tmp_path / "ro").exists()


@pytest.fixture
def world_of_one():
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    yield
    torch.distributed.destroy_process_group()


def _wrapped(error: BaseException) -> CheckpointException:
    return CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (error, traceback.StackSummary())})


@pytest.mark.parametrize(
    ("failure", "free", "reason"),
    [
        (_wrapped(RuntimeError("unexpected pos 704 vs 598")), 0, "no space left on device"),  # torch's short write
        (_wrapped(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))), 10**9, "no space left on device"),
        ("mkdir", 10**9, "read-only file system"),
    ],
)
def test_a_save_on_a_full_or_read_only_disk_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch, world_of_one, failure: object, free: int, reason: str
) -> None:
    """A full disk was megatron's CheckpointException text ('unexpected pos 704 vs 598'), the half-written iter_N.tmp
    left behind; a folder turned read-only mid-run was an OSError traceback."""
    root = tmp_path / "ckpt"
    (root / "iter_0000002").mkdir(parents=True)
    (root / "iter_0000002" / "common.pt").write_bytes(b"weights")
    (root / "latest_checkpointed_iteration.txt").write_text("2\n")
    before = checksums(root)

    def write_half(state: dict, folder: str, **kwargs: object) -> None:
        (Path(folder) / "__0_0.distcp").write_bytes(b"x" * 598)
        raise failure  # type: ignore[misc]

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(checkpointing, "checkpoint_state", lambda *args, **kwargs: {})
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", write_half)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    if failure == "mkdir":
        monkeypatch.setattr(Path, "mkdir", read_only)
    scheduler = SimpleNamespace(state_dict=dict)
    with pytest.raises(CheckpointError) as e:
        checkpointing.save(root, 4, [], None, scheduler, {})  # type: ignore[arg-type]
    assert str(e.value).startswith(f"--save {root}: cannot write checkpoint iter_0000004: {reason}")
    assert (
        "\n" not in str(e.value)
        and checksums(root) == before
        and sorted(os.listdir(root)) == sorted(["iter_0000002", "latest_checkpointed_iteration.txt"])
    )


def test_a_disk_that_fills_during_a_save_on_a_real_tmpfs(tmp_path: Path) -> None:
    """A 700 KiB tmpfs holds the first checkpoint (~460 KB) but not the second: the free-space check before the
    save stops the run in one line and keeps the first checkpoint. (Before that check torch's writer failed with
    'unexpected pos 704 vs 598': the write-time path is tested with injected errors above.)"""
    small = tmp_path / "small"
    small.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(small)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        proc = pretrain(tmp_path, "--save", str(small / "ckpt"), "--save-interval", "2")
        listing = sorted(os.listdir(small / "ckpt"))
        tracker = (small / "ckpt" / "latest_checkpointed_iteration.txt").read_text()
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert proc.returncode == 1 and re.fullmatch(
        f"error: --save {re.escape(str(small / 'ckpt'))}: \\d+ kB free, checkpoint iter_0000004 needs about \\d+ kB "
        r"\(the size of the last one\); not written, the last complete checkpoint is unchanged: free space or save "
        r"elsewhere\n",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert listing == ["config.json", "iter_0000002", "latest_checkpointed_iteration.txt", "train.log"]
    assert tracker == "2\n"


@pytest.mark.parametrize("free", [4999, 5000])
def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path: Path, monkeypatch, world_of_one, free: int) -> None:
    """The last checkpoint took 5,000 bytes (its manifest): with less free space the next save is one line naming
    the folder, nothing written and the last checkpoint unchanged; with as much it is written."""
    root = tmp_path / "ckpt"
    (root / "iter_0000002").mkdir(parents=True)
    (root / "iter_0000002" / "manifest.json").write_text('{"__0_0.distcp": 4000, "common.pt": 1000}')
    (root / "latest_checkpointed_iteration.txt").write_text("2\n")
    before = checksums(root)
    written = []
    monkeypatch.setattr(checkpointing, "checkpoint_state", lambda *args, **kwargs: {})
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", lambda state, folder, **kw: written.append(folder))
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    assert checkpointing.last_checkpoint_bytes(root) == 5000
    scheduler = SimpleNamespace(state_dict=dict)
    if free == 5000:
        checkpointing.save(root, 4, [], None, scheduler, {})  # type: ignore[arg-type]
        assert len(written) == 1 and (root / "latest_checkpointed_iteration.txt").read_text() == "4\n"
        return
    with pytest.raises(CheckpointError) as e:
        checkpointing.save(root, 4, [], None, scheduler, {})  # type: ignore[arg-type]
    assert str(e.value) == (
        f"--save {root}: 5 kB free, checkpoint iter_0000004 needs about 5 kB (the size of the last one); not "
        "written, the last complete checkpoint is unchanged: free space or save elsewhere"
    )
    assert (
        written == []
        and checksums(root) == before
        and sorted(os.listdir(root)) == sorted(["iter_0000002", "latest_checkpointed_iteration.txt"])
    )


def test_the_reason_no_checkpoint_loads_is_said_once(tmp_path: Path, world_of_one) -> None:
    """The last skipped checkpoint's line was printed, then repeated inside the error."""
    (tmp_path / "iter_0000001").mkdir()
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2\n")
    lines: list[str] = []
    with pytest.raises(CheckpointError) as e:
        checkpointing.load(tmp_path, [], None, log=lines.append)
    skipped = "checkpoint {} is unusable (incomplete: no metadata.json, common.pt); skipped"
    assert lines == [skipped.format(tmp_path / "iter_0000002")]
    assert str(e.value) == f"--load {tmp_path}: no usable checkpoint ({skipped.format(tmp_path / 'iter_0000001')})"


# ---- data and checkpoints of another tokenizer ----------------------------------------------------------------


def test_token_ids_beyond_the_vocabulary_name_the_data_file(tmp_path: Path) -> None:
    """A dataset made with another tokenizer was an IndexError traceback from F.embedding."""
    from megatron_ext.data.indexed import IndexedDatasetWriter

    prefix = tmp_path / "web" / "other_tokenizer"
    prefix.parent.mkdir()
    with IndexedDatasetWriter(prefix, vocab_size=70_000) as writer:
        for d in range(40):
            writer.add_document([(d * 7 + k) % 250 for k in range(30)] + [60_000 + d])
    before = checksums(prefix.parent)
    proc = pretrain(tmp_path, "--data-path", str(prefix), "--split", "100,0,0", "--save", str(tmp_path / "ckpt"))
    assert (proc.returncode, proc.stderr.count("\n")) == (1, 1), proc.stderr[-3000:]
    assert re.fullmatch(
        rf"error: data file {prefix} \(corpus web\): token id 600\d\d is beyond the tokenizer's vocabulary of 258 "
        r"\(--tokenizer-type and --tokenizer-model\): the data was made with another tokenizer; preprocess it "
        r"with this one\n",
        proc.stderr,
    ), proc.stderr
    assert checksums(prefix.parent) == before and not (tmp_path / "ckpt" / "iter_0000001").exists()


def test_token_ids_beyond_the_vocabulary_stop_every_rank(tmp_path: Path) -> None:
    """One document of 40 holds an id beyond the vocabulary, read by one of two data-parallel ranks: that rank stopped
    alone and the other waited in its next collective until the launcher or the timeout ended it. Now both stop
    after the step's reduction with the reading rank's line (and the step is not applied)."""
    from megatron_ext import distributed
    from megatron_ext.data.indexed import IndexedDatasetWriter

    prefix = tmp_path / "web" / "one_bad_document"
    prefix.parent.mkdir()
    with IndexedDatasetWriter(prefix, vocab_size=70_000) as writer:
        for d in range(40):
            writer.add_document([60_000 if (d, k) == (17, 15) else (d * 7 + k) % 250 for k in range(30)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(distributed.free_port()), str(ROOT / "pretrain_gpt.py"), *TINY, "--train-iters", "20", "--data-path",
            str(prefix), "--split", "100,0,0", "--data-cache-path", str(tmp_path / "cache"),
            "--distributed-timeout-minutes", "5"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    line = (
        f"error: data file {prefix} (corpus web): token id 60000 is beyond the tokenizer's vocabulary of 258 "
        "(--tokenizer-type and --tokenizer-model): the data was made with another tokenizer; preprocess it with "
        "this one"
    )
    assert proc.returncode != 0 and proc.stderr.splitlines().count(line) == 2, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def bpe_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer of 300 tokens: padded to the byte tokenizer's 384 rows, so its checkpoints loaded silently."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([f"def f{i}(x):\n    return x + {i}\n" for i in range(200)], trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    assert tok.get_vocab_size() == 300
    return path


def _embedding(checkpoint: Path) -> torch.Tensor:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)["embedding.word_embeddings.weight"]


def test_a_checkpoint_of_another_vocabulary_is_refused_or_resized(saved: Path, bpe_300: Path) -> None:
    """A resume under a tokenizer of another vocabulary went on silently."""
    tokenizer = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(bpe_300)]
    before = checksums(saved / "ckpt")
    proc = pretrain(saved, "--load", str(saved / "ckpt"), "--save", str(saved / "ckpt"), *tokenizer)
    assert (proc.returncode, proc.stderr.count("\n")) == (2, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr == (
        f"error: --load {saved / 'ckpt' / 'iter_0000004'} was saved with a vocabulary of 258 tokens (--tokenizer-type "
        f"ByteTokenizer), this run's tokenizer (--tokenizer-type HuggingFaceTokenizer --tokenizer-model {bpe_300}) "
        "has 300: use the checkpoint's tokenizer, or --finetune --resize-vocabulary to start from its weights with "
        "the embedding resized\n"
    )
    assert checksums(saved / "ckpt") == before

    tuned = saved / "tuned"  # the first 258 rows are the checkpoint's (a step of lr 1e-30 moves none), 42 new ones
    proc = pretrain(saved, "--load", str(saved / "ckpt"), "--finetune", "--resize-vocabulary", "--save", str(tuned),
                    "--train-iters", "1", "--lr", "1e-30", *tokenizer)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    old, new = _embedding(saved / "ckpt" / "iter_0000004"), _embedding(tuned / "iter_0000001")
    assert old.shape == new.shape == (384, 32)
    assert torch.equal(new[:258], old[:258]) and not torch.equal(new[258:300], old[258:300])
    assert 0.01 < float(new[258:300].std()) < 0.03  # --init-method-std 0.02, as the model's init


def test_a_universal_checkpoint_of_another_vocabulary_is_refused_or_resized(saved: Path, bpe_300: Path) -> None:
    """The universal loader pads or cuts the vocabulary rows itself: another tokenizer's checkpoint loaded silently."""
    univ = saved / "univ"
    convert = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "to-universal", "--load",
               str(saved / "ckpt"), "--save", str(univ)]  # fmt: skip
    assert subprocess.run(convert, capture_output=True, text=True).returncode == 0
    before = checksums(univ)
    tokenizer = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(bpe_300)]
    proc = pretrain(saved, "--load", str(univ), *tokenizer)
    assert (proc.returncode, proc.stderr.count("\n")) == (2, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith(
        f"error: --load {univ} was saved with a vocabulary of 258 tokens (--tokenizer-type ByteTokenizer), this run's "
        f"tokenizer (--tokenizer-type HuggingFaceTokenizer --tokenizer-model {bpe_300}) has 300: "
    )
    assert checksums(univ) == before

    tuned = saved / "tuned_univ"  # the 258 rows the checkpoint knows, 42 new ones with the init's std
    proc = pretrain(saved, "--load", str(univ), "--finetune", "--resize-vocabulary", "--save", str(tuned),
                    "--train-iters", "1", "--lr", "1e-30", *tokenizer)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = universal.read_state(univ, "embedding.word_embeddings.weight", "fp32")
    new = _embedding(tuned / "iter_0000001")
    assert old.shape == new.shape == (384, 32)  # the universal folder keeps the saved padding rows
    assert torch.equal(new[:258], old[:258]) and 0.01 < float(new[258:300].std()) < 0.03


# ---- kill -9 during a save --------------------------------------------------------------------------------------

PAUSED_SAVE = """
import os, sys, time
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

def paused(*args, **kwargs):  # the writer process, forked by the save: say so, then wait to be killed
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(300)

FileSystemWriterAsync.write_preloaded_data = staticmethod(paused)
from megatron_ext.training import loop
sys.exit(loop.main(sys.argv[2:]))
"""


def _descendants(pid: int) -> set[int]:
    """The processes below `pid`, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_checkpoint_writer_dies_with_its_killed_rank(tmp_path: Path) -> None:
    """1 of 5 kill -9s during a save left megatron-core's writer process alive with parent 1. Deterministic: the
    writer pauses (a patched write), the rank is killed, the writer must be gone."""
    marker = tmp_path / "writer.pid"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", PAUSED_SAVE, str(marker), *TINY, "--data-cache-path", str(tmp_path / "cache"),
            "--save", str(tmp_path / "ckpt")]  # fmt: skip
    rank = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writer, children = 0, set()
    try:
        for _ in range(1200):
            if marker.is_file() or rank.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.is_file(), rank.stderr.read().decode()[-3000:] if rank.stderr else ""
        writer = int(marker.read_text())
        children = _descendants(rank.pid)
        assert writer in children and _alive(writer)  # and megatron-core's results-queue manager, a spawned process
        rank.kill()
        rank.wait()
        for _ in range(100):  # the kernel kills them at once; allow for a loaded machine
            if not any(map(_alive, children)):
                break
            time.sleep(0.1)
        assert [pid for pid in children if _alive(pid)] == []
        assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()
    finally:
        rank.kill()
        for pid in children if writer else []:
            if _alive(pid):
                os.kill(pid, 9)
