"""Model bundles (manifest + content-addressed files) and their validation."""

from ._bundle import (
    GOLDEN_NAME,
    MODEL_NAME,
    GoldenSet,
    file_sha256,
    load_golden,
    read_manifest,
    validate_bundle,
    write_bundle,
)
from ._errors import (
    ArtifactError,
    BundleError,
    DeltaBaseError,
    DeltaError,
    DeltaFormatError,
    DeltaResultError,
    DeltaTruncatedError,
    DeltaVersionError,
)
from ._manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BundleManifest,
    FileEntry,
    GoldenSpec,
    Preprocessing,
    check_relative_path,
    parse_manifest,
)

__all__ = [
    "FORMAT_VERSION",
    "GOLDEN_NAME",
    "MANIFEST_NAME",
    "MODEL_NAME",
    "ArtifactError",
    "BundleError",
    "BundleManifest",
    "DeltaBaseError",
    "DeltaError",
    "DeltaFormatError",
    "DeltaResultError",
    "DeltaTruncatedError",
    "DeltaVersionError",
    "FileEntry",
    "GoldenSet",
    "GoldenSpec",
    "Preprocessing",
    "check_relative_path",
    "file_sha256",
    "load_golden",
    "parse_manifest",
    "read_manifest",
    "validate_bundle",
    "write_bundle",
]
