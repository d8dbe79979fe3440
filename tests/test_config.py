"""params.yaml through femb.config: defaults from one place, overrides, `-S` parsing, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from femb.config import ModelParams, OptimParams, as_section, load_params, parse_params, set_dotted
from femb.errors import FembError
from femb.headers import header_defaults, list_headers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run in an empty directory, so that messages name `params.yaml` as the stages see it."""
    monkeypatch.chdir(tmp_path)


def write_params(tmp_path: Path, data: dict) -> Path:
    path = Path("params.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict) -> str:
    with pytest.raises(FembError) as info:
        load_params(write_params(tmp_path, data))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_params_file_gives_the_demo_defaults(tmp_path):
    params = load_params(tmp_path / "absent.yaml")
    assert (params.header, params.backbone, params.embedding_size) == ("arcface", "iresnet_tiny", 512)
    assert params.data.source == Path("data/demo") and params.data.shards == Path("data/shards")
    assert (params.train.max_epochs, params.train.batch_size, params.train.lr) == (4, 128, 0.1)
    assert params.evaluate.sets == []
    assert params.export.output == Path("models/model.onnx") and params.export.opset == 18
    assert params.header_hparams() == header_defaults("arcface")


def test_params_file_overrides_only_the_keys_it_sets(tmp_path):
    params = load_params(
        write_params(tmp_path, {"train": {"lr": 0.05}, "data": {"synth": {"identities": 50}}})
    )
    assert params.train.lr == 0.05 and params.data.synth.identities == 50
    assert params.train.batch_size == 128 and params.data.synth.images_per_identity == 25


def test_head_hyperparameters_merge_paper_defaults_with_params(tmp_path):
    params = load_params(write_params(tmp_path, {"header": "magface", "headers": {"magface": {"l_m": 0.5}}}))
    assert params.header_hparams() == {**header_defaults("magface"), "l_m": 0.5}
    assert params.header_hparams("cosface") == header_defaults("cosface")


def test_wrong_head_name_names_the_key_and_lists_the_heads(tmp_path):
    message = error_of(tmp_path, {"header": "magfce"})
    assert message.startswith("params.yaml: header: 'magfce' is not a head; choose one of ")
    assert all(name in message for name in list_headers())


def test_hyperparameters_of_an_unknown_head_are_refused(tmp_path):
    message = error_of(tmp_path, {"headers": {"arcfce": {"m": 0.5}}})
    assert message.startswith("params.yaml: headers.arcfce: not a head; choose one of ")
    assert "arcface" in message


def test_unknown_key_names_the_key_and_what_its_section_takes(tmp_path):
    message = error_of(tmp_path, {"train": {"lrr": 0.1}})
    assert message.startswith("params.yaml: train.lrr: unknown key; train takes ")
    assert "lr, " in message and "max_epochs" in message
    top = error_of(tmp_path, {"evaluat": {"sets": []}})
    assert top.startswith("params.yaml: evaluat: unknown key; the top level takes ") and "evaluate" in top
    nested = error_of(tmp_path, {"data": {"synth": {"people": 3}}})
    assert nested.startswith("params.yaml: data.synth.people: unknown key; data.synth takes identities")


def test_out_of_range_value_names_the_key_and_the_bound(tmp_path):
    assert error_of(tmp_path, {"train": {"lr": -1}}) == (
        "params.yaml: train.lr: Input should be greater than 0 (got -1)"
    )
    assert error_of(tmp_path, {"data": {"synth": {"identities": 1}}}) == (
        "params.yaml: data.synth.identities: Input should be greater than or equal to 2 (got 1)"
    )
    message = error_of(tmp_path, {"train": {"precision": "fp8"}})
    assert message.startswith("params.yaml: train.precision: 'fp8' is not a precision; choose one of 32-true")


def test_bad_head_hyperparameter_names_the_head_and_the_range(tmp_path):
    message = error_of(tmp_path, {"headers": {"arcface": {"m": 5}}})
    assert message.startswith("params.yaml: headers.arcface: ") and "m=5" in message
    unknown = error_of(tmp_path, {"headers": {"magface": {"margin": 0.5}}})
    assert unknown.startswith("params.yaml: headers.magface: ") and "margin" in unknown and "l_m" in unknown


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = Path("params.yaml")
    path.write_text("train:\n  lr: [0.1\n")
    with pytest.raises(FembError, match=r"params.yaml: not valid YAML at line \d+"):
        load_params(path)


def test_set_overrides_parse_values_as_yaml_like_dvc_exp_run(tmp_path):
    params = load_params(
        write_params(tmp_path, {"train": {"lr": 0.1}}),
        [
            "header=cosface",
            "headers.magface.l_m=0.5",
            "train.lr=0.05",
            "train.milestones=[2, 3]",
            "train.partial_fc.enabled=true",
            "train.devices=2",
            "data.source=/data/faces_emore",
        ],
    )
    assert params.header == "cosface" and params.header_hparams("magface")["l_m"] == 0.5
    assert params.train.lr == 0.05 and params.train.milestones == [2, 3]
    assert params.train.partial_fc.enabled is True and params.train.devices == 2
    assert params.data.source == Path("/data/faces_emore")


def test_set_override_errors_name_the_assignment():
    with pytest.raises(FembError, match=r"--set 'train.lr': expected KEY=VALUE"):
        set_dotted({}, "train.lr")
    with pytest.raises(FembError, match=r"'header' is not a section"):
        set_dotted({"header": "arcface"}, "header.m=0.5")


def test_overridden_value_is_validated_like_the_file(tmp_path):
    with pytest.raises(FembError, match=r"^params.yaml: header: 'nope' is not a head"):
        load_params(write_params(tmp_path, {}), ["header=nope"])


def test_committed_params_yaml_is_valid_and_lists_every_head_hyperparameter():
    """`dvc exp run -S headers.<head>.<name>=...` needs the key in params.yaml, for every head."""
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in list_headers():
        assert set(raw["headers"][name]) == set(header_defaults(name)), name
        assert params.header_hparams(name).keys() == header_defaults(name).keys()


def test_parse_params_of_an_empty_mapping_is_the_defaults():
    assert parse_params({}) == parse_params(None) == load_params(Path("/nonexistent/params.yaml"))


def leaves(data: dict, prefix: str = "") -> dict[str, object]:
    """Every leaf of a nested mapping by its dotted key: {'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Keys whose committed value deliberately differs from femb/config.py's default (none today).
OVERRIDES: dict[str, object] = {}


def test_committed_params_yaml_repeats_the_config_defaults_exactly():
    """params.yaml lists the knobs dvc tracks; a value there that is not the code's default would drift."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = leaves(parse_params({}).model_dump(mode="json"))
    defaults.update(leaves({"headers": {name: header_defaults(name) for name in list_headers()}}))
    for key, value in leaves(raw).items():
        assert key in defaults, f"params.yaml: {key} is not a key of femb/config.py"
        expected = OVERRIDES.get(key, defaults[key])
        assert value == expected, f"params.yaml: {key} is {value!r}, femb/config.py's default is {expected!r}"


def test_model_section_gathers_backbone_head_and_backbone_options(tmp_path):
    params = load_params(
        write_params(tmp_path, {"header": "magface", "train": {"dropout": 0.1, "channels_last": True}})
    )
    model = params.model_section()
    assert (model.backbone, model.embedding_size, model.head) == ("iresnet_tiny", 512, "magface")
    assert model.head_hparams == header_defaults("magface") and model.dropout == 0.1 and model.channels_last
    assert model.backbone_kwargs() == {"dropout": 0.1}


def test_sections_validate_mappings_and_narrow_wider_sections():
    params = parse_params({"train": {"lr": 0.05, "batch_size": 7}})
    optim = as_section(OptimParams, params.train)
    assert type(optim) is OptimParams and optim.lr == 0.05 and "batch_size" not in optim.model_dump()
    assert as_section(OptimParams, {"lr": 0.2}).lr == 0.2
    with pytest.raises(ValidationError, match="head_hparams: m=5 is outside"):
        ModelParams(backbone="r18", embedding_size=8, head="arcface", head_hparams={"m": 5})
