from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recsys_core.data import paths
from recsys_core.index.kinds import INDEX_KINDS, IndexSettings
from recsys_core.models.encoder import DEFAULT_PRECISION, PRECISIONS
from recsys_core.rpc.access import AuthConfig
from recsys_core.rpc.tracing import TracingConfig
from recsys_core.rpc.limits import DEFAULTS as LIMIT_DEFAULTS, ServerLimits, service_limits
from recsys_core.rpc.transport import Security
from recsys_core.rpc.envconfig import ConfigError, EnvReader
from recsys_core.store.catalogue_store import STORES
from recsys_core.store.redis_options import DURABILITY_LEVELS, MODES

ENCODER_BACKENDS = ("onnx", "triton")
TRITON_MODEL_CONTROLS = ("own", "follower")


@dataclass(frozen=True)
class EmbeddingConfig:
    address: str = "127.0.0.1:50052"
    workers: int = 8
    grace_seconds: float = 10.0
    # Prometheus /metrics port, on the host of `address`; 0 picks a free one
    # (every process of a local stack needs its own; Kubernetes sets 9090).
    metrics_port: int = 0
    # Transport (mTLS certificates, or explicit plaintext for development) and
    # token checks: EMBEDDING_TLS_*, EMBEDDING_INSECURE, EMBEDDING_REFLECTION,
    # EMBEDDING_AUTH_* (docs/operations.md, "Security"). No certificates: no start.
    # A plaintext port serving grpc.health.v1 alone, for Kubernetes' gRPC
    # probes (they speak no TLS); unset: none.
    health_port: int | None = None
    security: Security = Security(service="embedding")
    auth: AuthConfig = AuthConfig()
    # OpenTelemetry spans of every call, off by default: EMBEDDING_TRACING=otlp|console|file,
    # EMBEDDING_TRACING_* and the standard OTEL_* (recsys_core/rpc/tracing.py; docs/operations.md, "Tracing").
    tracing: TracingConfig = TracingConfig()
    # The catalogue store every replica shares (docs/operations.md,
    # "Catalogue store"): sqlite, one WAL file (catalogue_path) that the
    # replicas of one machine open together; or redis (catalogue_redis_url),
    # with the embedding service's ACL user. Replicas follow its changes
    # every catalogue_poll_seconds.
    catalogue_store: str = "sqlite"
    catalogue_path: str = str(paths.REPO_ROOT / "var" / "catalogue.sqlite3")
    catalogue_redis_url: str = "redis://127.0.0.1:6379/0"
    catalogue_redis_prefix: str = "recsys:catalogue:"
    # The ACL user's name and a file holding its password (a Kubernetes
    # Secret), or both in the URL (redis://user:password@host:port/0).
    catalogue_redis_username: str = ""
    catalogue_redis_password_file: str = ""
    # always | everysec | unchecked, as the profile's Redis store (docs/profiles.md).
    catalogue_redis_durability: str = "always"
    # single | cluster: on a Redis Cluster (found from catalogue_redis_url's
    # node and catalogue_redis_cluster_nodes, host:port,host:port) the whole
    # catalogue shares one slot (recsys_core/store/catalogue_redis.py).
    catalogue_redis_mode: str = "single"
    catalogue_redis_cluster_nodes: tuple[str, ...] = ()
    catalogue_poll_seconds: float = 0.2
    # Request size, streams per connection, calls per second per caller:
    # EMBEDDING_MAX_REQUEST_BYTES, _MAX_CONCURRENT_STREAMS, _RATE_LIMIT_PER_SECOND,
    # _RATE_LIMIT_BURST (recsys_core/rpc/limits.py; docs/operations.md, "Limits").
    limits: ServerLimits = LIMIT_DEFAULTS["embedding"]
    # Items added to the store at start where it lacks them (the first start
    # seeds it; later starts read the store, upserts included). Empty: none.
    data_dir: str = str(paths.BUNDLED_DATA_DIR)
    # Online-retail invoices whose products join the catalogue (category
    # Online_Retail); empty means none.
    retail_dir: str = str(paths.BUNDLED_RETAIL_DIR)
    model_repo: str = str(paths.MODEL_REPO)
    # A trained model directory (recsys train --out; recsys_core/models/model_serving.py):
    # its encoder indexes the catalogue (Triton must serve it as text_encoder's
    # newest version, or the in-process encoder loads it), and items it was
    # trained on add their ID vectors. Empty: the pretrained encoder alone.
    model_dir: str = ""
    # A model registry (recsys_core/models/registry.py; EMBEDDING_MODEL_REGISTRY):
    # the service serves its promoted `sequence` version (a model directory as
    # above), polls PROMOTED every model_poll_seconds, and on a promotion
    # builds the new encoder and index beside the serving ones and swaps
    # them in one step (services/embedding/promotion.py). Before any is
    # promoted: the pretrained encoder. Exclusive with model_dir.
    model_registry: str = ""
    model_poll_seconds: float = 1.0
    # Who loads a promoted encoder into Triton (EMBEDDING_TRITON_MODEL_CONTROL):
    # "own", this service (it writes model_repo, the repository its Triton
    # reads: `recsys serve`); "follower", a `recsys triton-follow` beside each
    # Triton (Kubernetes, where several Triton pods sit behind one Service):
    # this service then waits until its Triton serves version 1000+N, up to
    # triton_load_wait_seconds, and writes and unloads nothing.
    triton_model_control: str = "own"
    triton_load_wait_seconds: float = 600.0
    encoder: str = "onnx"
    triton_url: str = "127.0.0.1:8001"
    # The Triton model that encodes: text_encoder (Python backend, what the
    # local tritonserver can run) or text_encoder_ensemble (no Python stub
    # around the graph; both Kubernetes overlays). Same inputs and outputs.
    triton_model: str = paths.TEXT_ENCODER_MODEL
    encoder_threads: int = 0
    # In-process encoder only; Triton's precision is a model config parameter.
    precision: str = DEFAULT_PRECISION
    cache_dir: str = str(paths.cache_dir())
    max_texts_per_request: int = 256
    max_text_chars: int = 4096
    max_k: int = 1000
    # FAISS threads per search: concurrent requests already use the cores,
    # and OpenMP teams per small search cost more than they save.
    faiss_threads: int = 1
    # Force FAISS onto CPU even where GPUs exist (None: use them when present).
    use_gpu: bool | None = None
    # Which FAISS index each category's (and the global) index uses:
    # auto picks by size (recsys_core/index/kinds.py; docs/performance.md,
    # "Approximate index"), flat|hnsw|ivfpq force one.
    index: IndexSettings = IndexSettings()

    @classmethod
    def from_env(cls, environ=None) -> "EmbeddingConfig":
        env = EnvReader("EMBEDDING_", environ)
        gpu = env.str("USE_GPU", "auto")
        if gpu not in ("auto", "true", "false"):
            raise ValueError(f"EMBEDDING_USE_GPU={gpu!r} must be auto, true or false")
        return cls(
            address=env.str("ADDRESS", cls.address),
            workers=env.int("WORKERS", cls.workers, minimum=1, maximum=256),
            grace_seconds=env.float("GRACE_SECONDS", cls.grace_seconds, minimum=0),
            metrics_port=env.int("METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            health_port=env.optional_int("HEALTH_PORT", minimum=1, maximum=65535),
            security=Security.from_env(env, "embedding"),
            auth=AuthConfig.from_env(env),
            tracing=TracingConfig.from_env(env),
            catalogue_store=env.choice("CATALOGUE_STORE", cls.catalogue_store, STORES),
            catalogue_path=env.str("CATALOGUE_PATH", cls.catalogue_path),
            catalogue_redis_url=env.str("CATALOGUE_REDIS_URL", cls.catalogue_redis_url),
            catalogue_redis_prefix=env.str("CATALOGUE_REDIS_PREFIX", cls.catalogue_redis_prefix),
            catalogue_redis_username=env.str("CATALOGUE_REDIS_USERNAME", cls.catalogue_redis_username),
            catalogue_redis_password_file=env.str("CATALOGUE_REDIS_PASSWORD_FILE", cls.catalogue_redis_password_file),
            catalogue_redis_durability=env.choice("CATALOGUE_REDIS_DURABILITY", cls.catalogue_redis_durability,
                                                  DURABILITY_LEVELS),
            catalogue_redis_mode=env.choice("CATALOGUE_REDIS_MODE", cls.catalogue_redis_mode, MODES),
            catalogue_redis_cluster_nodes=env.host_ports("CATALOGUE_REDIS_CLUSTER_NODES"),
            # Above a second a change could not reach every replica within the 1 s bound.
            catalogue_poll_seconds=env.float("CATALOGUE_POLL_SECONDS", cls.catalogue_poll_seconds, minimum=0.01,
                                             maximum=1.0),
            limits=service_limits(env, "embedding"),
            data_dir=env.str("DATA_DIR", cls.data_dir),
            retail_dir=env.optional_path("RETAIL_DIR", cls.retail_dir),
            model_repo=env.str("MODEL_REPO", cls.model_repo),
            model_dir=env.str("MODEL_DIR", cls.model_dir),
            model_registry=env.str("MODEL_REGISTRY", cls.model_registry),
            model_poll_seconds=env.float("MODEL_POLL_SECONDS", cls.model_poll_seconds, minimum=0.05, maximum=60),
            triton_model_control=env.choice("TRITON_MODEL_CONTROL", cls.triton_model_control, TRITON_MODEL_CONTROLS),
            triton_load_wait_seconds=env.float("TRITON_LOAD_WAIT_SECONDS", cls.triton_load_wait_seconds, minimum=1,
                                               maximum=3600),
            encoder=env.choice("ENCODER", cls.encoder, ENCODER_BACKENDS),
            triton_url=env.str("TRITON_URL", cls.triton_url),
            triton_model=env.str("TRITON_MODEL", cls.triton_model),
            encoder_threads=env.int("ENCODER_THREADS", cls.encoder_threads, minimum=0),
            precision=env.choice("ENCODER_PRECISION", cls.precision, PRECISIONS),
            cache_dir=env.str("CACHE_DIR", str(paths.cache_dir())),
            max_texts_per_request=env.int("MAX_TEXTS_PER_REQUEST", cls.max_texts_per_request, minimum=1),
            max_text_chars=env.int("MAX_TEXT_CHARS", cls.max_text_chars, minimum=1),
            max_k=env.int("MAX_K", cls.max_k, minimum=1),
            faiss_threads=env.int("FAISS_THREADS", cls.faiss_threads, minimum=1),
            use_gpu=None if gpu == "auto" else gpu == "true",
            index=index_settings(env),
        )

    def __post_init__(self):
        if self.triton_model_control not in TRITON_MODEL_CONTROLS:
            raise ConfigError(f"EMBEDDING_TRITON_MODEL_CONTROL must be one of {', '.join(TRITON_MODEL_CONTROLS)}, "
                              f"not {self.triton_model_control!r}")
        if self.model_dir and self.model_registry:
            raise ConfigError("EMBEDDING_MODEL_DIR and EMBEDDING_MODEL_REGISTRY are exclusive: serve one model "
                              "directory, or the registry's promoted sequence model")
        if self.model_registry and self.encoder == "triton" and self.triton_model != paths.TEXT_ENCODER_MODEL:
            raise ConfigError(f"EMBEDDING_MODEL_REGISTRY with Triton installs each promoted encoder as a version "
                              f"of {paths.TEXT_ENCODER_MODEL}: EMBEDDING_TRITON_MODEL must be that model, "
                              f"not {self.triton_model!r}")

    @property
    def data_path(self) -> Path | None:
        return Path(self.data_dir) if self.data_dir else None

    @property
    def retail_path(self) -> Path | None:
        return Path(self.retail_dir) if self.retail_dir else None


def index_settings(env: EnvReader) -> IndexSettings:
    default = IndexSettings()
    try:
        return IndexSettings(
            kind=env.choice("INDEX", default.kind, INDEX_KINDS),
            hnsw_min_items=env.int("INDEX_HNSW_MIN_ITEMS", default.hnsw_min_items, minimum=1),
            ivfpq_min_items=env.int("INDEX_IVFPQ_MIN_ITEMS", default.ivfpq_min_items, minimum=1),
            hnsw_m=env.int("HNSW_M", default.hnsw_m, minimum=2, maximum=256),
            hnsw_ef_construction=env.int("HNSW_EF_CONSTRUCTION", default.hnsw_ef_construction, minimum=1),
            hnsw_ef_search=env.int("HNSW_EF_SEARCH", default.hnsw_ef_search, minimum=1),
            ivf_nprobe=env.int("IVF_NPROBE", default.ivf_nprobe, minimum=1),
            pq_m=env.int("PQ_M", default.pq_m, minimum=1),
            refine_factor=env.int("INDEX_REFINE_FACTOR", default.refine_factor, minimum=1),
            rebuild_fraction=env.float("INDEX_REBUILD_FRACTION", default.rebuild_fraction, minimum=0.01, maximum=1),
        )
    except ConfigError:
        raise
    except ValueError as error:  # a combination the single values allow, e.g. IVF-PQ below HNSW
        raise ConfigError(f"EMBEDDING_INDEX settings: {error}") from None
