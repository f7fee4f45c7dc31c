"""config.yaml: the daemon's configuration, validated with pydantic.

Every section has defaults, so an empty file (or none) is a working configuration. A bad file
is refused with the file, the field path and the reason::

    config.yaml: defaults.policy.factor: must be > 0 and < 1, got 1.5

Policy and detector blocks are validated against the engine's own parameter dataclasses
(``ReduceOnPlateauParams`` and friends), so a parameter's name, type and default are written
once, beside the rule that uses it.

Environment variables override the file: ``LRPILOT_SERVER__PORT=9000`` sets
``server.port`` (a double underscore separates nesting levels; values are read as YAML
scalars). ``LRPILOT_AUTH_TOKEN`` adds an admin token and ``LRPILOT_JOB_TOKEN`` a job token for
every job.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .engine.base import ParamError
from .engine.job import DetectorSpec, JobSpec, PolicySpec
from .engine.policies.anneal import AnnealParams
from .engine.policies.warmup import WarmupParams
from .engine.registry import DETECTOR_NAMES, POLICY_KINDS, detector_classes, policy_classes
from .engine.responses import ResponseParams

ENV_PREFIX = "LRPILOT_"


class ConfigError(Exception):
    """A configuration (file, environment or policy block) is invalid.

    The message names the file, the field path and the reason.
    """


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    """Where the daemon listens, and how it treats connections."""

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 to accept from other hosts.")
    port: int = Field(8765, ge=0, le=65535, description="Port for websockets and HTTP; 0 picks a free one.")
    tls_cert: Path | None = Field(None, description="PEM certificate; with tls_key, serve wss:// and https://.")
    tls_key: Path | None = Field(None, validate_default=True, description="PEM private key for tls_cert.")
    max_frame_bytes: int = Field(1_048_576, ge=1024, description="Largest websocket frame accepted.")
    stale_after_seconds: float = Field(120.0, gt=0, description="A job silent this long is reported stale.")
    ping_interval_seconds: float = Field(20.0, gt=0, description="Websocket keepalive: every open connection is pinged this often, and closed (1011) when its pong has not come one interval later.")
    shutdown_grace_seconds: float = Field(5.0, ge=0, description="Time to flush and close on SIGTERM.")
    allow_client_policy: bool = Field(True, description="Honour a policy requested in a job's hello.")

    @field_validator("tls_key")
    @classmethod
    def _tls_pair(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        """tls_cert and tls_key go together: with only one, the daemon would serve plain ws://."""
        if "tls_cert" not in info.data:  # tls_cert itself was invalid: that error is reported
            return key
        cert = info.data["tls_cert"]
        if cert is not None and key is None:
            raise ValueError("missing: tls_cert is set, and serving TLS needs its private key too")
        if key is not None and cert is None:
            raise ValueError("set without tls_cert: set both to serve wss:// and https://, or neither")
        return key


class TokenConfig(_Section):
    """One bearer token."""

    token: str = Field(min_length=8, description="The secret; at least 8 characters.")
    role: Literal["job", "admin"] = Field("job", description="job: stream metrics; admin: operator commands too.")
    jobs: list[str] = Field(default_factory=lambda: ["*"], description="Job-name globs this token may use.")
    name: str | None = Field(None, description="Who holds it, for logs and the decision journal.")


class AuthConfig(_Section):
    """Bearer-token authentication of the websocket handshake.

    With no token at all, the daemon accepts loopback connections only (/healthz and /readyz
    answer every peer).
    """

    tokens: list[TokenConfig] = Field(default_factory=list, description="Tokens accepted.")
    token_file: Path | None = Field(
        None, description="A file of tokens, one per line: ROLE:GLOB[,GLOB...]:TOKEN (# comments)."
    )


class StorageConfig(_Section):
    """Durable state: the decision journal and engine snapshots, in SQLite."""

    state_dir: Path = Field(Path("./lrpilot-state"), description="Directory of the SQLite database.")
    flush_interval_seconds: float = Field(0.05, gt=0, description="How often batched writes are flushed.")
    snapshot_every_records: int = Field(200, ge=1, description="Snapshot a job's engine after this many records.")


