"""Checkpoints with exact resume and the final weights, the same for every model trained here.

A model trained into out_dir keeps out_dir/checkpoints/step-XXXXXXXX.pt while it trains (the newest `keep` of them;
a later call resumes from the latest) and, once done, out_dir/final/ as its save_pretrained wrote it. Both are
written beside and renamed, so a kill never leaves half a checkpoint or a final folder without its weights, and
the presence of final/ is what says that training is done.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tasks.data.catalog import atomic_output

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint: temp files of an interrupted write start with '.' and never match."""
    found = sorted((Path(out_dir) / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, step: int, payload: dict, keep: int = 1) -> Path:
    """Write payload (its "step" is `step`) as the step's checkpoint and delete all but the newest `keep`."""
    path = Path(out_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"
    with atomic_output(path) as tmp:
        torch.save({**payload, "step": step}, tmp)
    for old in sorted((Path(out_dir) / CHECKPOINT_DIR).glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def final_dir(out_dir: Path) -> Path:
    return Path(out_dir) / FINAL_DIR


def is_trained(out_dir: Path) -> bool:
    return final_dir(out_dir).is_dir()


def save_final(save_pretrained: Callable[[Path], None], out_dir: Path) -> Path:
    """save_pretrained(folder) into a temp folder beside, renamed to out_dir/final: never half written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FINAL_DIR}-", suffix=".tmp", dir=out_dir))
    save_pretrained(tmp)
    os.replace(tmp, final_dir(out_dir))
    return final_dir(out_dir)


def rng_state() -> dict:
    """Every global generator's state, loadable with torch.load(weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # plain ints load with weights_only
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(out_dir: Path, step: int, data_order: dict, metrics: dict, keep: int, **stateful) -> Path:
    """A checkpoint of everything a resumed run needs: each of `stateful`'s state_dict() (models, optimizers, lr
    schedulers) under its name, every RNG's state, the data order it was trained with and the latest metrics."""
    return save_checkpoint(out_dir, step, {**{name: obj.state_dict() for name, obj in stateful.items()},
                                           "rng": rng_state(), "data_order": data_order, "metrics": metrics},
                           keep=keep)


def resume_training(out_dir: Path, data_order: dict, **stateful) -> tuple[int, dict]:
    """Load the latest checkpoint into `stateful` (as save_training_state named them) and the RNGs; returns (step,
    metrics), (0, {}) when there is none. A checkpoint of another data order (seed, batch, rows) is refused: its
    step count would not say which rows come next."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        return 0, {}
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state["data_order"] != data_order:
        raise ValueError(f"{checkpoint}: written with data order {state['data_order']}, but this run has "
                         f"{data_order}; use a new out_dir or restore the config")
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
    return state["step"], state["metrics"]
