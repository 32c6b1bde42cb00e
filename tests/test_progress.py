"""tasks/progress.py: a tqdm bar on a terminal; sparse log lines and Prefect progress artifacts without one."""

import io
import logging

import pytest
from tqdm import tqdm

from tasks import progress
from tasks.progress import ProgressBar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == progress.log.name]


def test_without_a_tty_1000_updates_give_a_line_every_n_percent_and_no_bar(caplog, capsys):
    caplog.set_level(logging.INFO, logger=progress.log.name)
    with ProgressBar(total=1000, desc="raygen", unit="step", description="raygen training") as bar:
        for step in range(1000):
            bar.update()
            bar.set_postfix(loss=f"{1 / (step + 1):.3f}", lr=1e-4)
    lines = progress_lines(caplog)
    assert len(lines) <= 100 // progress.LOG_EVERY_PERCENT + 1
    assert lines[0].startswith("raygen training: 0% (0/1000 step)")
    assert lines[-1].startswith("raygen training: 100% (1000/1000 step) loss=0.001, lr=0.0001")
    assert capsys.readouterr().err == ""  # no tqdm output


def test_without_a_tty_a_resumed_or_stopped_bar_says_where_it_is(caplog):
    caplog.set_level(logging.INFO, logger=progress.log.name)
    bar = ProgressBar(total=100, initial=40, desc="vqgan", unit="step")
    bar.update(5)
    bar.close()
    bar.close()
    assert [line.split(" [")[0] for line in progress_lines(caplog)] == [
        "vqgan: 40% (40/100 step)", "vqgan: 45% (45/100 step)"]


def test_without_a_tty_disabled_transient_and_empty_bars_are_silent_and_iteration_yields_everything(caplog, capsys):
    caplog.set_level(logging.INFO, logger=progress.log.name)
    assert list(ProgressBar(range(7), desc="epoch 1/2", leave=False)) == list(range(7))
    assert list(ProgressBar(range(7), desc="off", disable=True)) == list(range(7))
    with ProgressBar(total=0, desc="tokens") as bar:
        bar.set_postfix(loss=1.0)
    assert progress_lines(caplog) == []
    assert capsys.readouterr().err == ""


def test_without_a_tty_a_bar_without_total_logs_at_close(caplog):
    caplog.set_level(logging.INFO, logger=progress.log.name)
    with ProgressBar(desc="mimic-cxr 2.0.0", unit="B", unit_scale=True) as bar:
        bar.update(3 * 1024 * 1024)
        bar.set_postfix(files=2, refresh=False)
    lines = progress_lines(caplog)
    assert len(lines) == 2 and lines[-1].startswith("mimic-cxr 2.0.0: 3.15M B files=2")


def test_on_a_terminal_it_is_a_tqdm_bar(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=progress.log.name)
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with ProgressBar(total=10, desc="synthesize g", unit="image") as bar:
        assert isinstance(bar._tqdm, tqdm)
        for _ in range(10):
            bar.update()
            bar.set_postfix(loss="0.5")
    assert "synthesize g: 100%" in terminal.getvalue() and "10/10" in terminal.getvalue()
    assert "loss=0.5" in terminal.getvalue()
    assert progress_lines(caplog) == []


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_inside_a_flow_and_a_task_run_progress_artifacts_end_at_100(prefect_harness):
    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
    from prefect.runtime import flow_run

    def count(desc: str, total: int) -> None:
        with ProgressBar(total=total, desc=desc, unit="step", description=f"{desc} steps") as bar:
            for _ in range(total):
                bar.update()

    @flow
    def counting() -> str:
        count("flow", 1000)
        task(count)("task", 37)
        return flow_run.id

    collect = Collect()  # Prefect's run loggers do not propagate to the root logger caplog listens on
    run_loggers = [logging.getLogger("prefect.flow_runs"), logging.getLogger("prefect.task_runs")]
    for logger in run_loggers:
        logger.addHandler(collect)
    try:
        flow_run_id = counting()
    finally:
        for logger in run_loggers:
            logger.removeHandler(collect)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    assert sorted((artifact.description, artifact.data) for artifact in artifacts) == [
        ("flow steps: 1000/1000 step", pytest.approx(100.0)), ("task steps: 37/37 step", pytest.approx(100.0))]
    # The lines go to the run loggers (so into the flow-run log), as sparsely as outside a run.
    for logger, prefix in [("prefect.flow_runs", "flow steps: "), ("prefect.task_runs", "task steps: ")]:
        lines = [r.getMessage() for r in collect.records if r.name == logger and r.getMessage().startswith(prefix)]
        assert 2 <= len(lines) <= 100 // progress.LOG_EVERY_PERCENT + 1
        assert lines[-1].startswith(prefix + "100%")