class ExporterConfig(_Section):
    """The Prometheus exporter at /metrics."""

    enabled: bool = Field(True, description="Serve /metrics.")
    finished_job_ttl_seconds: float = Field(600.0, ge=0, description="Drop a finished job's series after this.")
    cache_seconds: float = Field(1.0, ge=0, description="Reuse a rendered page for this long.")
    public: bool = Field(
        False,
        description="Serve /metrics to every peer even with no auth token configured "
        "(job names and metric values become readable by anyone who reaches the port).",
    )


class TensorBoardConfig(_Section):
    """TensorBoard output of the LR the daemon commands, detections and decisions."""

    enabled: bool = Field(False, description="Write TensorBoard event files per job.")
    log_dir: Path = Field(Path("./lrpilot-tb"), description="Root directory; one subdirectory per job.")


class LimitsConfig(_Section):
    """Protection against misbehaving clients; each violation is answered and counted."""

    max_jobs: int = Field(1000, ge=1, description="Jobs known at once.")
    max_metric_names_per_job: int = Field(64, ge=1, description="Distinct metric names per job.")
    max_messages_per_second: float = Field(10_000.0, gt=0, description="Per-connection message rate.")
    max_ranks: int = Field(1024, ge=1, description="Ranks per job.")


class WatchConfig(_Section):
    """Directories of jobs that write TensorBoard/JSONL/CSV logs instead of using the client."""

    dirs: list[Path] = Field(default_factory=list, description="Directories to watch, recursively.")
    poll_seconds: float = Field(1.0, gt=0, description="How often growing files are re-read.")
    default_initial_lr: float = Field(
        1e-3,
        gt=0,
        description="A watched run's initial LR when neither lrpilot.json nor an lr metric gives it.",
    )


class JobMatch(_Section):
    """Which jobs a rule applies to: a job-name glob and labels that must all match."""

    name: str = Field("*", description="Glob on the job name.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels that must all be equal.")


class JobRule(_Section):
    """A per-job override of the default policy and detectors; the first matching rule wins."""

    match: JobMatch = Field(default_factory=JobMatch)
    policy: dict[str, Any] | None = Field(None, description="A policy block replacing the default.")
    detectors: dict[str, Any] | None = Field(None, description="Detector blocks merged over the defaults.")


DEFAULT_POLICY: dict[str, Any] = {
    "kind": "reduce_on_plateau",
    "monitor": "val_loss",
    "factor": 0.5,
    "patience": 2,
    "threshold": 0.01,
    "anneal": {"fraction": 0.2, "final_factor": 0.0},
}
DEFAULT_DETECTORS: dict[str, Any] = {
    "non_finite": {},
    "spike": {},
    "divergence": {},
    "oscillation": {},
    "overshoot": {},
    "stalled": {},
    "slow_progress": {},
}


class DefaultsConfig(_Section):
    """What every job gets unless a rule or its own request says otherwise."""

    policy: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_POLICY), description="Policy block.")
    detectors: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_DETECTORS), description="Detector blocks (name: params, or false)."
    )
    apply_lead_steps: int = Field(1, ge=0, description="Decisions apply at least this many steps after the last reported.")
    apply_lead_seconds: float = Field(
        0.25,
        ge=0,
        description="...or as many steps as the job makes in this time, so decisions reach every rank in time.",
    )


