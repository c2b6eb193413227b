"""README.md (and deploy/README.md) checked against the code: every `automask ...` command they show parses with the
real CLI, every flag, setting and environment variable the code accepts is documented and every documented one
exists, the production table's defaults are the settings', and every benchmark command names a script and flags that
exist. (The commands' behaviour is tested where each feature is; this keeps the front door from drifting.)"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from automask.cli import main
from automask.cli_exits import EXIT_HELP
from automask.server.config import ServerSettings
from automask.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEPLOY_README = (ROOT / "deploy" / "README.md").read_text()
TEST_ONLY = {"debug_delay"}
"""Server settings that exist for the tests alone, on purpose undocumented."""


def snippets(text: str) -> Iterator[str]:
    """Each line of the fenced code blocks of `text`, and each inline code span outside them."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    yield from (line for block in blocks for line in block.splitlines())
    yield from re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def automask_argvs(text: str) -> list[list[str]]:
    """The arguments of every `automask ...` command line in `text` (environment assignments before it, pipes,
    `&&` chains, redirections, comments and `...` placeholders taken off)."""
    argvs = []
    for snippet in snippets(text):
        for part in re.split(r" \| | && ", snippet):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:  # an unbalanced quote: prose, not a command
                continue
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words = words[1:]
            if words[:1] == ["automask"]:
                cut = next((i for i, w in enumerate(words) if w[:1] in "<>"), len(words))
                argvs.append([w for w in words[1:cut] if w != "..."])  # "...": the rest, left out
    return argvs


@pytest.mark.parametrize("name", ["README.md", "deploy/README.md"])
def test_every_automask_command_shown_parses(name: str) -> None:
    """No documented command uses a flag or subcommand the CLI lacks (`--help` stops each before it runs)."""
    argvs = automask_argvs((ROOT / name).read_text())
    assert len(argvs) >= (40 if name == "README.md" else 2)
    for argv in argvs:
        result = CliRunner().invoke(main, [*argv, "--help"])
        # a reference such as `automask mask --instances` may lack its arguments, never name an unknown flag
        wrong = re.search(r"No such (option|command)|unexpected extra argument", result.output)
        assert result.exit_code in (0, 2) and not wrong, (argv, result.output)
    check = CliRunner().invoke(main, ["mask", "a.jpg", "--no-such-flag", "--help"])  # the check works
    assert check.exit_code == 2 and "No such option '--no-such-flag'" in check.output


def commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command under `group`, with the words that name it (() for the group itself)."""
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_command_and_flag_is_documented() -> None:
    """Each subcommand is named in README.md, and each long flag of each command appears there."""
    for path, command in commands(main):
        assert " ".join(("automask", *path)) in " ".join(README.split()), path  # a line break is a space
        for param in command.params:
            for flag in getattr(param, "opts", []) if isinstance(param, click.Option) else []:
                if flag.startswith("--"):
                    assert re.search(rf"{re.escape(flag)}(?![\w-])", README), (path, flag)


def test_every_setting_is_documented_and_every_documented_variable_exists() -> None:
    known = {f"AUTOMASK_{name.upper()}" for name in Settings.model_fields} | {"AUTOMASK_DEBUG"}
    server = {f"AUTOMASK_SERVER_{name.upper()}" for name in set(ServerSettings.model_fields) - TEST_ONLY}
    for variable in known - {"AUTOMASK_DEBUG"}:
        assert variable in README, variable
    for variable in server:  # the README shortens them: `_PORT`, or `HEADER_TIMEOUT` in the production table
        short = variable.removeprefix("AUTOMASK_SERVER_")
        assert variable in README or re.search(rf"`_?{short}`", README), variable
    for text in (README, DEPLOY_README):
        for variable in set(re.findall(r"AUTOMASK_[A-Z0-9_]*[A-Z0-9]", text)) - {"AUTOMASK_SERVER"}:
            assert variable in known | server, variable
    for short in re.findall(r"`_([A-Z][A-Z0-9_]*)`", README):
        assert short.lower() in ServerSettings.model_fields, short


def test_the_production_table_states_the_settings_defaults_and_ceilings() -> None:
    """Each row `| --flag (NAME) | default (at most N) | ...` of "Running in production" against `ServerSettings`."""
    rows = re.findall(r"^\| (?:`--[\w-]+` \()?`([A-Z_]+)`\)? \| ([^|]+) \|", README, flags=re.M)
    assert len(rows) >= 10
    units = {"GiB": 2**30, "s": 1, "a": 1}  # "1 GiB", "10 s", "6000 a minute"
    for name, cell in rows:
        field = ServerSettings.model_fields[name.lower()]
        number, unit = re.match(r"(\d+)(?: (\w+))?", cell).groups()  # type: ignore[union-attr]
        assert float(number) * units.get(unit or "s", 1) == field.default, (name, cell)
        most = re.search(r"at most (\d+)", cell)
        ceiling = [m.le for m in field.metadata if getattr(m, "le", None) is not None]
        assert (float(most.group(1)) if most else None) == (ceiling[0] if ceiling else None), (name, cell)


def test_exit_code_table_is_the_clis() -> None:
    table = re.search(r"\| code \| meaning \|\n\| --- \| --- \|\n((?:\|.*\n)+)", README)
    assert table is not None
    codes = [int(row.split("|")[1]) for row in table.group(1).splitlines()]
    assert codes == [code for code, _ in EXIT_HELP]


def test_benchmark_commands_name_scripts_and_flags_that_exist() -> None:
    found = re.findall(r"python (bench/[\w]+\.py)([^`\n]*)", README)
    assert len(found) >= 8
    for script, args in found:
        source = (ROOT / script).read_text()
        for flag in re.findall(r"(?<!\S)(--[\w-]+)", args):
            assert f'"{flag}"' in source, (script, flag)


def test_torch_is_installed_as_its_cpu_wheel_before_the_project() -> None:
    """PyPI's torch for Linux is a CUDA build whatever the version pin: the README's install line takes the CPU wheel
    from PyTorch's index; .ci/run pins it first (our machines keep that wheel on disk and reach only the registries)
    and says how to get the CPU wheel elsewhere (PIP_EXTRA_INDEX_URL, which the README's second command names)."""
    cpu_index = "https://download.pytorch.org/whl/cpu"
    ci = (ROOT / ".ci" / "run").read_text()
    torch_at, project_at = ci.index("pip install -q torch==2.13.0"), ci.index('pip install -q -e ".[all,dev]"')
    assert torch_at < project_at and f"PIP_EXTRA_INDEX_URL={cpu_index}" in ci
    promise = next(p for p in README.split("\n\n") if "install torch's CPU wheel first" in p)
    assert f"--index-url {cpu_index}" in " ".join(promise.split())
    assert f"PIP_EXTRA_INDEX_URL={cpu_index}" in README.split("bash .ci/run")[0]


def test_refine_help_names_the_mask_heads_readme_names() -> None:
    """Before: `--refine`'s help and the API field's description said refine used SAM ('needs the sam model'), while
    README (and the code) take any installed mask head: sam, sam2 or edgetam, chosen by AUTOMASK_MASK_HEAD."""
    from automask.options import MaskOptions

    assert "(`AUTOMASK_MASK_HEAD`: `sam`, `sam2`, `edgetam`, or `auto`" in README
    assert Settings(mask_head="edgetam").mask_head == "edgetam"  # each head README names is a setting's value
    refine = next(p for p in main.commands["mask"].params if p.name == "refine")
    for text in (refine.help or "", MaskOptions.model_fields["refine"].description or ""):
        assert "AUTOMASK_MASK_HEAD" in text and all(re.search(rf"\b{h}\b", text) for h in ("sam", "sam2", "edgetam"))


def test_every_torch_install_line_says_which_build() -> None:
    """Before: the Grounded-SAM, Models and Scaling out lines ran a plain `pip install torch==2.13.0`, which on Linux
    takes PyPI's multi-GB CUDA build, while README's first section says to take the CPU wheel from PyTorch's index.
    Each line (or code span) that installs torch takes the CPU index or says it is the CUDA build, for a GPU."""
    cpu = "--index-url https://download.pytorch.org/whl/cpu"
    lines = [line for line in (*README.splitlines(), *snippets(README)) if "pip install torch" in line]
    assert len(lines) >= 5
    for line in lines:
        assert cpu in line or "CUDA" in line, line


def test_exit_code_9_names_every_command_and_cause_that_gives_it(tmp_path: Path) -> None:
    """Before: README's row 9 and `--help` said exit 9 was `serve`/`worker`/`keys` and a database needing a migration,
    while `automask db status` (and `db migrate`, `db deployment`, `keys list`) with a database that cannot be reached
    exit 9 too."""
    env = {"AUTOMASK_DATA_DIR": str(tmp_path), "AUTOMASK_DATABASE_URL": "postgresql://u@127.0.0.1:1/db"}
    for command in (["db", "status"], ["keys", "list"]):
        result = CliRunner().invoke(main, command, env=env)
        assert result.exit_code == 9 and "Cannot connect to the database" in result.stderr, result.output
    row = re.search(r"^\| 9 \| (.*) \|$", README, flags=re.M)
    assert row is not None
    for text in (row.group(1), dict(EXIT_HELP)[9]):
        assert "db" in re.split(r"[:]", text)[0] and "cannot be reached" in text, text


OTHER_TOOLS_FLAGS = {"--check": "ruff format", "--factory": "uvicorn", "--root-path": "uvicorn", "--index-url": "pip"}
"""Flags README names that belong to other programs than automask and its benchmarks."""


def test_every_flag_readme_names_exists() -> None:
    """Each `--flag` README names anywhere, prose included (not only in `automask ...` lines), is a flag of an automask
    command, of a benchmark script, or of one of the other tools README shows (`OTHER_TOOLS_FLAGS`)."""
    cli = {
        opt
        for _, command in commands(main)
        for param in command.params
        if isinstance(param, click.Option)
        for opt in (*param.opts, *param.secondary_opts)
    }
    bench = "".join(p.read_text() for p in (ROOT / "bench").glob("*.py"))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README))
    assert len(named & cli) >= 40
    unknown = {f for f in named - cli - set(OTHER_TOOLS_FLAGS) if f'"{f}"' not in bench}
    assert not unknown, unknown


