"""Where checkpoints lie on disk, in Megatron-LM's layout: `iter_%07d/` folders and a tracker file naming the
latest. Import-free (no torch, no megatron-core), so tools can reject a wrong --load at once."""

from __future__ import annotations

from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
COMMON_STATE = "common.pt"  # dist_checkpointing's non-sharded state: config, schedule, counters


class CheckpointNotFound(ValueError):
    """--load names no readable checkpoint; the message says what is missing."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The iteration named by the tracker file, or None when there is no tracker."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return 0
    if not text.isdigit():
        raise CheckpointNotFound(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def find_checkpoint(load: str | Path, iteration: int | None = None) -> Path:
    """The iter_%07d folder to read: `iteration`'s, else the tracker's; `load` may also be that folder itself."""
    root = Path(load)
    if iteration is None and (root / COMMON_STATE).is_file():
        return root
    if not root.is_dir():
        raise CheckpointNotFound(f"--load {root}: no such folder")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointNotFound(f"--load {root}: no checkpoint there ({TRACKER} is missing)")
    path = iteration_dir(root, iteration)
    if not (path / COMMON_STATE).is_file():
        raise CheckpointNotFound(
            f"--load {root}: no checkpoint for iteration {iteration} ({path / COMMON_STATE} is missing)"
        )
    return path