class Config(_Section):
    """The whole daemon configuration."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    exporter: ExporterConfig = Field(default_factory=ExporterConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    jobs: list[JobRule] = Field(default_factory=list, description="Per-job rules, first match wins.")
    # job_spec_for's specs, by the index of the matched rule (-1: the defaults)
    _specs: dict[int, tuple[Config, JobSpec]] = PrivateAttr(default_factory=dict)

    def all_tokens(self) -> list[TokenConfig]:
        """Tokens from the config and from ``auth.token_file``."""
        tokens = list(self.auth.tokens)
        if self.auth.token_file is not None:
            tokens.extend(read_token_file(self.auth.token_file))
        return tokens

    def job_spec_for(
        self, job_name: str, labels: Mapping[str, str], requested_policy: Mapping[str, Any] | None = None
    ) -> JobSpec:
        """The engine spec for a job: its rule (or the defaults), then its own request.

        Raises ConfigError naming ``hello.policy`` when the requested block is invalid.
        """
        policy_block: Mapping[str, Any] = self.defaults.policy
        detector_blocks: dict[str, Any] = dict(self.defaults.detectors)
        matched = -1
        for index, rule in enumerate(self.jobs):
            if _matches(rule.match, job_name, labels):
                if rule.policy is not None:
                    policy_block = rule.policy
                if rule.detectors is not None:
                    detector_blocks.update(rule.detectors)
                matched = index
                break
        where = "policy"
        requested = bool(requested_policy) and self.server.allow_client_policy
        if not requested:
            # Every job of a rule gets the same spec: it is immutable (frozen dataclasses all
            # the way down), so it is built once per rule and config, and shared (about 2 KB
            # and 30 objects less per job, and a cheaper hello). A reload makes a new Config,
            # and so a new cache; so does model_copy, which shares the private dict (hence the
            # owner kept with each spec).
            cached = self._specs.get(matched)
            if cached is not None and cached[0] is self:
                return cached[1]
        else:
            assert requested_policy is not None
            block = dict(requested_policy)
            if "detectors" in block:
                detector_blocks.update(block.pop("detectors") or {})
            policy_block, where = block, "hello.policy"
        policy = parse_policy_block(policy_block, where)
        detectors = parse_detector_blocks(detector_blocks, "detectors")
        spec = JobSpec(
            policy,
            detectors,
            apply_lead_steps=self.defaults.apply_lead_steps,
            apply_lead_seconds=self.defaults.apply_lead_seconds,
        )
        if not requested:
            self._specs[matched] = (self, spec)
        return spec


def _matches(match: JobMatch, job_name: str, labels: Mapping[str, str]) -> bool:
    if not fnmatch.fnmatchcase(job_name, match.name):
        return False
    return all(labels.get(k) == v for k, v in match.labels.items())


# ---------------------------------------------------------------------- policy blocks


@functools.cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    """One validator per parameter class: building it costs far more than using it, and
    every new job's hello validates its policy and detector blocks."""
    return TypeAdapter(cls)


def _params(cls: type, block: Mapping[str, Any], where: str, what: str) -> Any:
    """Validate ``block`` against the parameter dataclass ``cls``; errors name the field."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in block:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown parameter for {what}; expected one of {', '.join(known)}")
    try:
        return _adapter(cls).validate_python(dict(block))
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ParamError):
            raise ConfigError(f"{where}.{cause.field}: {cause.message}") from None
        path = _loc(err["loc"])
        reason = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}{'.' + path if path else ''}: {reason} (got {err.get('input')!r})") from None
    except ParamError as exc:
        raise ConfigError(f"{where}.{exc.field}: {exc.message}") from None


def _loc(loc: tuple[Any, ...]) -> str:
    """A pydantic error location without the union-branch type names it inserts."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif "[" in part or part in ("float", "int", "str", "bool", "none", "function-after"):
            continue
        else:
            parts.append(("." if parts else "") + part)
    return "".join(parts)


def parse_policy_block(block: Any, where: str = "policy") -> PolicySpec:
    """A validated :class:`PolicySpec` from a policy block (``kind:`` + parameters [+ warmup]
    [+ anneal])."""
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'kind:' key, got {type(block).__name__}")
    block = dict(block)
    kind = block.pop("kind", None)
    if kind is None:
        raise ConfigError(f"{where}.kind: missing; expected one of {', '.join(POLICY_KINDS)}")
    if kind not in POLICY_KINDS:
        raise ConfigError(f"{where}.kind: unknown policy {kind!r}; expected one of {', '.join(POLICY_KINDS)}")
    block.pop("detectors", None)
    warmup_block = block.pop("warmup", None)
    anneal_block = block.pop("anneal", None)
    params_cls, _ = policy_classes(kind)
    params = _params(params_cls, block, where, kind)
    warmup = _wrapper_params(WarmupParams, warmup_block, where, "warmup", "total_iters: 500, start_factor: 0.1")
    anneal = _wrapper_params(AnnealParams, anneal_block, where, "anneal", "fraction: 0.2, final_factor: 0.0")
    return PolicySpec(kind, params, warmup, anneal)


def _wrapper_params(cls: type, block: Any, where: str, name: str, example: str) -> Any:
    """The parameters of a policy's ``warmup:`` or ``anneal:`` block (None: no block)."""
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}.{name}: expected a mapping like {{{example}}}")
    return _params(cls, block, f"{where}.{name}", name)


