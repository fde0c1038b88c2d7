"""The training driver's Ray Train settings (no cluster needed: these are what it hands to Ray Train)."""

from __future__ import annotations

from opt.config import load_config
from opt.train.job import _controller_env, _job_env, _trainer_class


def test_the_trainer_drops_only_ray_datas_per_attempt_actor():
    """Ray Train starts a DatasetManager actor for every attempt through DatasetsCallback; the trainer
    reads its own shards, so that callback goes and every other default one stays, in order."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2.api.config import ScalingConfig

    def kinds(cls):
        trainer = cls(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(cb).__name__ for cb in trainer._create_default_callbacks()]

    ours, ray_s = kinds(_trainer_class()), kinds(TorchTrainer)
    assert DatasetsCallback.__name__ in ray_s  # if Ray stops adding it, this override has nothing left to do
    assert ours == [k for k in ray_s if k != DatasetsCallback.__name__]
    assert "BackendSetupCallback" in ours and "UserCallbackHandler" in ours


def test_controller_settings_are_ones_ray_train_passes_on():
    """The driver's settings reach the controller only if Ray Train propagates their names."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    t = load_config(None, ["train.health_check_interval_s=0.25"]).train
    env = _controller_env(t)
    assert set(env) <= ENV_VARS_TO_PROPAGATE
    assert env == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    on = load_config(None, ["train.preemption_watcher=true"]).train
    assert _controller_env(on)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


def test_the_job_env_leaves_a_setting_the_job_submission_made(monkeypatch):
    """Under `ray job submit`, Ray merges the driver's runtime env into the submitted one and refuses a key
    set in both: the submission's value wins and the driver does not set it again."""
    import json

    t = load_config(None, ["train.lost_actor_grace_ms=250"]).train
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _job_env(t) == {"RAY_timeout_ms_task_wait_for_death_info": "250"}
    submitted = {"runtime_env": {"env_vars": {"RAY_timeout_ms_task_wait_for_death_info": "1000", "OTHER": "x"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(submitted))
    assert _job_env(t) == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"pip": ["x"]}}))
    assert _job_env(t) == {"RAY_timeout_ms_task_wait_for_death_info": "250"}
