"""The run configuration: one typed, validated YAML document with a section per stage.

`load_config(path, overrides)` reads YAML, applies dotted `--set` overrides and validates. Any problem
raises `ConfigError` with one line per field naming the field and what is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from opt.data.config import DataConfig
from opt.errors import OptError
from opt.model.config import PRESETS, OPTConfig
from opt.ops.config import ScheduleConfig
from opt.storage import is_uri


class ConfigError(OptError, ValueError):
    """A run configuration that cannot be used; the message names the field and the problem."""


class Section(BaseModel):
    # Unknown keys are errors: a typo in a YAML file must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class StorageConfig(Section):
    root: str = ".opt/store"
    """Store URI for datasets, runs and exports: a local path or `s3://bucket/prefix`."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto); None uses AWS's. Credentials come from boto3's usual chain."""


class TrackingConfig(Section):
    uri: str = "sqlite:///.opt/mlflow.db"
    """MLflow tracking URI: SQLite by default, `postgresql://...` or `http://mlflow:5000` in production."""
    experiment: str = "opt"
    """MLflow experiment that training, evaluation and registration runs go to."""
    artifact_root: str = ".opt/mlartifacts"
    """Where a newly created experiment stores artifacts: a local path or `s3://...`."""


class ModelSection(Section):
    preset: str = "debug"
    """OPT preset (`debug`, `125m` ... `175b`)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """OPTConfig fields replacing the preset's (e.g. `dropout: 0.0`)."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v.lower().removeprefix("opt-") not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v.lower().removeprefix("opt-")

    def build(self, vocab_size: int, seq_len: int) -> OPTConfig:
        """The model config for a dataset with `vocab_size` tokens and sequences of `seq_len`."""
        fields = {"vocab_size": vocab_size, "max_seq_len": seq_len, **self.overrides}
        return OPTConfig.preset(self.preset, **fields)

    @model_validator(mode="after")
    def _valid_overrides(self) -> ModelSection:
        try:
            OPTConfig.preset(self.preset, **self.overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid model override: {e}") from None
        return self


class SpikeConfig(Section):
    """What OPT's engineers did by hand when the loss blew up, as a policy the trainer applies itself."""

    enabled: bool = True
    ratio: float = Field(2.0, gt=1)
    """A step whose loss exceeds `ratio` times the running average is a spike (a non-finite loss or
    gradient norm always is)."""
    ema: float = Field(0.9, gt=0, lt=1)
    """Smoothing of the running average of the loss (weight of the past)."""
    warmup_steps: int = Field(10, ge=0)
    """Steps before the ratio test starts: the early loss falls too fast for a running average."""
    lr_factor: float = Field(0.5, gt=0, le=1)
    """Each rollback multiplies the learning rate by this."""
    max_rollbacks: int = Field(3, ge=0)
    """Rollbacks allowed in a run; one more spike and training stops with an error."""


class ChaosConfig(Section):
    """Fault injection for tests and drills; leave empty in real runs."""

    poison_batches: list[int] = Field(default_factory=list)
    """Data steps whose loss is multiplied by `poison_scale`, like a corrupt batch that blows up the loss."""
    poison_scale: float = Field(100.0, gt=0)
    nan_batches: list[int] = Field(default_factory=list)
    """Data steps whose loss is NaN."""
    step_sleep_s: float = Field(0.0, ge=0)
    """Extra seconds per step, to give a drill time to strike mid-run."""
    checkpoint_sleep_s: float = Field(0.0, ge=0)
    """Seconds between writing a checkpoint's shards and committing it (a window to kill a node in)."""
    crash_at_step: int | None = Field(None, ge=0)
    """Every attempt's rank 0 raises at this step: a job that cannot make progress."""
    crash_on_nodes: list[str] = Field(default_factory=list)
    """Ray node ids whose workers raise at their first step of every attempt: a host that keeps failing."""
    hang_at_step: int | None = Field(None, ge=0)
    """On the first attempt, the last rank stops answering at this step, so its peers' collective hangs."""


FAIRSCALE_NEEDS_CUDA = (
    "train.fsdp=fairscale runs on CUDA only (fairscale's FSDP drives CUDA streams in forward and backward): "
    "set train.use_gpu=true on a GPU cluster, or keep train.fsdp=fsdp2, which runs on CPU and GPU"
)


class TrainConfig(Section):
    run: str = Field("tiny", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name: `<store>/runs/<run>/`; the same name resumes from the newest committed checkpoint."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (one rank each); with `min_workers`, the most the run uses."""
    min_workers: int | None = Field(None, ge=1)
    """Elastic training: start (and restart) with as few as this many workers when the cluster has no
    room for `num_workers`; checkpoints reshard to the new count. None: always exactly `num_workers`."""
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0)
    """GPUs per worker when `use_gpu`."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per worker (e.g. `{trainer_slot: 1}`), besides CPUs and GPUs."""
    ray_address: str | None = None
    """Ray cluster address; None starts (or joins) a local instance."""
    ray_connect_timeout_s: float = Field(15.0, gt=0)
    """A `ray_address` that does not answer within this long is refused in one line (Ray itself retries for minutes)."""
    lease_ttl_s: float = Field(120.0, ge=5)
    """The run lease outlives its holder's last heartbeat by this long: a second trainer on the run is refused
    until then; after it, a dead holder's lease is taken over."""
    max_failures: int = Field(3, ge=0)
    """Restarts allowed in a row without a new committed checkpoint; one more failure stops the run.
    A run that makes progress between failures keeps going (OPT-175B restarted over 100 times)."""
    exclude_node_after: int = Field(2, ge=1)
    """Failures on one node before later restarts keep off it (if the rest of the cluster has room)."""
    collective_timeout_s: int = Field(600, ge=10)
    """A collective (all-reduce, barrier) that hangs this long fails the attempt, which is then restarted."""
    health_check_interval_s: float = Field(0.5, gt=0, le=60)
    """How often Ray Train's controller polls the workers: a dead worker or node is seen within about this
    long (Ray's default is 2 s; one poll is one small RPC per worker)."""
    lost_actor_grace_ms: int = Field(0, ge=0, le=60_000)
    """How long a call to an unreachable Ray actor waits for the cluster to confirm the actor's death before
    it fails (Ray's `timeout_ms_task_wait_for_death_info`, default 1000, checked on a ~1 s timer). Tearing
    down a worker group with a dead worker waits on two such calls, so Ray's default adds ~4 s to every
    restart. 0 fails them at once; a call that fails on a passing network fault then costs one restart
    from the newest checkpoint. Applies when this command starts its Ray job (`ray.init`)."""
    preemption_watcher: bool = False
    """Run Ray Train's preemption watcher: an actor per attempt that polls for draining nodes and holds the
    restart until the drain deadline. The trainer does not yet checkpoint on a drain notice, so off costs
    nothing: a drained node's ranks fail and the run restarts from the newest checkpoint, as for any lost
    node. On, each restart also starts that actor's process (~2.5 CPU-seconds on a small head node)."""
    max_steps: int = Field(40, ge=1)
    """The run's length: the learning-rate schedule warms up and decays over these steps."""
    stop_at_step: int | None = Field(None, ge=1)
    """End this invocation at this step (committing a checkpoint there) though the schedule runs to `max_steps`:
    how a scheduled pipeline trains a long run in segments. None: train to `max_steps`."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per rank per step."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; None takes OPT's for the preset (125m: 6e-4 ... 175b: 1.2e-4; debug: 1e-3)."""
    warmup_steps: int | None = Field(None, ge=0)
    """Linear warmup steps; None takes OPT's rule (375M tokens, 2000 steps at 175b; debug: 10% of max_steps)."""
    batch_tokens: int | None = Field(None, ge=1)
    """Tokens per optimizer step across ranks, reached by gradient accumulation (OPT-125M: 0.5M);
    None is one micro-batch per rank per step."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Linear decay ends at this fraction of the peak (OPT: 10%)."""
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """`adamw` (OPT's) or `sgd`. Changing it on resume switches optimizer with the state carried: the
    state of the one switched away from is kept in the checkpoints and restored when switching back."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    fsdp: Literal["fsdp2", "fairscale"] = "fsdp2"
    """Sharded data parallelism: torch's FSDP2 (`fully_shard`, CPU and GPU) or fairscale's FSDP (CUDA only,
    as metaseq ran OPT). Checkpoints of one cannot resume the other; `optctl model export` reads both."""
    tensor_parallel: int = Field(1, ge=1)
    """Tensor-parallel degree (fairscale's model-parallel layers); ranks = tensor_parallel x data-parallel."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Mixed precision on GPU (bf16 compute, fp32 master weights and reductions); CPU always trains in fp32."""
    peak_tflops: float | None = Field(None, gt=0)
    """Peak dense TFLOP/s of one device, for MFU; None uses the GPU's datasheet figure (H100/H200 989,
    A100 312) and leaves MFU out on CPU."""
    checkpoint_every: int = Field(20, ge=1)
    """Steps between sharded checkpoints (one is always written at the last step)."""
    keep_checkpoints: int | None = Field(3, ge=1)
    """Newest committed checkpoints kept; older ones are deleted (None keeps all)."""
    keep_every: int | None = Field(None, ge=1)
    """Also keep, for good, every checkpoint whose step is a multiple of this."""
    async_checkpoint: bool = False
    """Write checkpoints in the background: training goes on while shards are written and uploaded;
    the commit marker follows once every rank has finished."""
    seed: int = 0
    spikes: SpikeConfig = SpikeConfig()
    chaos: ChaosConfig = ChaosConfig()

    @model_validator(mode="after")
    def _layout_fits(self) -> TrainConfig:
        for n in self.worker_counts:
            if n % self.tensor_parallel:
                raise ValueError(f"{n} workers is not a multiple of train.tensor_parallel={self.tensor_parallel}")
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"train.min_workers={self.min_workers} exceeds train.num_workers={self.num_workers}")
        if self.fsdp == "fairscale":
            if not self.use_gpu:
                raise ValueError(FAIRSCALE_NEEDS_CUDA)
            if self.tensor_parallel > 1:
                raise ValueError("train.fsdp=fairscale with train.tensor_parallel > 1 is not supported; use train.fsdp=fsdp2 for TP x FSDP")
            if self.async_checkpoint:
                raise ValueError("train.async_checkpoint needs train.fsdp=fsdp2 (fairscale's shards are saved synchronously)")
        return self

    @property
    def end_step(self) -> int:
        """Where this invocation stops: `max_steps`, or `stop_at_step` when that comes first."""
        return min(self.max_steps, self.stop_at_step or self.max_steps)

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may get: `num_workers` alone unless elastic."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)


class EvalConfig(Section):
    batch_size: int = Field(8, ge=1)
    max_batches: int | None = Field(None, ge=1)
    """Cap on validation batches per source; None evaluates the whole split."""
    tasks: list[str] | None = None
    """lm-eval tasks run beside perplexity. None: OPT's 16-task suite for presets 125m and up (their data comes from
    the Hugging Face hub: network or a local datasets cache), the bundled offline tasks for `debug`; [] runs none."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples per task (None: each task's own default; OPT reported zero-shot)."""
    limit: int | None = Field(None, ge=1)
    """Documents per task (None: all); a cap for quick checks."""
    include_path: str | None = None
    """A folder of extra task YAMLs in lm-eval's format (the bundled tasks are always included)."""
    batch_tokens: int = Field(2048, ge=1)
    """Tokens per scoring batch (packed rows of shared contexts)."""

    def task_names(self, preset: str) -> list[str]:
        from opt.eval.tasks import BUNDLED  # no torch, no lm_eval: a list of names

        if self.tasks is not None:
            return list(self.tasks)
        if preset == "debug":
            return list(BUNDLED)
        from opt.eval.suite import OPT_SUITE

        return list(OPT_SUITE)


class GateConfig(Section):
    """The registration gate (opt/registry/gates.py): a version is `candidate` only if every check passes."""

    max_perplexity: float = Field(1e4, gt=1)
    """The validation perplexity must be at most this."""
    min_scores: dict[str, float] = {}
    """Minimum task scores, by `task.metric` (e.g. `hellaswag.acc_norm_tokens: 0.3`)."""
    max_perplexity_ratio: float = Field(1.05, ge=1.0)
    """Against the current champion: perplexity at most this times the champion's."""
    regression_metrics: list[str] = ["acc", "acc_norm_tokens"]
    """Task metrics compared with the champion's."""
    stderr_multiple: float = Field(2.0, ge=0.0)
    """A task score may fall below the champion's by at most this many standard errors of the difference."""
    check_integrity: bool = True
    """Verify the checkpoint's commit, the dataset files evaluation read, and that the HF export gives our logits."""
    auto_promote: bool = False
    """Promote a version that passes every check (and so does not regress) to `champion` at registration."""


class RegistryConfig(Section):
    model_name: str | None = None
    """Registered model name; None means `opt-<preset>`."""
    access_class: Literal["open", "gated"] | None = None
    """`gated` versions are downloadable only through an approved access grant; None: gated for 175b."""
    gate: GateConfig = GateConfig()
    intended_use: str = (
        "Research on language models: evaluation, probing, and the study of training dynamics, bias and toxicity. "
        "Not for production use, for text shown to people without review, or for decisions about people."
    )
    """The model card's "Intended use" section (Markdown)."""
    limitations: str = (
        "Like every language model trained on web and documentation text, it reproduces that data's biases and errors, "
        "and can produce text that is wrong, offensive or harmful, with confidence. It was evaluated only on the tasks "
        "in this card; bias and toxicity benchmarks (CrowS-Pairs, StereoSet, RealToxicityPrompts) were not run unless listed."
    )
    """The model card's "Limitations" section (Markdown)."""


class MailConfig(Section):
    """Email from the access service (opt/access/mail.py): an outbox table, sent by the running service."""

    host: str | None = None
    """SMTP server; None keeps messages in the outbox unsent (`optctl access mail list` shows them)."""
    port: int = Field(25, ge=1, le=65535)
    security: Literal["none", "starttls", "ssl"] = "starttls"
    username: str | None = None
    password_env: str = "OPT_SMTP_PASSWORD"
    """Environment variable holding the SMTP password (never in the config file)."""
    sender: str = "OPT access <access@localhost>"
    timeout_s: float = Field(15.0, gt=0)
    send_every_s: float = Field(10.0, gt=0)
    """How often the running service sends what is due in the outbox."""
    reviewers: Literal["immediate", "digest"] = "immediate"
    """Reviewers hear of a new request at once, or in the daily digest (`access-housekeeping`)."""
    portal_url: str | None = None
    """The portal's public URL for links in messages (default: access.url)."""


class AccessConfig(Section):
    """The access service: who may download gated versions' weights (`optctl access serve`)."""

    home: str = ".opt/access"
    """Where the embedded service keeps its keys (0700); the default database and release root live here too."""
    db_url: str = "sqlite:///.opt/access/access.db"
    """SQLAlchemy URL of the access database (PostgreSQL in production); migrated by Alembic on start.
    `$OPT_ACCESS_DB_URL` overrides it, so a password stays out of files and command lines."""
    release_root: str = ".opt/access/releases"
    """Where gated versions' weight files are published: a local folder (0700) or an s3:// prefix only the service reads."""
    url: str = "http://127.0.0.1:8600"
    """The service as clients reach it (`$OPT_ACCESS_URL` and `--server` override it)."""
    publish_via: Literal["local", "service"] = "local"
    """How registration publishes a gated release: `local` in-process (it runs beside the access database and keys,
    the embedded defaults), or `service`: staged under `staging_uri` and published by the running service, as an admin
    whose token is in `$OPT_ACCESS_TOKEN` (production: the keys stay in the service's environment only)."""
    staging_uri: str | None = None
    """Where registration stages a gated version's files for the service to copy (a path or s3:// prefix both can
    reach); the service publishes over HTTP from under it only. None: no publication over HTTP."""
    licence_file: str | None = None
    """The licence a gated release is published under (text); None: the bundled non-commercial research licence."""
    grant_days: int = Field(30, ge=1)
    """How long an approved grant lasts unless the reviewer says less."""
    max_grant_days: int = Field(365, ge=1)
    """The most a reviewer may grant."""
    download_quota: int = Field(5, ge=1)
    """Whole downloads a grant allows unless the reviewer says otherwise."""
    max_download_quota: int = Field(100, ge=1)
    """The most downloads a reviewer may grant."""
    link_ttl_seconds: int = Field(300, ge=1, le=7 * 24 * 3600)
    """Lifetime of one file's link (a presigned S3 URL or the service's own); S3 allows at most 7 days."""
    token_days: int = Field(90, ge=1)
    """Lifetime of an API token."""
    download_hours: int = Field(72, ge=1)
    """How long a started download can be resumed without taking more quota."""
    secret_env: str = "OPT_ACCESS_SECRET"
    """Environment variable holding the service secret (audit chain, file links); without it one is kept under `home`."""
    mail: MailConfig = MailConfig()
    two_person_models: list[str] = []
    """Models whose requests need two different reviewers' approvals (a 175B-class release): the first is recorded
    (HTTP 202), the second makes the grant."""

    @model_validator(mode="after")
    def _bounds(self) -> AccessConfig:
        if self.grant_days > self.max_grant_days:
            raise ValueError(f"access.grant_days ({self.grant_days}) is over access.max_grant_days ({self.max_grant_days})")
        if self.publish_via == "service" and not self.staging_uri:
            raise ValueError("access.publish_via=service needs access.staging_uri (where the service copies the files from)")
        if self.download_quota > self.max_download_quota:
            raise ValueError(f"access.download_quota ({self.download_quota}) is over access.max_download_quota ({self.max_download_quota})")
        return self


class RunConfig(Section):
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    data: DataConfig = DataConfig()
    model: ModelSection = ModelSection()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    access: AccessConfig = AccessConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"opt-{self.model.preset}"

    @property
    def access_class(self) -> str:
        return self.registry.access_class or ("gated" if self.model.preset == "175b" else "open")

    def resolved(self, base: Path) -> RunConfig:
        """The same config with relative local paths made absolute against `base` (Ray workers run elsewhere)."""

        def path(uri: str) -> str:
            return uri if is_uri(uri) or Path(uri).is_absolute() else str((base / uri).resolve())

        def sqlite(url: str) -> str:
            prefix = "sqlite:///"
            rest = url.removeprefix(prefix)
            # `sqlite:///:memory:` is an in-memory database, not a file to place under `base`
            return prefix + path(rest) if url.startswith(prefix) and rest != ":memory:" else url

        data = self.model_dump()
        data["storage"]["root"] = path(self.storage.root)
        data["tracking"]["uri"] = sqlite(self.tracking.uri)
        data["tracking"]["artifact_root"] = path(self.tracking.artifact_root)
        data["access"]["db_url"] = sqlite(self.access.db_url)
        data["access"]["home"] = path(self.access.home)
        data["access"]["release_root"] = path(self.access.release_root)
        if self.access.staging_uri:
            data["access"]["staging_uri"] = path(self.access.staging_uri)
        if self.access.licence_file:
            data["access"]["licence_file"] = path(self.access.licence_file)
        for src in data["data"]["sources"]:
            src["uri"] = path(src["uri"])
        return RunConfig.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_OVERRIDE = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)=(.*)$", re.DOTALL)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        m = _OVERRIDE.match(item)
        if not m:
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.max_steps=20")
        *parents, leaf = m.group(1).split(".")
        node = data
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(m.group(2)) if m.group(2) else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {str(e).splitlines()[0]}") from None
    return data


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e.get("input"), dict) else ""
        lines.append(f"{source}: {loc}: {msg}{got}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run configuration; `path=None` uses the embedded defaults."""
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data).resolved(Path.cwd())
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None
