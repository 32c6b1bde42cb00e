"""Test-wide settings: offline, no telemetry, a private Prefect home, and one Prefect test server per session."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cxr-prefect-home-"))
os.environ.pop("PREFECT_API_URL", None)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SMOKE = REPO_ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for tests that run flows (about 7 s once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, prefect_harness) -> tuple[Path, dict]:
    """The whole augment flow on the smoke config from an empty data root, once per session: (data root, result).
    tests/test_flow_full.py checks the run; the app's tests look at what it made and change nothing in it."""
    from flows.full import augment

    root = tmp_path_factory.mktemp("full")
    return root, augment(config_path=str(SMOKE), overrides=[f"run.data_root={root}"])


@pytest.fixture(scope="session")
def smoke_root(request) -> Path:
    """The smoke run's data root, for tests that only read it. CXR_SMOKE_ROOT names a completed smoke run's data
    root to reuse instead, to iterate on those tests without the minutes of the flow."""
    if os.environ.get("CXR_SMOKE_ROOT"):
        return Path(os.environ["CXR_SMOKE_ROOT"])
    return request.getfixturevalue("smoke_run")[0]


class PartKiller:
    """arm(table) makes catalog.write_part raise on the second data part of `table`, as a run killed mid-stage,
    and returns the list of parts committed before that; disarm() restores the real write_part."""

    def __init__(self, monkeypatch):
        from tasks.data import catalog

        self._monkeypatch, self._catalog, self._write_part = monkeypatch, catalog, catalog.write_part

    def arm(self, table: str) -> list[str]:
        written: list[str] = []

        def dies_on_second_unit(data_root, name, part, rows):
            if name == table and part != "_schema":
                if written:
                    raise RuntimeError("killed")
                written.append(part)
            return self._write_part(data_root, name, part, rows)

        self._monkeypatch.setattr(self._catalog, "write_part", dies_on_second_unit)
        return written

    def disarm(self) -> None:
        self._monkeypatch.setattr(self._catalog, "write_part", self._write_part)


@pytest.fixture
def die_on_second_part(monkeypatch) -> PartKiller:
    return PartKiller(monkeypatch)


@pytest.fixture(scope="session")
def tiny_rad_dino(tmp_path_factory):
    """A randomly initialised DINOv2 with RAD-DINO's kind of image processor, saved as a Hugging Face folder: the
    stand-in for every local vision backbone (RAD-DINO's weights are a download)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rad-dino")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.53, 0.53, 0.53], image_std=[0.26, 0.26, 0.26]).save_pretrained(folder)
    return folder


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core box run fastest on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
