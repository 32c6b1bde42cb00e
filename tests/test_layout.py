"""The layout by concern holds: imports run flows -> tasks -> models (the CLI, the service supervisor and the app on top),
without cycles between packages, and only tasks/layout.py builds the paths of a data root."""

import ast
import re
from pathlib import Path

import pytest

from tasks import layout, stages

# Which packages each may import; models are pure torch. The Streamlit app (app/) sits at the command line's level.
MAY_IMPORT = {"app": {"app", "commands", "flows", "tasks", "models"}, "commands": {"commands", "flows", "tasks", "models"},
              "flows": {"flows", "tasks", "models"}, "tasks": {"tasks", "models"}, "models": {"models"}}
# The folders of a data root (tasks/layout.py's docstring); a path built from one of these names by hand
# elsewhere would be a second place that knows the layout.
DATA_ROOT_NAMES = ("tables", "pixels", "cohorts", "text", "models", "synthetic", "stages", "mlflow", "source", "exports")


def project_files() -> list[Path]:
    return sorted(path for package in layout.PROJECT_PACKAGES for path in (layout.REPO_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", project_files(), ids=lambda path: str(path.relative_to(layout.REPO_ROOT)))
def test_imports_run_one_way(path):
    module = ".".join(path.relative_to(layout.REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
    tree = ast.parse(path.read_text())
    imported = {name.split(".")[0] for name in stages._imported_names(tree, module, path.name == "__init__.py")}
    wrong = (imported & set(layout.PROJECT_PACKAGES)) - MAY_IMPORT[module.split(".")[0]]
    assert not wrong, f"{module} imports {sorted(wrong)}"


def test_only_the_layout_module_builds_data_root_paths():
    # BIN / "mlflow" is the executable, not a folder of the data root.
    pattern = re.compile(r"""(?<!BIN )/\s*["'](%s)["']""" % "|".join(DATA_ROOT_NAMES))
    found = [f"{path.relative_to(layout.REPO_ROOT)}:{number}: {line.strip()}"
             for path in project_files() if path != layout.REPO_ROOT / "tasks" / "layout.py"
             for number, line in enumerate(path.read_text().splitlines(), start=1) if pattern.search(line)]
    assert not found, "\n".join(found)


def test_the_stage_modules_reach_what_they_run():
    synthesize, _ = stages.project_code("flows.synthesize")
    assert {"models.raygen", "tasks.generators.raygen.generator", "tasks.generators.synthesis"} <= set(synthesize)
    evaluate, _ = stages.project_code("flows.evaluate_generator")
    assert {"tasks.evaluation.classifier", "tasks.evaluation.fidelity", "models.fid_features"} <= set(evaluate)
