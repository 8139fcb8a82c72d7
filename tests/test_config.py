"""params.yaml -> typed config: profiles, overrides, and errors that name the key path."""

from pathlib import Path

import pytest
import yaml

from lmforge.config import ConfigError, Params
from lmforge.params_file import load_params, read_params_file, resolve_params, write_overrides

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_with_every_profile():
    raw = read_params_file(REPO / "params.yaml")
    demo = resolve_params(raw)
    gpu = resolve_params(raw, profile="gpu")
    assert demo.profile == "demo" and gpu.profile == "gpu"
    assert demo.preprocess.vocab_size == 8192
    assert gpu.preprocess.vocab_size == 32768
    assert demo.storage.dvc_remote_url == "s3://lmforge/dvc"


def test_override_parses_yaml_values():
    params = resolve_params(
        {}, ["preprocess.vocab_size=4096", "storage.endpoint_url=null", "storage.embedded=false"]
    )
    assert params.preprocess.vocab_size == 4096
    assert params.storage.endpoint_url is None and params.storage.embedded is False


def test_profile_override_via_param():
    raw = {"profiles": {"big": {"preprocess": {"vocab_size": 50000}}}}
    assert resolve_params(raw, ["profile=big"]).preprocess.vocab_size == 50000


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["preprocess.vocab_size=10"], "preprocess.vocab_size: Input should be greater than or equal to 300"),
        (
            ["preprocess.vocab_sise=9000"],
            "preprocess.vocab_sise: Extra inputs are not permitted (unknown key)",
        ),
        (
            ["validation.max_duplicate_ratio=lots"],
            "validation.max_duplicate_ratio: Input should be a valid number",
        ),
        (
            ["validation.min_doc_chars=10", "validation.max_doc_chars=5"],
            "min_doc_chars (10) exceeds max_doc_chars (5)",
        ),
        (
            ["validation.secret_patterns={bad: '(['}"],
            "validation.secret_patterns: Value error, bad: not a valid regex",
        ),
        (["storage.bucket=A_B"], "storage.bucket: String should match pattern"),
        (["storage.endpoint_url=null"], "embedded: true needs an endpoint_url"),
        (["preprocess.vocab_size.deep=1"], "preprocess.vocab_size: Input should be a valid integer"),
        (["novalue"], "must look like section.key=value"),
        (["profile=nope"], "unknown profile 'nope'"),
        (["serve.engine=tgi"], "serve.engine: Input should be 'auto', 'builtin' or 'vllm'"),
        (["serve.vllm.gpu_memory_utilization=1.5"], "serve.vllm.gpu_memory_utilization: Input should be less than"),
        (["serve.vllm.max_lora_rank=12"], "serve.vllm.max_lora_rank: Input should be 1, 8, 16"),
        (["serve.vllm.tensor_parallel=2"], "serve.vllm.tensor_parallel: Extra inputs are not permitted"),
    ],
)
def test_bad_config_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        resolve_params({"profiles": {"demo": {}}}, overrides)
    assert expected in str(err.value)


def test_bad_yaml_file_is_a_config_error(tmp_path):
    (tmp_path / "params.yaml").write_text("preprocess: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path)


def test_write_overrides_keeps_comments_and_validates_first(tmp_path):
    text = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text)
    changes = write_overrides(tmp_path, ["preprocess.vocab_size=4096"], profile="gpu")
    assert changes == ["preprocess.vocab_size: 8192 -> 4096", "profile: 'demo' -> 'gpu'"]
    written = (tmp_path / "params.yaml").read_text()
    assert "# Every knob of lmforge" in written and "vocab_size: 4096" in written
    # gpu's overlay wins over the base value, as profiles should
    assert load_params(tmp_path).preprocess.vocab_size == 32768
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="preprocess.vocab_size"):
        write_overrides(tmp_path, ["preprocess.vocab_size=-1"])
    assert (tmp_path / "params.yaml").read_text() == before


def test_params_yaml_holds_exactly_the_config_defaults():
    """The defaults live in lmforge/config.py; params.yaml spells every one of them out (DVC reads it), and
    the two never disagree: the demo profile of params.yaml is the config with nothing overridden."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    written = {key: value for key, value in raw.items() if key != "profiles"}
    assert written == Params().model_dump()
    assert raw["profiles"]["demo"] == {}


def test_vllm_settings_become_vllms_own_flags():
    from lmforge.serving.settings import VllmSettings

    flags = VllmSettings(dtype="float32", max_model_len=128, enforce_eager=True, enable_prefix_caching=False,
                         enable_lora=True, max_lora_rank=8).flags()  # fmt: skip
    assert flags == ["--dtype", "float32", "--max-num-seqs", "256", "--gpu-memory-utilization", "0.9",
                     "--tensor-parallel-size", "1", "--max-model-len", "128", "--no-enable-prefix-caching",
                     "--enforce-eager", "--enable-lora", "--max-lora-rank", "8"]  # fmt: skip
