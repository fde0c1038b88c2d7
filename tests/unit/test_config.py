"""opt.config: defaults, YAML + dotted overrides, one-line field errors, path resolution, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from opt.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # load_config resolves relative paths against the working directory; pin it.
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_load_and_resolve_against_the_working_directory(tmp_path: Path) -> None:
    cfg = load_config()
    assert cfg.model.preset == "debug"
    assert cfg.train.max_steps == 40
    assert cfg.data.sources[0].name == "python-docs"
    assert cfg.storage.root == str(tmp_path / ".opt" / "store")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/.opt/mlflow.db"
    assert cfg.model_name == "opt-debug"
    assert cfg.access_class == "open"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_configs_are_valid(path: Path) -> None:
    assert isinstance(load_config(path), RunConfig)


def test_yaml_file_then_overrides_applied_in_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "run.yaml",
        "train:\n  max_steps: 100\n  lr: 3.0e-4\nmodel:\n  preset: OPT-125M\n  overrides:\n    dropout: 0.0\n",
    )
    cfg = load_config(
        path,
        [
            "train.max_steps=20",
            "train.betas=[0.9, 0.98]",  # a list
            "model.overrides.activation_checkpointing=true",  # nested, merged with the file's overrides
            "data.sources=[{name: a, uri: a.jsonl}, {name: b, kind: text, uri: s3://bkt/b}]",
            "registry.gate.max_perplexity=50",
            "train.run=first",
            "train.run=second",  # later overrides win
        ],
    )
    assert cfg.train.max_steps == 20
    assert cfg.train.lr == 3e-4  # untouched file value
    assert cfg.train.betas == (0.9, 0.98)
    assert cfg.model.preset == "125m"  # `OPT-125M` normalised
    assert cfg.model.overrides == {"dropout": 0.0, "activation_checkpointing": True}
    assert [(s.name, s.kind) for s in cfg.data.sources] == [("a", "pile"), ("b", "text")]
    assert cfg.registry.gate.max_perplexity == 50
    assert cfg.train.run == "second"
    built = cfg.model.build(vocab_size=2048, seq_len=64)
    assert (built.d_model, built.vocab_size, built.max_seq_len, built.dropout) == (768, 2048, 64, 0.0)
    assert built.activation_checkpointing


def _error(path: Path | None, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    message = str(exc.value)
    assert "\n" not in message, f"expected one line, got:\n{message}"
    return message


@pytest.mark.parametrize(
    ("overrides", "field", "detail"),
    [
        (["train.max_step=20"], "train.max_step", "Extra inputs are not permitted"),  # typo of max_steps
        (["trian.max_steps=20"], "trian", "Extra inputs are not permitted"),
        (["train.max_steps=-5"], "train.max_steps", "greater than or equal to 1"),
        (["train.max_steps=many"], "train.max_steps", "valid integer"),
        (["model.preset=gpt2"], "model.preset", "unknown preset 'gpt2'"),
        (["model.overrides.n_layer=0"], "model", "n_layer must be positive"),
        (["model.overrides.n_head=5"], "model", "divisible by n_head"),
        (["model.overrides.bogus=1"], "model", "bogus"),
        (["data.sources=[]"], "data.sources", "at least one source"),
        (["data.sources=[{name: a}]"], "data.sources.0.uri", "Field required"),
        (["data.sources=[{name: a, uri: x}, {name: a, uri: y}]"], "data.sources", "unique"),
        (["registry.access_class=secret"], "registry.access_class", "'open' or 'gated'"),
    ],
)
def test_invalid_values_name_the_field_in_one_line(overrides: list[str], field: str, detail: str) -> None:
    message = _error(None, overrides)
    assert f": {field}: " in message
    assert detail in message


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.yaml", "train:\n  max_steps: -1\n")
    assert _error(path, []).startswith(f"{path}: train.max_steps: ")


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("- just\n- a list\n", "expected a mapping of sections at the top level, got list"),
        ("plain string\n", "expected a mapping of sections at the top level, got str"),
        ("train:\n  max_steps: [1, 2\n", "not valid YAML"),
        ("train: {max_steps: 1\n", "not valid YAML"),
    ],
)
def test_unusable_files_raise_config_error_naming_the_file(tmp_path: Path, text: str, detail: str) -> None:
    path = _write(tmp_path / "bad.yaml", text)
    message = _error(path, [])
    assert message.startswith(str(path))
    assert detail in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert _error(path, []) == f"{path}: no such config file"


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path / "empty.yaml", "")) == load_config()


@pytest.mark.parametrize(
    "override",
    [
        "train.max_steps",  # no `=`
        "=20",
        "train..max_steps=20",
        "1train.max_steps=20",
        "train.max-steps=20",
        "train.run=[unclosed",  # the value is not valid YAML
        "train.run=a: b: c",
    ],
)
def test_malformed_overrides(override: str) -> None:
    message = _error(None, [override])
    assert message.startswith(f"override {override!r}: ")


def test_override_below_a_scalar_is_rejected() -> None:
    assert "train is not a section" in _error(None, ["train=5", "train.max_steps=3"])


def test_resolved_makes_relative_local_paths_absolute(tmp_path: Path) -> None:
    base = tmp_path / "project"
    cfg = RunConfig.model_validate(
        {
            "storage": {"root": "store"},
            "tracking": {"uri": "sqlite:///db/mlflow.db", "artifact_root": "artifacts"},
            "access": {"db_url": "sqlite:///access.db"},
            "data": {"sources": [{"name": "a", "uri": "data/a.jsonl"}, {"name": "b", "uri": "../b.jsonl"}]},
        }
    ).resolved(base)
    assert cfg.storage.root == str(base / "store")
    assert cfg.tracking.uri == f"sqlite:///{base}/db/mlflow.db"
    assert cfg.tracking.artifact_root == str(base / "artifacts")
    assert cfg.access.db_url == f"sqlite:///{base}/access.db"
    assert [s.uri for s in cfg.data.sources] == [str(base / "data" / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert cfg.resolved(tmp_path / "elsewhere") == cfg  # already absolute: resolving again changes nothing


def test_resolved_leaves_remote_and_absolute_uris_alone(tmp_path: Path) -> None:
    given = {
        "storage": {"root": "s3://bucket/opt"},
        "tracking": {"uri": "http://mlflow:5000", "artifact_root": "s3://bucket/mlflow"},
        "access": {"db_url": "postgresql://user@db:5432/access", "home": "/var/lib/opt/access", "release_root": "s3://releases/opt"},
        "data": {"sources": [{"name": "a", "uri": "s3://bucket/pile.jsonl"}, {"name": "b", "uri": "https://host/b.jsonl"}]},
    }
    cfg = RunConfig.model_validate(given).resolved(tmp_path)
    assert cfg == RunConfig.model_validate(given)
    for db in ("sqlite:////var/lib/opt/access.db", "sqlite:///:memory:", "sqlite://"):
        assert RunConfig.model_validate({"access": {"db_url": db}}).resolved(tmp_path).access.db_url == db


def test_to_yaml_round_trips_through_load(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            "storage.root=s3://bucket/prefix",
            "storage.s3_endpoint_url=http://minio:9000",
            "model.preset=350m",
            "model.overrides={dropout: 0.0, activation_checkpointing: true}",
            "train.betas=[0.9, 0.98]",
            "eval.max_batches=3",
            "registry.access_class=gated",
            "data.sources=[{name: a, kind: text, uri: corpus}]",
        ]
    )
    path = _write(tmp_path / "saved.yaml", cfg.to_yaml())
    assert load_config(path) == cfg
