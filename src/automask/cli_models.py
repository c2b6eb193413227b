"""`automask models list|pull|rm|export`: the model catalogue on the command line (added to `main` in cli.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from automask.cli_io import check_stdout, json_safe, root_settings
from automask.cli_signals import signals_interrupt
from automask.errors import AutomaskError
from automask.settings import Settings

if TYPE_CHECKING:
    from automask.models import ModelInfo


@click.group()
def models() -> None:
    """List, download and remove models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """The models automask knows: name, backend, whether installed, and where."""
    from automask.models import list_models
    from automask.staging import check_models_folder

    check_stdout()  # closed (`>&-`): exit 8 before the work, as mask and batch do
    settings = root_settings(ctx)
    check_models_folder(settings.models_dir)  # a file there: every model would show as not installed
    notes = _tidy(settings)  # either form: a script's `--json` tidies as a person's table does
    infos = list_models(settings)
    onnx = {m.name: _onnx_exports(m.backend, m.path) if m.installed else None for m in infos}
    if as_json:
        keys = ("name", "backend", "installed", "path", "description", "source")
        rows = [json_safe({**{k: _jsonable(getattr(m, k)) for k in keys}, "onnx": onnx[m.name]}) for m in infos]
        click.echo(json.dumps(rows))  # json_safe: a path that is not UTF-8 is written \xNN, not a lone surrogate
    else:
        _table(infos, onnx)
    if not all(m.installed for m in infos):
        click.echo("Install a model with: automask models pull NAME", err=True)
    for note in notes:
        click.echo(note, err=True)
    if as_json:
        return
    from automask.routing import vocabulary_lines

    click.echo("\nThe embedded 'subject' model answers these prompt words (others need an open-vocabulary model):")
    for line in vocabulary_lines():
        click.echo(f"  {line}")


def _tidy(settings: Settings) -> list[str]:
    """Remove what killed pulls and removals of the catalogue models left (`staging.tidy`: hidden folders, GBs
    maybe, that nothing else deletes); return a note ("NAME: ...") for each failed pull's download kept to resume."""
    from automask.models import CATALOGUE, model_dir
    from automask.staging import partial_note, tidy

    notes = []
    for name in CATALOGUE:
        tidy(model_dir(name, settings))
        if note := partial_note(model_dir(name, settings)):
            notes.append(f"{name}: {note}")
    return notes


def _table(infos: list[ModelInfo], onnx: dict[str, list[str] | None]) -> None:
    """Print `models list`'s table (`onnx`: each model's ONNX exports, `_onnx_exports`)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "backend", "installed", "onnx")
    table.add_column("path", overflow="fold")
    table.add_column("description")
    for m in infos:
        installed = ("yes" + (f" ({m.source})" if m.source else "")) if m.installed else "no"
        exports = onnx[m.name]
        shown = "" if exports is None else ", ".join(exports) or "no"
        table.add_row(m.name, m.backend, installed, shown, str(m.path), m.description)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download again even when installed (a damaged or incomplete model).")
@click.pass_context
def models_pull(ctx: click.Context, name: str, force: bool) -> None:
    """Download model NAME (e.g. clipseg) into the data folder, with a progress bar."""
    from automask.models import pull

    settings = root_settings(ctx)
    with signals_interrupt():  # SIGTERM/SIGHUP unwind as Ctrl-C does: no half-written model folder is left
        path = pull(name, settings, progress=True, force=force)  # on Ctrl-C, says where its bytes wait
        click.echo(f"{name} installed in {path}")
        _export_after_pull(name, path, settings)


@models.command("rm")
@click.argument("name")
@click.pass_context
def models_rm(ctx: click.Context, name: str) -> None:
    """Delete model NAME (and its ONNX export) from the data folder; never the Hugging Face cache."""
    from automask.models import CATALOGUE, model_dir
    from automask.models_rm import hf_cache_rm, remove
    from automask.staging import check_models_folder

    if name not in CATALOGUE:
        raise click.BadParameter(f"no model '{name}': automask models list shows the models.", param_hint="NAME")
    settings = root_settings(ctx)
    check_models_folder(settings.models_dir)  # a file there: not "not installed"
    removed = remove(name, settings)
    for path in removed.paths:
        click.echo(f"removed {path}")
    if removed.kept is not None:
        click.echo(
            f"note: '{model_dir(name, settings)}' was a link: the folder it points to, '{removed.kept}', is kept "
            "(delete it yourself if nothing else uses it)",
            err=True,
        )
    if removed.cached is not None:
        click.echo(
            f"note: {name} is still installed from the Hugging Face cache, '{removed.cached}' (not deleted: other "
            f"programs share it; to delete it there: {hf_cache_rm(CATALOGUE[name])})",
            err=True,
        )


def _export_after_pull(name: str, path: Path, settings: Settings) -> None:
    """Give a pulled CLIPSeg model its fast ONNX Runtime graphs when torch is here to export them."""
    from automask.backends.clipseg_common import has_onnx
    from automask.models import CATALOGUE
    from automask.models_export import can_export, export_onnx

    if CATALOGUE[name].backend != "clipseg" or has_onnx(path, settings.int8):
        return
    if not can_export():
        click.echo(f'For the fast CPU runtime, run: pip install "automask[export]" && automask models export {name}')
        return
    click.echo("Exporting the ONNX Runtime graphs (once; about a minute)...", err=True)
    try:
        folder = export_onnx(str(path), settings)
    except AutomaskError as exc:  # the pull did its job: the model is installed and runs with torch
        click.echo(f"note: {exc.message}", err=True)
        return
    click.echo(f"ONNX Runtime graphs written to {folder}")


@models.command("export")
@click.argument("model", metavar="NAME_OR_PATH")
@click.option("--int8/--no-int8", default=None, help="Also write int8 graphs (not validated) [AUTOMASK_INT8].")
@click.pass_context
def models_export(ctx: click.Context, model: str, int8: bool | None) -> None:
    """Export CLIPSeg model NAME_OR_PATH to ONNX Runtime graphs (the fast CPU path; needs torch once)."""
    from automask.models_export import export_onnx

    def starting() -> None:
        click.echo("Exporting the ONNX Runtime graphs (about a minute)...", err=True)

    with signals_interrupt():
        folder = export_onnx(model, root_settings(ctx), int8=int8, starting=starting)
        click.echo(f"ONNX Runtime graphs written to {folder}")


def _onnx_exports(backend: str, path: Path) -> list[str] | None:
    """The ONNX Runtime graph sets present for a CLIPSeg model ("fp32", "int8"); None for other backends."""
    if backend != "clipseg":
        return None
    from automask.backends.clipseg_common import has_onnx, tidy_exports

    tidy_exports(path)  # what a killed `models export` left: its staging folder, the export it moved aside
    return [kind for kind, int8 in (("fp32", False), ("int8", True)) if has_onnx(path, int8)]


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value