def python_blocks(text: str) -> list[str]:
    """The fenced ```python blocks of `text`."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.slow
def test_the_python_examples_run_as_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_clipseg_dir: Path
) -> None:
    """README's Library and Grounded-SAM examples, run as written (tiny random models installed as `clipseg` and
    `grounded-sam`, a photo as room.jpg): each name they use exists and returns what the comments say. (The SDK's
    example needs a server: tests/test_server_sdk.py runs the same calls.)"""
    import numpy as np
    from PIL import Image

    from server_helpers import install_as_catalogue
    from tiny_models import make_tiny_grounded_sam

    data = tmp_path / "data"
    monkeypatch.setenv("AUTOMASK_DATA_DIR", str(data))
    install_as_catalogue(data, "clipseg", seed=0)
    grounded = make_tiny_grounded_sam(data / "models" / "grounded-sam")
    (grounded / "automask.json").write_text('{"name": "grounded-sam", "backend": "grounded-sam", "repos": []}')
    Image.open(ROOT / "examples" / "coffee.jpg").save(tmp_path / "room.jpg")
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in python_blocks(README) if "segmind" not in b]
    assert len(blocks) == 2
    library: dict[str, object] = {}
    exec(compile(blocks[0], "README.md (Library)", "exec"), library)
    result, cutout, preview = library["result"], library["cutout"], library["preview"]
    mask = result.mask  # type: ignore[attr-defined]
    assert mask.shape == (400, 600) and mask.dtype == np.uint8
    assert result.to_png()[:8] == b"\x89PNG\r\n\x1a\n" and result.encode("WEBP")[8:12] == b"WEBP"  # type: ignore[attr-defined]
    assert cutout.mode == "RGBA" and preview.mode == "RGB" and cutout.size == preview.size == (600, 400)  # type: ignore[attr-defined]
    exec(compile(blocks[1], "README.md (Grounded-SAM)", "exec"), {})
    assert sorted(p.name for p in (tmp_path / "room-instances").iterdir())[0].startswith("00-")


def test_defaults_stated_in_prose_are_the_settings() -> None:
    """Each "`VARIABLE` ... default N" of README's prose (`AUTOMASK_*`, or the `_NAME` shorthand of a server setting)
    states its setting's default, in the unit written after it (MiB, megapixels, s, min)."""
    text = " ".join(README.split())
    found = re.findall(
        r"`(AUTOMASK_[A-Z0-9_]+|_[A-Z0-9_]+)`[^`]{0,90}?\bdefault (\d[\d.]*\d|\d)( MiB| megapixels| s\b| min\b)?", text
    )
    assert len(found) >= 15
    units = {" MiB": 2**20, " megapixels": 10**6, " s": 1, " min": 60, "": 1}
    for name, number, unit in found:
        if name.startswith("AUTOMASK_SERVER_") or name.startswith("_"):
            field = ServerSettings.model_fields[name.removeprefix("AUTOMASK_SERVER").removeprefix("_").lower()]
        else:
            field = Settings.model_fields[name.removeprefix("AUTOMASK_").lower()]
        default = field.get_default(call_default_factory=True)
        stated = number if isinstance(default, str) else float(number) * units[unit]
        assert stated == default, (name, number, unit, default)
