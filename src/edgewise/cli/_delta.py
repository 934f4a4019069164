"""`edgewise delta create|apply|info`: thin wrappers over `edgewise.artifacts.delta`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, fail, print_json

delta_app = typer.Typer(help="Delta patches between two versions of a model file.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(delta_app, name="delta")


def _existing_file(path: Path, what: str) -> None:
    if not path.is_file():
        fail(f"{what} {path} does not exist or is not a file")


def _check_out(out: Path, *inputs: Path) -> None:
    if not out.parent.is_dir():
        fail(f"output directory {out.parent} does not exist")
    for p in inputs:
        if p.exists() and out.exists() and out.resolve() == p.resolve():
            fail(f"output {out} would overwrite the input {p}")


@delta_app.command("create")
def create(
    old: Annotated[Path, typer.Argument(help="the file devices have now")],
    new: Annotated[Path, typer.Argument(help="the file they should end up with")],
    out: Annotated[Path, typer.Option("-o", "--out", help="patch file to write")],
    level: Annotated[int, typer.Option(min=1, max=22, help="zstd level of the final coding")]
    = 19,
    format_version: Annotated[int | None, typer.Option(
        "--format-version",
        help="newest patch format to use (1: no bit-length records, for decoders that read "
             "only version 1); default: the newest")] = None,
) -> None:
    """Make a patch that turns OLD into NEW (tensor-aware for safetensors, ONNX, GGUF)."""
    from ..artifacts.delta import FORMAT_VERSION, READABLE_VERSIONS, encode_delta

    if format_version is not None and format_version not in READABLE_VERSIONS:
        fail(f"--format-version must be one of {', '.join(map(str, READABLE_VERSIONS))}")
    _existing_file(old, "old file")
    _existing_file(new, "new file")
    _check_out(out, old, new)
    try:
        info = encode_delta(old, new, out, level=level,
                            max_version=format_version or FORMAT_VERSION)
    except OSError as exc:
        fail(f"cannot create the patch: {exc}")
    console.print(f"[green]patch written[/] {out}: {info.patch_size} bytes, "
                  f"{100 * info.ratio:.1f}% of {info.result_size} ({info.layout})")
    print_json(info.to_dict())


@delta_app.command("apply")
def apply(
    old: Annotated[Path, typer.Argument(help="the base file the patch was made from")],
    patch: Annotated[Path, typer.Argument(help="patch from `edgewise delta create`")],
    out: Annotated[Path, typer.Option("-o", "--out", help="where to write the new file")],
    expected_sha256: Annotated[str | None, typer.Option(
        "--sha256", help="refuse unless the result has this sha256 (e.g. the signed hash)")]
    = None,
) -> None:
    """Rebuild the new file from OLD and PATCH; nothing is written unless it verifies."""
    from ..artifacts import DeltaError
    from ..artifacts.delta import apply_delta

    _existing_file(old, "old file")
    _existing_file(patch, "patch")
    _check_out(out, old, patch)
    try:
        info = apply_delta(old, patch, out, expected_sha256=expected_sha256)
    except DeltaError as exc:
        fail(f"patch refused, nothing written: {exc}")
    except OSError as exc:
        fail(f"cannot apply the patch: {exc}")
    console.print(f"[green]rebuilt[/] {out}: {info.result_size} bytes, "
                  f"sha256 {info.result_sha256}")
    print_json(info.to_dict())


@delta_app.command("info")
def info(patch: Annotated[Path, typer.Argument(help="patch file")]) -> None:
    """Print a patch's base and result hashes and sizes (no decoding)."""
    from ..artifacts import DeltaError
    from ..artifacts.delta import read_delta_header

    _existing_file(patch, "patch")
    try:
        print_json(read_delta_header(patch).to_dict())
    except DeltaError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read the patch: {exc}")
