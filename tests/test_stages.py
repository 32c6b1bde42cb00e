"""Stage fingerprints: a stage reruns exactly when its config sections, input files or code change."""

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from prefect import flow

from flows import curate
from flows.full import run_stage
from tasks import layout, stages
from tasks.config import load_config

CONFIG = """
run: {name: t, data_root: %s}
source: {kind: demo, studies: 10}
ingest: {resolution: 64}
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG % (tmp_path / "data"))
    (tmp_path / "data" / "tables" / "images").mkdir(parents=True)
    (tmp_path / "data" / "tables" / "images" / "a.parquet").write_bytes(b"one")
    return path


def fp(config_path: Path, overrides=()) -> str:
    return stages.fingerprint(curate.stage(load_config(config_path, list(overrides))))


def test_unchanged_inputs_give_the_same_fingerprint(config_path):
    assert fp(config_path) == fp(config_path)


def test_sections_the_stage_is_not_given_do_not_count(config_path):
    assert fp(config_path, ["ingest.resolution=128"]) == fp(config_path)


def test_the_section_it_is_given_counts(config_path):
    assert fp(config_path, ["curate.uncertainty=ones"]) != fp(config_path)


def test_input_content_counts_and_temp_files_do_not(config_path):
    before = fp(config_path)
    images = config_path.parent / "data" / "tables" / "images"
    (images / ".b.parquet.123.tmp").write_bytes(b"half-written")
    assert fp(config_path) == before
    (images / "a.parquet").write_bytes(b"two")
    assert fp(config_path) != before


def test_completed_summary_only_for_the_same_fingerprint(tmp_path):
    assert stages.completed_summary(tmp_path, "curate", "abc") is None
    stages.record_completed(tmp_path, "curate", "abc", "config-1", {"images": 3})
    assert stages.completed_summary(tmp_path, "curate", "abc") == {"images": 3}
    assert stages.completed_summary(tmp_path, "curate", "def") is None


def test_config_and_code_fingerprint_ignores_the_data_only(config_path):
    def config_and_code(overrides=()):
        return stages.config_and_code_fingerprint(curate.stage(load_config(config_path, list(overrides))))

    before = config_and_code()
    (config_path.parent / "data" / "tables" / "images" / "b.parquet").write_bytes(b"new studies")
    assert config_and_code() == before
    assert config_and_code(["curate.uncertainty=ones"]) != before


def test_recent_summary_needs_the_same_config_and_code_and_a_young_enough_run(tmp_path):
    stages.record_completed(tmp_path, "train_generator", "fp-1", "config-1", {"generator_id": "g1"})
    week = timedelta(days=7)
    assert stages.recent_summary(tmp_path, "train_generator", "config-1", week) == {"generator_id": "g1"}
    assert stages.recent_summary(tmp_path, "train_generator", "config-2", week) is None
    assert stages.recent_summary(tmp_path, "tokenize", "config-1", week) is None
    record_path = tmp_path / "stages" / "train_generator.json"
    record = json.loads(record_path.read_text())
    record["completed_at"] = (datetime.now(UTC) - timedelta(days=8)).isoformat()
    record_path.write_text(json.dumps(record))
    assert stages.recent_summary(tmp_path, "train_generator", "config-1", week) is None
    assert stages.recent_summary(tmp_path, "train_generator", "config-1", timedelta(days=9)) == {"generator_id": "g1"}


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """The project's code and SQL, copied, so a test can edit a module and see which stages notice."""
    root = tmp_path_factory.mktemp("project")
    for name in (*layout.PROJECT_PACKAGES, "sql"):
        shutil.copytree(layout.REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def edited(root: Path, relative: str):
    """A context that appends a comment to one file of the copy and restores it afterwards."""
    path = root / relative
    original = path.read_bytes()

    class Edit:
        def __enter__(self):
            path.write_bytes(original + b"\n# edited\n")

        def __exit__(self, *exc):
            path.write_bytes(original)

    return Edit()


@pytest.mark.parametrize(("relative", "invalidated", "untouched"), [
    # the sampler, reached by synthesize only through the generator's family
    ("models/raygen.py", {"flows.synthesize", "flows.train_generator", "flows.evaluate_generator"},
     {"flows.ingest", "flows.curate"}),
    ("tasks/demo/phantom.py", {"flows.ingest"}, {"flows.curate", "flows.synthesize", "flows.retrain"}),
    ("sql/synthesis_prompts.sql", {"flows.synthesize"}, {"flows.ingest", "flows.tokenize"}),
    ("tasks/evaluation/classifier.py", {"flows.retrain", "flows.evaluate_generator"}, {"flows.synthesize"}),
])
def test_a_stage_code_fingerprint_follows_what_its_module_imports(project_copy, relative, invalidated, untouched):
    entries = invalidated | untouched
    before = {entry: stages.code_fingerprint(entry, project_copy) for entry in entries}
    with edited(project_copy, relative):
        after = {entry: stages.code_fingerprint(entry, project_copy) for entry in entries}
    assert {entry for entry in entries if after[entry] != before[entry]} == invalidated


def test_lazy_and_relative_imports_are_followed(tmp_path):
    (tmp_path / "flows").mkdir()
    (tmp_path / "tasks" / "inner").mkdir(parents=True)
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "q.sql").write_text("SELECT 1")
    (tmp_path / "flows" / "__init__.py").write_text("")
    (tmp_path / "flows" / "stage.py").write_text("def run():\n    from tasks.inner import helper\n")
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "inner" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "inner" / "helper.py").write_text("from . import leaf\nQUERY = 'q'\n")
    (tmp_path / "tasks" / "inner" / "leaf.py").write_text("import numpy\n")
    modules, sql = stages.project_code("flows.stage", tmp_path)
    assert set(modules) == {"flows", "flows.stage", "tasks", "tasks.inner", "tasks.inner.helper", "tasks.inner.leaf"}
    assert [path.name for path in sql] == ["q.sql"]


