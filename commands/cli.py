"""`augment`: the command-line entry point (`augment run --config configs/demo.yaml`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The machines this runs on may have no route to Hugging Face or telemetry endpoints; say so before imports.
for _name, _value in {
    "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false",
    # Without PREFECT_API_URL a run starts a temporary Prefect server; give it time on a loaded 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_name, _value)

from tasks.config import ConfigError, load_config  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="augment", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the augment flow on a config"), ("check-config", "validate a config"),
                            ("app", "start the web app (Streamlit) on 127.0.0.1 over a config's run"),
                            ("export", "export a synthetic set as DICOM or in the MIMIC-CXR-JPG layout"),
                            ("replicates", "pool the downstream differences of finished runs of a config on several "
                                           "data roots")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", default="configs/demo.yaml", help="YAML run config")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override a config value (repeatable)")
        if name == "run":
            command.add_argument("--stop-after", default=None, metavar="STAGE",
                                 help="run the stages up to and including this one (default: all)")
        if name == "app":
            command.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")
        if name == "export":
            command.add_argument("--output-id", required=True, help="the synthetic set: a generator's output_id")
            command.add_argument("--format", dest="export_format", required=True, help="dicom or mimic-cxr-jpg")
            command.add_argument("--dest", default=None, help="folder to write (default: <data_root>/exports/...)")
        if name == "replicates":
            command.add_argument("data_roots", nargs="+", type=Path, metavar="DATA_ROOT",
                                 help="data roots where the config ran to the end (other source.seed, other splits)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: valid")
        return 0
    if args.command == "app":
        return start_app(args.config, args.overrides, args.port)
    if args.command == "export":
        from tasks.export import export_set

        try:
            written = export_set(config.run.data_root, args.output_id, args.export_format, args.dest)
        except (KeyError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"Wrote {written}")
        return 0
    if args.command == "replicates":
        from tasks.evaluation.replicates import pooled_markdown, replicate_scores

        for family in config.generators:
            try:
                scores = {str(root): replicate_scores(config, root, family) for root in args.data_roots}
            except (FileNotFoundError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(f"Test AUROC differences to ratio 0 [95% CI], {family}, pooled over replicates:\n\n"
                  + pooled_markdown(config, scores) + "\n")
        return 0

    # Imported late: Prefect's import is slow and check-config needs none of it.
    from flows.full import augment
    from tasks.data.curate import CohortSummary
    from tasks.tracking import experiment_name, tracking_uri

    result = augment(config_path=str(args.config), overrides=args.overrides,
                     **({"stop_after": args.stop_after} if args.stop_after else {}))
    data_root = config.run.data_root.resolve()
    print("\nIngest:", ", ".join(f"{key}={value}" for key, value in result["ingest"].items()))
    if "curate" in result:
        print("\nCohorts:\n" + CohortSummary(**result["curate"]).to_markdown())
    for evaluated in result.get("evaluate_generator", {}).values():
        print(f"\nGenerator {evaluated['output_id']} on held-out studies:\n" + evaluated["markdown"])
    for retrained in result.get("retrain", {}).values():
        print(f"\nTest AUROC per pathology [95% CI] by share of synthetic training data ({retrained['output_id']}):"
              "\n" + retrained["comparison_markdown"])
    print(f"\nResults under {data_root}:")
    print(f"  tables (Parquet), pixel shards, cohorts, models: {data_root}/{{tables,pixels,cohorts,models}}")
    print(f"  catalog (DuckDB views):  {data_root / 'catalog.duckdb'}")
    print(f"  MLflow runs:             {tracking_uri(config)}  (experiment {experiment_name(config)})")
    print(f"  open the MLflow UI:      .venv/bin/mlflow ui --backend-store-uri {tracking_uri(config)} "
          "--host 127.0.0.1 --port 5000   then http://127.0.0.1:5000")
    return 0


def start_app(config: str, overrides: list[str], port: int) -> int:
    """Replace this process with Streamlit serving app/main.py on 127.0.0.1:<port> (so its PID is the server's);
    the app reads the config and overrides from its own command line."""
    from tasks.layout import APP_SCRIPT, REPO_ROOT

    print(f"The app: http://127.0.0.1:{port}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT), "--server.address", "127.0.0.1",
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal",
            "--", "--config", str(os.path.abspath(config)), *(item for value in overrides for item in ("--set", value))]
    os.execve(sys.executable, argv, env)
    return 0  # not reached: execve does not return


if __name__ == "__main__":
    sys.exit(main())
