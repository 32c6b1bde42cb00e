from pathlib import Path

import pytest

from tasks.config import ConfigError, DemoSource, load_config, LocalSource
from tasks.data.sources import source_root

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo", "demo-compare", "smoke", "mimic", "mimic-jpg"])
def test_shipped_configs_are_valid(name, monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_DATA_ROOT", str(tmp_path))
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.run.name == name
    if name in ("mimic", "mimic-jpg"):
        assert config.run.data_root == tmp_path / name
        assert config.source.kind == "physionet"
    # The app rebuilds sections from their JSON (app/common.py): every config survives the round trip.
    assert type(config).model_validate_json(config.model_dump_json()) == config


def test_path_fields_survive_the_json_round_trip(tmp_path):
    from tasks.config import DiffusionSection, GeneratorEvalSection

    (tmp_path / "model.pt").write_bytes(b"")
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text("{}")
    for section in (DiffusionSection(conditioning="image", image_encoder=tmp_path),
                    GeneratorEvalSection(rad_dino=tmp_path, inception_weights=tmp_path / "model.pt")):
        assert type(section).model_validate_json(section.model_dump_json()) == section
    assert DiffusionSection(conditioning="image", image_encoder=str(tmp_path)).image_encoder == tmp_path


def test_demo_is_the_embedded_default():
    config = load_config(CONFIGS / "demo.yaml")
    assert isinstance(config.source, DemoSource)
    assert source_root(config.run.data_root, config.source) == config.run.data_root / "source" / "demo"


def test_demo_compare_is_the_demo_with_every_family():
    from tasks.generators.families import FAMILIES

    demo, compare = (load_config(CONFIGS / f"{name}.yaml").model_dump() for name in ("demo", "demo-compare"))
    assert compare["generators"] == list(FAMILIES) and demo["generators"] == ["raygen"]
    assert compare["run"]["data_root"] != demo["run"]["data_root"]  # its stages and MLflow store apart
    differing = {key for key in demo if demo[key] != compare[key]}
    assert differing == {"run", "generators", "diffusion", "gan"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = """
run: {name: t, data_root: %s}
source: {kind: demo, studies: 10}
ingest: {resolution: 64}
"""


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, BASE % tmp_path + "curate: {uncertainty: zeros, colour: blue}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "curate.colour" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path, BASE.replace("resolution: 64", "resolution: big") % tmp_path)
    with pytest.raises(ConfigError, match=r"ingest\.resolution"):
        load_config(path)


def test_wrong_choice_names_the_key(tmp_path):
    path = write(tmp_path, BASE % tmp_path + "curate: {uncertainty: maybe}\n")
    with pytest.raises(ConfigError, match=r"curate\.uncertainty"):
        load_config(path)


def test_missing_local_root_is_an_error(tmp_path):
    path = write(tmp_path, BASE.replace("{kind: demo, studies: 10}", "{kind: local, root: %s/nowhere}" % tmp_path)
                 % tmp_path)
    with pytest.raises(ConfigError, match=r"source.root.*nowhere.*does not exist"):
        load_config(path)


def test_local_source_with_existing_root(tmp_path):
    (tmp_path / "mirror").mkdir()
    path = write(tmp_path, BASE.replace("{kind: demo, studies: 10}", "{kind: local, root: %s/mirror}" % tmp_path)
                 % tmp_path)
    assert isinstance(load_config(path).source, LocalSource)


def test_unset_environment_variable_in_a_path(tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"run\.data_root.*CXR_DATA_ROOT.*not set"):
        load_config(CONFIGS / "mimic.yaml")


def test_overrides_apply_and_validate(tmp_path):
    path = write(tmp_path, BASE % tmp_path)
    config = load_config(path, ["ingest.resolution=128", "curate.uncertainty=ignore"])
    assert config.ingest.resolution == 128 and config.curate.uncertainty == "ignore"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["ingest.resolution"])
    with pytest.raises(ConfigError, match=r"ingest\.resolution"):
        load_config(path, ["ingest.resolution=-3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run: [unclosed"))


def test_missing_local_text_encoder_directory(tmp_path):
    path = write(tmp_path, BASE % tmp_path + "text: {encoder: ./no/such/encoder}\n")
    with pytest.raises(ConfigError, match=r"text.encoder"):
        load_config(path)


def test_section_fingerprint_changes_only_with_its_section(tmp_path):
    path = write(tmp_path, BASE % tmp_path)
    a = load_config(path)
    b = load_config(path, ["curate.uncertainty=ones"])
    assert a.section_fingerprint("ingest") == b.section_fingerprint("ingest")
    assert a.section_fingerprint("curate") != b.section_fingerprint("curate")


def test_arms_are_checked_against_the_synthesis_ratios_and_the_reference_comes_first(tmp_path):
    demo = load_config("configs/demo.yaml")
    low = demo.retrain.arms[1]
    assert (low.real_share, demo.retrain.arm_classifier(low).steps) == (0.1, demo.retrain.classifier.steps)
    assert demo.retrain.arm_classifier(demo.retrain.arms[0]) == demo.retrain.classifier
    assert demo.retrain.arm_classifier(low.model_copy(update={"steps": 32})).steps == 32
    with pytest.raises(ConfigError, match="not all among synthesis.ratios"):
        load_config("configs/demo.yaml", ["retrain.arms=[{name: full-data}, {name: low, real_share: 0.1, ratios: [0.0, 0.3]}]"])
    with pytest.raises(ConfigError, match="the first arm .* is the reference"):
        load_config("configs/demo.yaml", ["retrain.arms=[{name: low, real_share: 0.1}]"])
    with pytest.raises(ConfigError, match="must be distinct"):
        load_config("configs/demo.yaml", ["retrain.arms=[{name: a}, {name: a, real_share: 0.5}]"])


def test_pretraining_and_the_quality_gate_are_arm_switches_checked_at_load(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_DATA_ROOT", str(tmp_path))
    retrain = load_config(CONFIGS / "mimic.yaml").retrain
    arms = {arm.name: arm for arm in retrain.arms}
    assert (arms["pretrain-finetune"].schedule, retrain.pretrain_steps(arms["pretrain-finetune"])) == (
        "pretrain_finetune", retrain.classifier.steps // 2)
    assert arms["quality-gated"].quality_gate and arms["quality-gated"].schedule == "mixed"
    assert retrain.pretrain_steps(arms["full-data"]) == 0 and not arms["full-data"].quality_gate
    demo = load_config("configs/demo.yaml").retrain
    assert [(arm.schedule, demo.pretrain_steps(arm), arm.quality_gate) for arm in demo.arms] == [
        ("pretrain_finetune", 16, False), ("mixed", 0, False)]

    def arms_override(*arms: str) -> list[str]:
        return [f"retrain.arms=[{{name: full-data}}, {', '.join(arms)}]"]

    for arm, problem in (("{name: p, schedule: pretrain_finetune}", "give it with that schedule"),
                         ("{name: p, pretrain_share: 0.5}", "give it with that schedule"),
                         ("{name: p, schedule: pretrain_finetune, pretrain_share: 1.0}", "less than 1"),
                         ("{name: p, schedule: pretrain_finetune, pretrain_share: 0.99, steps: 20}",
                          "leaves 20 pretraining and 0 fine-tuning steps"),
                         ("{name: p, schedule: pretrain_finetune, pretrain_share: 0.5, ratios: [0.0]}",
                          "needs a ratio above 0"),
                         ("{name: g, quality_gate: true, ratios: [0.0]}", "with quality_gate needs a ratio above 0")):
        with pytest.raises(ConfigError, match=problem):
            load_config("configs/demo.yaml", arms_override(arm))
    with pytest.raises(ConfigError, match="the first arm .* is the reference: without quality_gate"):
        load_config("configs/demo.yaml", ["retrain.arms=[{name: a, quality_gate: true}]"])
    # A pretrained reference is allowed: its ratio-0 runs, the judge among them, see real images alone.
    pretrained = load_config("configs/demo.yaml", [
        "retrain.arms=[{name: a, schedule: pretrain_finetune, pretrain_share: 0.5}]"]).retrain
    assert pretrained.pretrain_steps(pretrained.arms[0]) == 32
    low = load_config("configs/demo.yaml", arms_override(
        "{name: p, schedule: pretrain_finetune, pretrain_share: 0.25, steps: 10}")).retrain
    assert low.pretrain_steps(low.arms[1]) == 2  # round(0.25 x 10): of the arm's own budget


def test_a_sweep_point_must_be_a_sampler_setting():
    config = load_config("configs/demo.yaml", ["generator_eval.sweep=[{guidance_scale: 3.0, steps: 4}]"])
    point = config.raygen.sampling.updated(config.generator_eval.sweep[0])
    assert (point.guidance_scale, point.steps, point.temperature) == (3.0, 4, config.raygen.sampling.temperature)
    with pytest.raises(ConfigError, match=r"sweep\[0\]: guidance: unknown key"):
        load_config("configs/demo.yaml", ["generator_eval.sweep=[{guidance: 3.0}]"])
    with pytest.raises(ConfigError, match=r"sweep\[1\]: schedule"):
        load_config("configs/demo.yaml", ["generator_eval.sweep=[{steps: 4}, {schedule: square}]"])