def test_the_flow_keeps_a_recent_stage_when_only_its_data_changed(config_path, prefect_harness):
    runs = []

    def subflow(settings):
        runs.append(len(runs) + 1)
        return {"vqgan_id": "v1", "run": runs[-1]}

    subflow.__module__ = "flows.curate"  # whose code the fingerprint follows

    def make(overrides=()):
        config = load_config(config_path, list(overrides))
        return stages.Stage("train_generator", subflow, {"settings": config.curate},
                            files=((config.run.data_root / "tables" / "images", "*.parquet"),))

    @flow
    def stage(keep_for: timedelta | None, refusal: str | None = None, overrides: tuple = ()):
        return run_stage(make(overrides), config_path.parent / "data", keep_for, lambda summary: refusal)

    week = timedelta(days=7)
    images = config_path.parent / "data" / "tables" / "images"
    assert stage(week) == {"vqgan_id": "v1", "run": 1}
    assert stage(week)["run"] == 1  # nothing changed: skipped
    (images / "b.parquet").write_bytes(b"new studies")
    assert stage(week)["run"] == 1  # only the data changed, and the run is recent: kept
    assert stage(None)["run"] == 2  # without keep_for new data reruns the stage
    (images / "c.parquet").write_bytes(b"more studies")
    assert stage(week, "the tokens are another VQ-GAN's")["run"] == 3  # it would be kept, but is refused
    assert stage(week, overrides=("curate.uncertainty=ones",))["run"] == 4  # a config change always reruns it


def test_a_skipped_stage_shows_in_the_run_graph_as_cached(config_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    def subflow(settings):
        return {"done": True}

    subflow.__module__ = "flows.curate"
    config = load_config(config_path)
    made = stages.Stage("curate", subflow, {"settings": config.curate})

    @flow
    def night():
        return run_stage(made, config.run.data_root)

    assert night() == {"done": True}  # runs: nothing recorded yet
    state = night(return_state=True)
    assert state.result() == {"done": True}

    async def children():
        async with get_client() as client:
            parent = (await client.read_flow_run(state.state_details.flow_run_id))
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))

    (child,) = asyncio.run(children())
    assert child.name == "curate (unchanged)" and child.state.name == "Cached" and child.state.is_completed()
    assert stages.fingerprint(made) in child.state.message and "unchanged" in child.state.message


def test_a_second_run_on_the_data_root_waits_for_the_first(tmp_path):
    holding, release = threading.Event(), threading.Event()

    def first_run():
        with stages.exclusive_data_root(tmp_path, on_wait=pytest.fail):
            holding.set()
            release.wait(10)

    first = threading.Thread(target=first_run)
    first.start()
    holding.wait(10)
    waits = []
    second = threading.Thread(target=lambda: stages.exclusive_data_root(tmp_path, waits.append).__enter__())
    second.start()
    second.join(0.5)
    assert second.is_alive() and waits == [f"another run is working on {tmp_path}; waiting until it finishes"]
    release.set()
    first.join(10)
    second.join(10)
    assert not second.is_alive()  # it got the lock once the first let go


def test_a_killed_holder_leaves_the_data_root_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tasks import stages\n"
                               f"with stages.exclusive_data_root({str(tmp_path)!r}, print):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(10)
    with stages.exclusive_data_root(tmp_path, on_wait=pytest.fail):
        pass


def test_sampling_settings_change_synthesis_and_evaluation_never_the_generator(config_path):
    from flows import evaluate_generator, synthesize, train_generator
    from tasks.generators.raygen.generator import generator_run_id, output_id

    def stage_fingerprints(overrides=()):
        config = load_config(config_path, list(overrides))
        synthesized = {"generator_id": "raygen-x", "output_id": "raygen-x-1"}
        built = [synthesize.stage(config, "raygen", "raygen-x"),
                 evaluate_generator.stage(config, "raygen", synthesized, None)]
        ids = (generator_run_id(config.raygen, config.text.max_tokens, "v", "e", ["d1", "d2"], np.zeros((2, 0))),
               output_id("raygen-x", asdict(config.raygen.sampling.params())))
        return [stages.fingerprint(stage) for stage in built], ids

    (synth, evaluate), (generator, output) = stage_fingerprints()
    (synth_2, evaluate_2), (generator_2, output_2) = stage_fingerprints(["raygen.sampling.guidance_scale=3.0"])
    assert generator_2 == generator  # the weights do not depend on how they are sampled
    assert synth_2 != synth and evaluate_2 != evaluate and output_2 != output  # new settings, new images
    _, (generator_3, _) = stage_fingerprints(["raygen.d_model=128"])
    assert generator_3 != generator
    _, (generator_4, _) = stage_fingerprints(["raygen.eval_every=7", "raygen.checkpoint_every=3"])
    assert generator_4 == generator  # bookkeeping is not part of the weights either
    config = load_config(config_path)
    assert "sampling" not in train_generator.stage(config, "raygen", None).arguments["settings"].weights_identity()


def test_the_sampler_defaults_are_declared_once():
    from models.sampling import PAPER_SAMPLING
    from tasks.config import RayGenSampling

    assert RayGenSampling().params() == PAPER_SAMPLING
