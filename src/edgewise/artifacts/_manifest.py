"""The bundle manifest, `edgewise.json`, format version 1.

Invariant: a manifest that parsed is internally consistent: every path it names is a safe
relative path inside the bundle, the model is listed among the files, and the golden set
describes a health check the device can run without any other information.

Four kinds of bundle share the format: image models (`BundleManifest`: ONNX, a golden set of
input tensors; an object detector's golden set holds the boxes it must find, and its
`detection` section how they are compared), LLMs (`LlmManifest`: a GGUF file, golden
prompts, a perplexity bound), container apps (`AppManifest`: an OCI image layout whose
blobs are the bundle's files, plus the health check, restart policy and environment the
device runs it with) and configuration files (`ConfigManifest`: the files themselves, how
the device checks them, and the app that reads them, if any). An LLM adapter
(`LlmAdapterManifest`: a GGUF LoRA adapter) names the base model it applies to by the
sha256 of the base's GGUF.
A manifest names the reader features it needs in `requires`; a reader that lacks one refuses
the manifest with a message that says to update, before any other file is fetched.

Every bundle is one **component** of its device (`component_of`): the agent serves one model
itself (image model, LLM or adapter: the component "model", whatever the release's name), and
runs each container app and each set of configuration files as the component of its name.
A bundle may `depends` on releases of other components by name and version range
(`{"fashion": ">=3,<4"}`, PEP 440 specifiers); such a manifest requires the reader feature
"depends".
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._errors import BundleError

__all__ = [
    "FEATURES",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "AppHealth",
    "AppManifest",
    "AppSpec",
    "BundleManifest",
    "CONFIG_FORMATS",
    "ConfigCheck",
    "ConfigManifest",
    "ConfigSpec",
    "GenerationDefaults",
    "HttpProbe",
    "GoldenPrompt",
    "AdapterSpec",
    "LlmAdapterManifest",
    "LlmManifest",
    "LlmSpec",
    "Manifest",
    "DetectorSpec",
    "FileEntry",
    "ObjectDetectionSpec",
    "GeneratorSpec",
    "GoldenSpec",
    "OCI_INDEX",
    "OCI_LAYOUT",
    "Preprocessing",
    "MODEL_COMPONENT",
    "NAMED_KINDS",
    "check_relative_path",
    "component_of",
    "satisfies",
    "unmet_dependencies",
    "oci_blob_path",
    "parse_manifest",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "edgewise.json"
# Reader features a manifest may require (`requires`); image bundles require none, so readers
# that predate the field still read them.
FEATURES = frozenset({"llm-gguf", "llm-lora", "oci-app", "object-detection", "depends",
                      "config-file"})
# The component of every bundle kind the agent serves itself (one at a time: the local API's).
MODEL_COMPONENT = "model"


# Kinds whose releases are each a component of their own name (the rest are the model).
NAMED_KINDS = frozenset({"app", "config"})


def component_of(kind: str, name: str) -> str:
    """The device component a release of this kind and name is: "model", or the name of an
    app or of a set of configuration files."""
    return name if kind in NAMED_KINDS else MODEL_COMPONENT


def _specifier(spec: str):
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        return SpecifierSet(spec)
    except InvalidSpecifier:
        raise ValueError(f"invalid version range {spec!r} (use e.g. '>=3', '>=2,<4', "
                         "'==1.0.0')") from None


def satisfies(version: str, spec: str) -> bool:
    """Whether release version `version` is in the range `spec` (pre-releases count)."""
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return False  # not a PEP 440 version: no range can be sure of it
    return _specifier(spec).contains(parsed, prereleases=True)


def unmet_dependencies(depends: dict[str, str], have: dict[str, str]) -> list[str]:
    """Why `depends` (release name -> version range) is not met by `have` (release name ->
    the version there); empty when it is."""
    problems = []
    for name, spec in sorted(depends.items()):
        version = have.get(name)
        if version is None:
            problems.append(f"{name} {spec} (none installed)")
        elif not satisfies(version, spec):
            problems.append(f"{name} {spec} (it has {name}@{version})")
    return problems


def check_relative_path(path: str) -> str:
    """Return `path` if it is a safe, normalised, relative POSIX path; raise otherwise."""
    if not path or path.strip() != path:
        raise BundleError(f"invalid file path {path!r}: empty or padded with spaces")
    if "\\" in path or "\x00" in path:
        raise BundleError(f"invalid file path {path!r}: backslashes and NUL are not allowed")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise BundleError(f"invalid file path {path!r}: absolute paths are not allowed")
    parts = path.split("/")
    if ".." in parts:
        raise BundleError(f"invalid file path {path!r}: '..' is not allowed")
    if posixpath.normpath(path) != path or "." in parts:
        raise BundleError(f"invalid file path {path!r}: not normalised")
    return path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Preprocessing(_Strict):
    """What the device does to a raw image before it is fed to the model.

    Pixels are scaled to [0, 1], resized to `input_size` (height, width), converted to
    `channels` (1 = grayscale, 3 = RGB), normalised with `(x - mean) / std` per channel and
    laid out as `layout`.
    """

    input_size: tuple[int, int]
    channels: Literal[1, 3]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    input_name: str = "input"

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if min(self.input_size) <= 0:
            raise ValueError("input_size must be positive")
        return self

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        h, w = self.input_size
        if self.layout == "NCHW":
            return (batch, self.channels, h, w)
        return (batch, h, w, self.channels)


class GoldenSpec(_Strict):
    """The device health check: inputs with the outputs the model must reproduce."""

    file: str
    count: int = Field(ge=1)
    atol: float = Field(gt=0)
    max_latency_ms: float = Field(gt=0)

    @field_validator("file")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        return check_relative_path(v)


class DetectorSpec(_Strict):
    """An anomaly / drift score the device computes next to each prediction.

    `model` maps a preprocessed input to one score per image (output `output`, higher = less
    like the training data); an image is anomalous when its score exceeds `threshold`, which
    was calibrated on validation data to `target_fpr`. `histogram_edges` are the score bins
    the device aggregates into (the only thing about its inputs it ever reports).
    """

    model: str
    output: str = "score"
    method: str
    threshold: float
    target_fpr: float = Field(gt=0, lt=1)
    histogram_edges: tuple[float, ...]

    @field_validator("model")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        return check_relative_path(v)

    @field_validator("histogram_edges")
    @classmethod
    def _sorted(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) < 2 or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("histogram_edges must hold at least two increasing values")
        return v


class GeneratorSpec(_Strict):
    """A decoder that turns latent vectors (and, if conditional, a class) into images in [0, 1]:
    inputs `z` [N, latent_dim] and, when `conditional`, `label` one-hot [N, len(labels)];
    output `image` [N, C, H, W]. A diffusion model's sampler has the same contract (z is its
    starting noise). `denoiser`, if any, maps (`noisy` [N, C, H, W] in [0, 1], `sigma` [N], the
    noise's standard deviation in the same units) to `clean` [N, C, H, W]."""

    model: str
    latent_dim: int = Field(ge=1)
    conditional: bool
    denoiser: str | None = None

    @field_validator("model", "denoiser")
    @classmethod
    def _safe_path(cls, v: str | None) -> str | None:
        return None if v is None else check_relative_path(v)


class ObjectDetectionSpec(_Strict):
    """An object detector (`kind: object-detector`, section `detection`; not `detector`, the
    anomaly score some image bundles carry): what its ONNX graph returns and how the device
    checks it.

    The model maps the preprocessed image (input `preprocessing.input_name`, batch 1) to
    `boxes` float32 [N, 4] (x1, y1, x2, y2 in input pixels), `scores` float32 [N] (sorted
    descending) and `labels` int64 [N] indexing the manifest's `labels`, N <= `max_detections`;
    decoding and NMS are inside the graph. `contract` is the same contract as JSON, for any
    other tool.

    A detection counts from `min_score` on: the local API returns those, and the health check
    compares those. The golden set's outputs are the boxes the model found at build time,
    float32 [count, M, 6] rows of (x1, y1, x2, y2, score, label), padded with label -1. On the
    device a golden box is found when a detection of the same label overlaps it by IoU >=
    `iou_threshold`; the release is healthy when at least `min_recall` of the golden boxes are
    found and at least `min_precision` of its detections are golden boxes. Scores near
    `min_score` flicker between builds (int8, another CPU), so a box matches a counterpart
    scoring down to half of `min_score`."""

    contract: str = "detector.json"
    max_detections: int = Field(ge=1)
    min_score: float = Field(gt=0, le=1)
    iou_threshold: float = Field(default=0.5, gt=0, le=1)
    min_recall: float = Field(default=0.9, ge=0, le=1)
    min_precision: float = Field(default=0.9, ge=0, le=1)

    @field_validator("contract")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        return check_relative_path(v)


class _ManifestBase(_Strict):
    """What every bundle kind has: identity, files, provenance."""

    format_version: int
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
    files: dict[str, FileEntry]
    created_at: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    requires: tuple[str, ...] = ()
    # Release name of another component -> the version range this release needs it at.
    depends: dict[str, str] = Field(default_factory=dict)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"unknown bundle format version {v} (this Edgewise reads {FORMAT_VERSION})")
        return v

    @field_validator("files")
    @classmethod
    def _safe_paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for path in files:
            check_relative_path(path)
            if path == MANIFEST_NAME:
                raise ValueError(f"{MANIFEST_NAME} must not list itself")
        return files

    @field_validator("depends")
    @classmethod
    def _ranges(cls, depends: dict[str, str]) -> dict[str, str]:
        for name, spec in depends.items():
            if not re.match(r"^[a-z0-9][a-z0-9._-]{0,63}$", name):
                raise ValueError(f"depends: {name!r} is not a release name")
            _specifier(spec)
        return depends

    @model_validator(mode="after")
    def _depends_feature(self) -> _ManifestBase:
        if self.depends and "depends" not in self.requires:
            raise ValueError("a bundle with depends must require the reader feature 'depends' "
                             "(older agents then refuse it instead of ignoring them)")
        if self.name in self.depends:
            raise ValueError(f"{self.name} cannot depend on itself")
        return self

    @property
    def release_name(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def component(self) -> str:
        return component_of(getattr(self, "kind", ""), self.name)

    def _dump(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if not data["depends"]:
            del data["depends"]  # readable by agents that predate the field
        return data

    def _listed(self, role: str, path: str, suffix: str) -> None:
        check_relative_path(path)
        if not path.endswith(suffix):
            raise ValueError(f"{role} file {path!r} must be a {suffix} file")
        if path not in self.files:
            raise ValueError(f"{role} file {path!r} is not listed in files")


class BundleManifest(_ManifestBase):
    # "generator": `model` computes the anomaly score (the health check runs it); the decoder
    # is named by `generator`. "object-detector": `model` finds boxes (`detection`), `labels`
    # are its classes.
    kind: Literal["image-classifier", "generator", "object-detector"] = "image-classifier"
    model: str = "model.onnx"
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    golden: GoldenSpec
    # Optional sections: absent from manifests that do not use them, so bundles written before
    # they existed (and agents that predate them) are unaffected.
    detector: DetectorSpec | None = None
    generator: GeneratorSpec | None = None
    detection: ObjectDetectionSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        check_relative_path(self.model)
        if not self.model.endswith(".onnx"):
            raise ValueError(f"model file {self.model!r} must be an .onnx file")
        roles = [("model", self.model), ("golden set", self.golden.file)]
        if self.detector is not None:
            roles.append(("detector model", self.detector.model))
        if self.generator is not None:
            roles.append(("generator model", self.generator.model))
            if self.generator.denoiser is not None:
                roles.append(("denoiser model", self.generator.denoiser))
        if self.kind == "generator" and self.generator is None:
            raise ValueError("a generator bundle needs a generator section")
        if (self.kind == "object-detector") != (self.detection is not None):
            raise ValueError("an object-detector bundle has a detection section, and only it")
        if self.detection is not None:
            if "object-detection" not in self.requires:
                raise ValueError("an object-detector bundle must require the reader feature "
                                 "'object-detection'")
            if self.detection.contract not in self.files:
                raise ValueError(f"detector contract {self.detection.contract!r} is not listed "
                                 "in files")
        for role, path in roles:
            if not path.endswith(".onnx") and role != "golden set":
                raise ValueError(f"{role} file {path!r} must be an .onnx file")
            if path not in self.files:
                raise ValueError(f"{role} file {path!r} is not listed in files")
        if not self.labels:
            raise ValueError("a classifier needs at least one label")
        return self

    def to_json(self) -> str:
        data = self._dump()
        for optional in ("detector", "generator", "detection"):
            if data[optional] is None:
                del data[optional]
        if not data["requires"]:
            del data["requires"]  # readable by agents that predate the field
        if data.get("generator", {}).get("denoiser", "") is None:
            del data["generator"]["denoiser"]  # readable by agents that predate denoisers
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


class GoldenPrompt(_Strict):
    """One health-check question: the greedy answer must contain one of `accept` (any case)."""

    prompt: str = Field(min_length=1, max_length=4000)
    accept: tuple[str, ...] = Field(min_length=1)
    max_tokens: int = Field(default=48, ge=1, le=1024)


class GenerationDefaults(_Strict):
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_tokens: int = Field(default=256, ge=1)


class LlmSpec(_Strict):
    """A GGUF model and the contract its device health check enforces.

    `ram_mb` is what running it at `n_ctx` needs (GGUF block arithmetic + KV cache + runtime,
    checked at build time against the measured peak RSS); the health check refuses a model
    that does not fit the device, answers a golden prompt wrongly, generates slower than
    `min_gen_tok_s` or scores a perplexity above `max_perplexity` on `eval_text`."""

    model: str
    architecture: str
    n_params: int = Field(ge=1)
    file_type: str
    tensor_types: dict[str, int]
    context_length: int = Field(ge=0)  # what the model was trained for
    n_ctx: int = Field(ge=64)  # what the device runs it with
    chat_template: str = Field(min_length=1)
    chat_template_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    generation: GenerationDefaults = GenerationDefaults()
    ram_mb: float = Field(gt=0)
    min_gen_tok_s: float = Field(ge=0)
    golden: tuple[GoldenPrompt, ...] = Field(min_length=1)
    eval_text: str
    max_perplexity: float = Field(gt=1)
    # Build-time measurements (rss, tokens/s, perplexity, threads, machine): for the record.
    reference: dict[str, Any] = Field(default_factory=dict)


class LlmManifest(_ManifestBase):
    kind: Literal["llm"] = "llm"
    requires: tuple[str, ...] = ("llm-gguf",)
    llm: LlmSpec

    @model_validator(mode="after")
    def _consistent(self) -> LlmManifest:
        self._listed("model", self.llm.model, ".gguf")
        self._listed("evaluation text", self.llm.eval_text, ".txt")
        if "llm-gguf" not in self.requires:
            raise ValueError("an LLM bundle must require the reader feature 'llm-gguf'")
        return self

    def to_json(self) -> str:
        return json.dumps(self._dump(), indent=2, sort_keys=True) + "\n"


class HttpProbe(_Strict):
    """GET http://127.0.0.1:PORT/PATH must answer `expect_status` (the app shares the
    device's network namespace: host networking, loopback only)."""

    port: int = Field(ge=1, le=65535)
    path: str = Field(default="/health", pattern=r"^/[!-~]{0,255}$")
    expect_status: int = Field(default=200, ge=100, le=599)


class AppHealth(_Strict):
    """The health check the agent itself runs (OCI images carry none: Docker's HEALTHCHECK
    is dropped in OCI format). One probe is an HTTP GET on loopback or a command run inside
    the container (exit 0 = healthy), each bounded by `timeout_s`. The agent probes every
    `interval_s`; the app is healthy at the first probe that passes and unhealthy after
    `retries` failed probes or as soon as its container exits (also when its restart policy
    restarted it: a crash during the check)."""

    http: HttpProbe | None = None
    command: tuple[str, ...] | None = None
    timeout_s: float = Field(default=3.0, gt=0, le=300)
    interval_s: float = Field(default=0.5, gt=0, le=60)
    retries: int = Field(default=20, ge=1, le=10_000)

    @model_validator(mode="after")
    def _one_probe(self) -> AppHealth:
        if (self.http is None) == (self.command is None):
            raise ValueError("an app health check is either http or command, exactly one")
        if self.command is not None and not self.command:
            raise ValueError("an app health command needs at least the program")
        return self


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class AppSpec(_Strict):
    """A container app: which image of the bundle's OCI layout runs (`ref`, the layout's
    `org.opencontainers.image.ref.name`, and `digest`, its manifest blob) and how the device
    runs it. `image` is the name it was built or imported as (for the record)."""

    image: str = Field(min_length=1, max_length=255)
    ref: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    health: AppHealth
    # podman/docker's --restart: no, always, unless-stopped, on-failure[:N]
    restart: str = Field(default="on-failure:3",
                         pattern=r"^(no|always|unless-stopped|on-failure(:[0-9]{1,4})?)$")
    env: dict[str, str] = Field(default_factory=dict)
    ports: tuple[int, ...] = ()  # what the app listens on (host network): for the record

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not re.match(_ENV_NAME, key):
                raise ValueError(f"invalid environment variable name {key!r}")
            if "\x00" in value:
                raise ValueError(f"environment variable {key} holds a NUL byte")
        return env

    @field_validator("ports")
    @classmethod
    def _port_range(cls, ports: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= p <= 65535 for p in ports):
            raise ValueError("ports are 1..65535")
        return ports

    @property
    def manifest_blob(self) -> str:
        return oci_blob_path(self.digest)


OCI_INDEX = "index.json"
OCI_LAYOUT = "oci-layout"


def oci_blob_path(digest: str) -> str:
    """`sha256:HEX` -> the blob's path inside an OCI image layout (and inside the bundle)."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


class AppManifest(_ManifestBase):
    kind: Literal["app"] = "app"
    requires: tuple[str, ...] = ("oci-app",)
    app: AppSpec

    @model_validator(mode="after")
    def _consistent(self) -> AppManifest:
        if "oci-app" not in self.requires:
            raise ValueError("an app bundle must require the reader feature 'oci-app'")
        if self.name == MODEL_COMPONENT:
            raise ValueError(f"an app cannot be named {MODEL_COMPONENT!r}: that is the "
                             "component of the model the agent serves")
        for role, path in (("OCI index", OCI_INDEX), ("OCI layout marker", OCI_LAYOUT),
                           ("image manifest", self.app.manifest_blob)):
            if path not in self.files:
                raise ValueError(f"{role} {path!r} is not listed in files")
        for path, entry in self.files.items():
            # Content-addressed: a blob's name is its hash, so it is one TUF target per
            # content and a device that holds it never fetches it again.
            if path.startswith("blobs/") and path != f"blobs/sha256/{entry.sha256}":
                raise ValueError(f"{path}: an OCI blob must be named blobs/sha256/<its sha256>")
        return self

    def to_json(self) -> str:
        return json.dumps(self._dump(), indent=2, sort_keys=True) + "\n"


class AdapterSpec(_Strict):
    """A GGUF LoRA adapter (llama.cpp's format) and the base it was trained on.

    `base_sha256` is the sha256 of the base bundle's GGUF file: an adapter means nothing on
    other weights, so a reader applies it only to that exact file. `golden` are prompts that
    show the new behaviour (measured with llama.cpp, base + adapter, at build time); the
    base's own golden prompts must still pass with the adapter loaded."""

    adapter: str
    format: Literal["gguf-lora"] = "gguf-lora"
    base_release: str
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    base_chat_template_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rank: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0)
    target_modules: tuple[str, ...] = Field(min_length=1)
    n_ctx: int = Field(ge=64)
    golden: tuple[GoldenPrompt, ...] = Field(min_length=1)
    base_golden: tuple[GoldenPrompt, ...] = ()
    # Build-time measurements (losses, golden results with and without the adapter).
    reference: dict[str, Any] = Field(default_factory=dict)


class LlmAdapterManifest(_ManifestBase):
    kind: Literal["llm-adapter"] = "llm-adapter"
    requires: tuple[str, ...] = ("llm-lora",)
    adapter: AdapterSpec

    @model_validator(mode="after")
    def _consistent(self) -> LlmAdapterManifest:
        self._listed("adapter", self.adapter.adapter, ".gguf")
        if "llm-lora" not in self.requires:
            raise ValueError("an LLM adapter bundle must require the reader feature 'llm-lora'")
        return self

    def to_json(self) -> str:
        return json.dumps(self._dump(), indent=2, sort_keys=True) + "\n"


# How the device checks a configuration file before it becomes active.
CONFIG_FORMATS = ("json", "toml", "text")
_RELEASE_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# Written into every slot by the agent (`agent._slots`): no configuration file may take it.
_SLOT_META = "slot.json"


class ConfigCheck(_Strict):
    """A command the agent runs on the device before the files become active: argv (no
    shell), in the directory of the new files (also in `EDGEWISE_CONFIG_DIR`); exit 0 means
    valid. Killed after `timeout_s`."""

    command: tuple[str, ...] = Field(min_length=1)
    timeout_s: float = Field(default=10.0, gt=0, le=600)


class ConfigSpec(_Strict):
    """Configuration files: each file of `formats` must parse as that format (`text`: UTF-8)
    before it is activated, `check` (if any) must pass, and `app`, the app component that
    reads them (if any), sees them read-only at `mount` inside its container, is restarted
    with them, and its health check is theirs."""

    formats: dict[str, Literal["json", "toml", "text"]] = Field(default_factory=dict)
    check: ConfigCheck | None = None
    app: str | None = Field(default=None, pattern=_RELEASE_NAME)
    mount: str | None = Field(default=None, pattern=r"^/[A-Za-z0-9._/-]{0,254}$")


class ConfigManifest(_ManifestBase):
    kind: Literal["config"] = "config"
    requires: tuple[str, ...] = ("config-file",)
    config: ConfigSpec = ConfigSpec()

    @model_validator(mode="after")
    def _consistent(self) -> ConfigManifest:
        if "config-file" not in self.requires:
            raise ValueError("a config bundle must require the reader feature 'config-file'")
        if self.name == MODEL_COMPONENT:
            raise ValueError(f"configuration files cannot be named {MODEL_COMPONENT!r}: that "
                             "is the component of the model the agent serves")
        if not self.files:
            raise ValueError("a config bundle holds at least one file")
        for path in self.files:
            if path == _SLOT_META:
                raise ValueError(f"{_SLOT_META} is the device's own slot record: rename the "
                                 "file")
            if any(part.startswith(".") for part in path.split("/")):
                raise ValueError(f"{path!r}: hidden files (a name starting with '.') are not "
                                 "installed on the device: rename it")
        for path in self.config.formats:
            if path not in self.files:
                raise ValueError(f"formats: {path!r} is not listed in files")
        if self.config.app == self.name:
            raise ValueError(f"{self.name}: the app that reads the files needs a name of its "
                             "own")
        if self.config.mount is not None:
            check_relative_path(self.config.mount[1:])
        return self

    @property
    def mount(self) -> str:
        """Where the app sees the files inside its container."""
        return self.config.mount or f"/etc/edgewise/config/{self.name}"

    def to_json(self) -> str:
        return json.dumps(self._dump(), indent=2, sort_keys=True) + "\n"


Manifest = BundleManifest | LlmManifest | LlmAdapterManifest | AppManifest | ConfigManifest


def parse_manifest(data: bytes | str) -> Manifest:
    """Parse and validate manifest bytes; every failure is a `BundleError` with a clear message."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{MANIFEST_NAME} must hold a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"unknown bundle format version {version!r} (this Edgewise reads {FORMAT_VERSION})"
        )
    requires = raw.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(f, str) for f in requires):
        raise BundleError(f"invalid {MANIFEST_NAME}: requires must be a list of feature names")
    missing = sorted(set(requires) - FEATURES)
    if missing:
        raise BundleError(f"{raw.get('name', '?')}@{raw.get('version', '?')} needs features "
                          f"this Edgewise does not have ({', '.join(missing)}): update the "
                          "agent to install it")
    cls = {"llm": LlmManifest, "llm-adapter": LlmAdapterManifest,
           "app": AppManifest, "config": ConfigManifest}.get(raw.get("kind"), BundleManifest)
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}"
            for err in exc.errors()
        )
        raise BundleError(f"invalid {MANIFEST_NAME}: {problems}") from exc
    except BundleError:
        raise
