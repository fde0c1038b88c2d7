"""Cluster configs validate against the schema that ships with Ray (no cloud is reachable here)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.conftest import REPO


def test_aws_autoscaler_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "infra" / "ray" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # training never lands on the head
    gpu = [t for name, t in types.items() if name.startswith("gpu_")]
    assert gpu and all(t["min_workers"] == 0 for t in gpu)  # scale from zero


def test_schema_catches_a_broken_config():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "infra" / "ray" / "aws.yaml").read_text())
    config["available_node_types"]["head"]["min_workers"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)