def parse_detector_blocks(blocks: Any, where: str = "detectors") -> tuple[DetectorSpec, ...]:
    """Validated detector specs from ``{name: params-with-optional-response | true | false}``."""
    if blocks is None:
        return ()
    if not isinstance(blocks, Mapping):
        raise ConfigError(f"{where}: expected a mapping of detector name to parameters")
    specs: list[DetectorSpec] = []
    for name, block in blocks.items():
        path = f"{where}.{name}"
        if name not in DETECTOR_NAMES:
            raise ConfigError(f"{path}: unknown detector; expected one of {', '.join(DETECTOR_NAMES)}")
        if block is False or block is None:
            continue
        if block is True:
            block = {}
        if not isinstance(block, Mapping):
            raise ConfigError(f"{path}: expected a mapping of parameters, true or false")
        block = dict(block)
        response_block = block.pop("response", None) or {}
        if isinstance(response_block, str):
            response_block = {"action": response_block}
        params_cls, _ = detector_classes(name)
        params = _params(params_cls, block, path, f"detector {name}")
        response = _params(ResponseParams, response_block, f"{path}.response", "response")
        specs.append(DetectorSpec(name, params, response))
    return tuple(specs)


def load_policy_file(path: str | Path) -> JobSpec:
    """A replay spec from a policy file: one policy block, its detectors only.

    Replay uses the "records" clock: every record is one scheduler step.
    """
    path = Path(path)
    block = _read_yaml(path)
    try:
        policy = parse_policy_block(block, "policy")
        detectors = parse_detector_blocks(block.get("detectors"), "policy.detectors")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return JobSpec(policy, detectors, clock="records")


# ---------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = yaml.safe_load(value) if value != "" else None
    tokens = []
    if environ.get("LRPILOT_AUTH_TOKEN"):
        tokens.append({"token": environ["LRPILOT_AUTH_TOKEN"], "role": "admin", "name": "env:LRPILOT_AUTH_TOKEN"})
    if environ.get("LRPILOT_JOB_TOKEN"):
        tokens.append({"token": environ["LRPILOT_JOB_TOKEN"], "role": "job", "name": "env:LRPILOT_JOB_TOKEN"})
    if tokens:
        auth = raw.setdefault("auth", {})
        if not isinstance(auth, dict):
            auth = raw["auth"] = {}
        auth["tokens"] = list(auth.get("tokens") or []) + tokens
    return raw


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, and validate a configuration.

    ``path`` None means built-in defaults. Raises :class:`ConfigError` naming the file
    (or ``<defaults>``), the field path and the reason.
    """
    environ = os.environ if environ is None else environ
    source = str(path) if path is not None else "<defaults>"
    raw = _read_yaml(Path(path)) if path is not None else {}
    raw = _apply_env(raw, environ)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _loc(err["loc"]) or "(top level)"
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        raise ConfigError(f"{source}: {field}: {reason}") from None
    try:
        parse_policy_block(config.defaults.policy, "defaults.policy")
        parse_detector_blocks(config.defaults.detectors, "defaults.detectors")
        for i, rule in enumerate(config.jobs):
            if rule.policy is not None:
                parse_policy_block(rule.policy, f"jobs[{i}].policy")
            if rule.detectors is not None:
                parse_detector_blocks(rule.detectors, f"jobs[{i}].detectors")
        if config.auth.token_file is not None:
            read_token_file(config.auth.token_file)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def read_token_file(path: Path) -> list[TokenConfig]:
    """Tokens from a file of ``ROLE:GLOB[,GLOB...]:TOKEN`` lines (blank lines and # comments skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"auth.token_file: cannot read {path}: {exc.strerror or exc}") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[0] not in ("job", "admin"):
            raise ConfigError(f"{path}: line {number}: expected ROLE:GLOB[,GLOB...]:TOKEN with ROLE job or admin")
        try:
            tokens.append(
                TokenConfig(role=parts[0], jobs=parts[1].split(","), token=parts[2], name=f"{path.name}:{number}")
            )
        except ValidationError as exc:
            raise ConfigError(f"{path}: line {number}: {exc.errors()[0]['msg']}") from None
    return tokens


def find_default_config(cwd: Path | None = None) -> Path | None:
    """./config.yaml when present, else None (built-in defaults)."""
    candidate = (cwd or Path.cwd()) / "config.yaml"
    return candidate if candidate.is_file() else None
