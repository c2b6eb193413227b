"""`automask models pull` against a fake Hugging Face hub on loopback (HF_ENDPOINT): the real huggingface_hub client
downloads a tiny random CLIPSeg over HTTP, and the hub's failures (a dropped download, a rejected token) give errors
that name the right fix and leave nothing behind. Never the network: the hub listens on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from automask import MaskGenerator
from automask.catalogue import DEFAULT_FILES
from automask.install import RESUME
from automask.settings import Settings
from automask.staging import resumable_staging
from fake_hub import SHA, FakeHubServer, HubError, fake_hub
from test_first_use import automask_command, clean_env, run

REPO = "CIDAS/clipseg-rd64-refined"


@pytest.fixture()
def hub(tiny_clipseg_dir: Path) -> Iterator[FakeHubServer]:
    """The tiny CLIPSeg served as both CLIPSeg's and SAM 3's repository (only the hub's answers matter here)."""
    with fake_hub({REPO: tiny_clipseg_dir, "facebook/sam3": tiny_clipseg_dir}) as server:
        yield server


def _env(tmp_path: Path, hub: FakeHubServer, **extra: str) -> dict[str, str]:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url, **extra)
    env.pop("HF_TOKEN", None)
    return env | extra


def test_a_dropped_download_leaves_nothing_and_the_retry_installs_a_readable_model(
    tmp_path: Path, hub: FakeHubServer
) -> None:
    env = _env(tmp_path, hub)
    models = tmp_path / "data" / "models"
    hub.cut = 100  # every file: 100 bytes, then the connection drops
    proc = run(["models", "pull", "clipseg"], env)
    assert proc.returncode == 4, proc.stderr
    assert "RemoteProtocolError" in proc.stderr and "automask models pull clipseg" in proc.stderr
    assert list(models.iterdir()) == []
    hub.cut = None
    old = os.umask(0o022)
    try:
        proc = run(["models", "pull", "clipseg"], env)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    folder = models / "clipseg"
    assert f"clipseg installed in {folder}" in proc.stdout
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # another user (a server) can read it
    assert (folder / "model.safetensors").read_bytes() == (hub.repos[REPO] / "model.safetensors").read_bytes()
    listed = json.loads(run(["models", "list", "--json"], env).stdout)
    assert next(m for m in listed if m["name"] == "clipseg")["source"] == "data-dir"


@pytest.mark.parametrize("name", ["clipseg", "sam3"])
def test_a_rejected_token_names_hf_token_not_the_network(tmp_path: Path, hub: FakeHubServer, name: str) -> None:
    hub.error = HubError(401, message="Invalid credentials in Authorization header")
    proc = run(["models", "pull", name], _env(tmp_path, hub, HF_TOKEN="hf_expired"))
    assert proc.returncode == 4, proc.stderr
    assert "rejected the Hugging Face token" in proc.stderr and "https://huggingface.co/settings/tokens" in proc.stderr
    assert f"HF_TOKEN=<token> automask models pull {name}" in proc.stderr
    assert "Check the network" not in proc.stderr
    assert list((tmp_path / "data" / "models").iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_pull_stopped_midway_leaves_no_partial_folder(tmp_path: Path, hub: FakeHubServer, signum: int) -> None:
    """SIGTERM (a service manager, `kill`) during `models pull` killed the process outright, leaving the
    half-downloaded `.clipseg-*.partial` folder in the data folder for good; it now unwinds as Ctrl-C does."""
    models = tmp_path / "data" / "models"
    hub.pause = 30.0
    proc = subprocess.Popen(
        [*automask_command(), "models", "pull", "clipseg"],
        env=_env(tmp_path, hub),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(p.is_dir() for p in models.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.1)
    [partial] = [p for p in models.iterdir() if p.is_dir()]
    assert partial.name.endswith(".partial")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "interrupted" in err
    assert list(models.iterdir()) == []


def _kill_a_pull(models: Path, env: dict[str, str], hub: FakeHubServer) -> None:
    """Start `models pull clipseg`, and SIGKILL it (nothing can clean up) as its weights download begins."""
    hub.pause = 30.0
    proc = subprocess.Popen([*automask_command(), "models", "pull", "clipseg"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(p.is_dir() for p in models.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()
    proc.communicate(timeout=60)
    hub.pause = 0.0


def test_a_pull_killed_outright_leaves_a_folder_the_next_pull_removes(tmp_path: Path, hub: FakeHubServer) -> None:
    models = tmp_path / "data" / "models"
    env = _env(tmp_path, hub)
    _kill_a_pull(models, env, hub)
    assert [p.suffix for p in models.iterdir() if p.is_dir()] == [".partial"]
    assert run(["models", "pull", "clipseg"], env).returncode == 0
    assert [p.name for p in models.iterdir()] == ["clipseg"]


def test_models_list_removes_what_a_killed_pull_left_and_nobody_resumes(tmp_path: Path, hub: FakeHubServer) -> None:
    """A pull killed outright (SIGKILL) left '.clipseg.partial.lock' (and a staging folder with no downloaded byte)
    in the models folder until the next pull of that model; `models list` now removes them."""
    models = tmp_path / "data" / "models"
    env = _env(tmp_path, hub)
    _kill_a_pull(models, env, hub)
    assert sorted(p.name for p in models.iterdir()) == [".clipseg.partial", ".clipseg.partial.lock"]
    listed = run(["models", "list"], env)
    assert listed.returncode == 0 and "partial" not in listed.stdout + listed.stderr, listed.stderr
    assert list(models.iterdir()) == []


def _padded(tiny: Path, folder: Path) -> Path:
    """`tiny` with 14 MB more weights (an unused tensor): more than huggingface_hub's 10 MB download chunk, which is
    all it writes of a file before a connection drops."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "padding": np.ones(3_500_000, np.float32)}, folder / "model.safetensors", {"format": "pt"})
    return folder


@pytest.mark.parametrize("xet", [False, True], ids=["lfs", "xet"])
def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path, tiny_clipseg_dir: Path, xet: bool) -> None:
    """Every pull made a new staging folder, and huggingface_hub deletes a file cut off midway: a connection that
    dropped at 3 GB of SAM 3's 3.4 GB started again from zero. The retry now asks only for the rest (Range); for a
    Xet-backed file too (the hub's Xet download deletes a cut-off file as well, and hf_xet keeps no chunk cache)."""
    repo = _padded(tiny_clipseg_dir, tmp_path / "repo")
    size = (repo / "model.safetensors").stat().st_size
    models = tmp_path / "data" / "models"
    with fake_hub({REPO: repo}) as hub:
        hub.xet = xet
        env = _env(tmp_path, hub)
        hub.cut, hub.then = 12 << 20, HubError(503, message="the hub went away")
        first = run(["models", "pull", "clipseg"], env)
        assert first.returncode == 4, first.stderr
        partial = models / ".clipseg.partial"
        assert "automask models pull clipseg" in first.stderr and f"kept in '{partial}'" in first.stderr
        assert [p.name for p in models.iterdir() if p.is_dir()] == [partial.name]  # nothing loads a half model
        hub.cut = hub.error = None
        hub.requests.clear()
        second = run(["models", "pull", "clipseg"], env)
        assert second.returncode == 0, second.stderr
        weights = [r for r in hub.requests if r.startswith(f"GET /{REPO}/resolve/") and "model.safetensors" in r]
    assert weights == [f"GET /{REPO}/resolve/{SHA}/model.safetensors Range: bytes={10 << 20}-"], hub.requests
    assert [p.name for p in models.iterdir()] == ["clipseg"]
    assert (models / "clipseg" / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    assert size > 12 << 20
    generator = MaskGenerator("clipseg", Settings(data_dir=tmp_path / "data"))
    assert generator.generate(np.zeros((32, 32, 3), np.uint8), "a cat").mask.shape == (32, 32)


def test_pull_takes_a_model_complete_in_the_hf_cache_without_the_network(tmp_path: Path, hub: FakeHubServer) -> None:
    """`models pull` downloaded again what the Hugging Face cache held complete (and failed offline), though
    resolving the model uses that copy anyway. It now takes it from there, saying so; a partial cache is downloaded."""
    env = _env(tmp_path, hub)
    fetch = f"import huggingface_hub as h; h.snapshot_download({REPO!r}, allow_patterns={list(DEFAULT_FILES)!r})"
    subprocess.run([sys.executable, "-c", fetch], env=env, check=True, capture_output=True, timeout=120)
    [snapshot] = (tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir()
    hub.error, hub.requests[:] = HubError(503, message="the hub must not be asked"), []
    proc = run(["models", "pull", "clipseg"], env | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"{REPO}: complete in the Hugging Face cache, taken from {snapshot} (no download)" in proc.stderr
    assert hub.requests == []
    folder = tmp_path / "data" / "models" / "clipseg"
    for file in hub.repos[REPO].iterdir():
        assert (folder / file.name).read_bytes() == file.read_bytes()
    shutil.rmtree(folder)
    (snapshot / "model.safetensors").unlink()  # a partial cache: the weights are downloaded
    hub.error = None
    proc = run(["models", "pull", "clipseg"], env)
    assert proc.returncode == 0, proc.stderr
    assert "Hugging Face cache" not in proc.stderr
    assert any(r.startswith(f"GET /{REPO}/resolve/{SHA}/model.safetensors") for r in hub.requests), hub.requests
    assert (folder / "model.safetensors").read_bytes() == (hub.repos[REPO] / "model.safetensors").read_bytes()


def test_a_pull_interrupted_midway_says_where_its_download_waits(tmp_path: Path, tiny_clipseg_dir: Path) -> None:
    """Ctrl-C at 3 GB of 3.4 GB said only 'interrupted': the bytes kept for the next pull to resume sat in a hidden
    folder nobody was told about."""
    repo = _padded(tiny_clipseg_dir, tmp_path / "repo")
    partial = tmp_path / "data" / "models" / ".clipseg.partial"
    with fake_hub({REPO: repo}) as hub:
        hub.cut, hub.stall = 12 << 20, 30.0
        proc = subprocess.Popen(
            [*automask_command(), "models", "pull", "clipseg"],
            env=_env(tmp_path, hub),
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while sum(p.stat().st_size for p in partial.rglob("*.incomplete")) < 10 << 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"10.5 MB downloaded so far are kept in '{partial}'" in err
    assert partial.is_dir() and not (partial.parent / "clipseg").exists()


def test_ctrl_c_while_waiting_for_another_pull_does_not_claim_its_download(tmp_path: Path, hub: FakeHubServer) -> None:
    """Ctrl-C while a pull waited for another process's pull of the same model printed 'The 0.0 MB downloaded so
    far are kept in ...': the other pull's bytes, which this one never downloaded and that pull may yet install."""
    target = tmp_path / "data" / "models" / "clipseg"
    with resumable_staging(target) as other:  # the other pull, midway
        (other / "model.safetensors").write_bytes(b"\0" * 2_000_000)
        proc = subprocess.Popen(
            [*automask_command(), "models", "pull", "clipseg"],
            env=_env(tmp_path, hub),
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        said = ""
        while "waiting for it to end" not in said and proc.poll() is None:
            said += proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert (other / "model.safetensors").is_file()  # left alone
    assert proc.returncode == 130, said + err
    assert "Stopped waiting: this pull downloaded nothing; the other pull of 'clipseg' goes on." in err
    assert "kept in" not in err and "Traceback" not in err
    assert hub.requests == []


REMOVAL_HELD = """
import pathlib, sys, time
from automask import staging
from automask.cli import main
discard = staging._discard

def held(old):  # deleting what it moved aside, under the model's lock, until told to go on
    print("deleting", flush=True)
    while not pathlib.Path(sys.argv[2]).exists():
        time.sleep(0.05)
    discard(old)

staging._discard = held
main(["--data-dir", sys.argv[1], "models", "rm", "clipseg"])
"""


@contextlib.contextmanager
def _removal_held(tmp_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """`models rm clipseg` in a process of its own, held midway (deleting, under the model's lock) for the block."""
    go_on = tmp_path / "go-on"
    rm = subprocess.Popen(
        [sys.executable, "-c", REMOVAL_HELD, str(tmp_path / "data"), str(go_on)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert rm.stdout is not None and rm.stdout.readline() == "deleting\n", rm.communicate(timeout=60)
        yield rm
    finally:
        go_on.touch()
        rm.wait(timeout=60)


def _installed_clipseg(tmp_path: Path, tiny_clipseg_dir: Path) -> Path:
    folder = tmp_path / "data" / "models" / "clipseg"
    shutil.copytree(tiny_clipseg_dir, folder)
    (folder / "automask.json").write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": [REPO]}))
    return folder


def test_a_pull_waiting_for_a_removal_says_a_removal_is_running(
    tmp_path: Path, hub: FakeHubServer, tiny_clipseg_dir: Path
) -> None:
    """Before: a pull that waited for `models rm` of the same model said "Another pull of 'clipseg' is running", and
    Ctrl-C said that other pull went on. The lock now tells who holds it: a removal; once it has ended, the pull
    goes on and installs the model again."""
    folder = _installed_clipseg(tmp_path, tiny_clipseg_dir)
    env = _env(tmp_path, hub)
    with _removal_held(tmp_path, env) as rm:
        pull = subprocess.Popen(
            [*automask_command(), "models", "pull", "clipseg"], env=env, stderr=subprocess.PIPE, text=True
        )
        assert pull.stderr is not None
        said = pull.stderr.readline()
    _, err = pull.communicate(timeout=120)
    assert rm.returncode == 0 and rm.stdout is not None and f"removed {folder}" in rm.stdout.read()
    assert said == "A removal of 'clipseg' (automask models rm) is running: waiting for it to end...\n", said + err
    assert pull.returncode == 0, said + err
    assert (folder / "model.safetensors").read_bytes() == (hub.repos[REPO] / "model.safetensors").read_bytes()


def test_a_removal_refused_for_another_removal_says_so(
    tmp_path: Path, hub: FakeHubServer, tiny_clipseg_dir: Path
) -> None:
    """Before: a second `models rm` while one was deleting said a pull of the model was running."""
    _installed_clipseg(tmp_path, tiny_clipseg_dir)
    env = _env(tmp_path, hub)
    with _removal_held(tmp_path, env):
        again = run(["models", "rm", "clipseg"], env)
    assert again.returncode == 10, again.stderr
    assert "The model 'clipseg' is not removed: another removal of it is running." in again.stderr


def _kept(tmp_path: Path, repo: Path, data: bytes) -> Path:
    """A kept partial download of `repo`'s model.safetensors holding `data`, where a failed pull leaves one."""
    sha = hashlib.sha256((repo / "model.safetensors").read_bytes()).hexdigest()
    partial = tmp_path / "data" / "models" / ".clipseg.partial" / RESUME / f"model.safetensors.{sha}.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)
    return partial


@pytest.mark.parametrize("extra", [-1000, 0, 1000], ids=["shorter", "as-long", "longer"])
def test_a_corrupt_kept_partial_download_is_fetched_again_not_installed(
    tmp_path: Path, hub: FakeHubServer, extra: int
) -> None:
    """The bytes a failed pull kept are checked against the hub's sha256 once resumed: damaged ones (a disk error,
    another program) are downloaded again. One longer than the file made every retry fail (the hub answers 416 to a
    Range past its end) with a network error, for good."""
    weights = (hub.repos[REPO] / "model.safetensors").read_bytes()
    _kept(tmp_path, hub.repos[REPO], b"\xff" * (len(weights) + extra))
    proc = run(["models", "pull", "clipseg"], _env(tmp_path, hub))
    assert proc.returncode == 0, proc.stderr
    models = tmp_path / "data" / "models"
    assert (models / "clipseg" / "model.safetensors").read_bytes() == weights
    assert [p.name for p in models.iterdir()] == ["clipseg"]
    gets = [r.split("/resolve/")[1] for r in hub.requests if r.startswith(f"GET /{REPO}/resolve/")]
    assert [r.split("/", 1)[1] for r in gets if "model.safetensors" in r][-1] == "model.safetensors", hub.requests


def test_a_pull_onto_a_disk_without_room_says_so_before_downloading(tmp_path: Path, hub: FakeHubServer) -> None:
    """A 3.4 GB pull onto a disk with 1 GB free failed only once the disk was full, after the download had filled
    it. The free space is now compared with the bytes still to download first (what a kept partial holds counts)."""
    weights = (hub.repos[REPO] / "model.safetensors").read_bytes()
    _kept(tmp_path, hub.repos[REPO], weights[:1000])
    free = len(weights) - 2000  # room for less than the rest
    proc = run(["models", "pull", "clipseg"], _with_free_space(tmp_path, _env(tmp_path, hub), free))
    models = tmp_path / "data" / "models"
    _says_no_room(proc, models, len(weights) - 1000, free)
    assert not [r for r in hub.requests if r.startswith("GET") and "model.safetensors" in r], hub.requests
    assert not (models / "clipseg").exists()


def test_a_kept_partial_of_a_file_the_hub_has_changed_since_is_dropped(tmp_path: Path, hub: FakeHubServer) -> None:
    """The bytes kept of an older version of a file (another sha256) are not resumed: the file is fetched whole."""
    weights = (hub.repos[REPO] / "model.safetensors").read_bytes()
    kept = _kept(tmp_path, hub.repos[REPO], weights[:1000])
    older = kept.with_name(f"model.safetensors.{'a' * 64}.incomplete")
    kept.rename(older)
    proc = run(["models", "pull", "clipseg"], _env(tmp_path, hub))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "models" / "clipseg" / "model.safetensors").read_bytes() == weights
    assert not any("Range" in r for r in hub.requests), hub.requests
    assert not older.exists()


def _with_free_space(tmp_path: Path, env: dict[str, str], free: int) -> dict[str, str]:
    """`env` for an automask process whose disks all have `free` bytes free (shutil.disk_usage says so)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import shutil\n"
        "usage = shutil.disk_usage\n"
        f"shutil.disk_usage = lambda path: usage(path)._replace(free={free})\n"
    )
    return env | {"PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")])}


def _says_no_room(proc: subprocess.CompletedProcess[str], models: Path, needed: int, free: int) -> None:
    assert proc.returncode == 4, proc.stderr
    assert f"it needs {needed / 1e6:.1f} MB more on the disk holding '{models}'" in proc.stderr
    assert f"which has {free / 1e6:.1f} MB free. Free some space, or point AUTOMASK_DATA_DIR at" in proc.stderr
    assert "automask models pull clipseg" in proc.stderr and "Check the network" not in proc.stderr


def test_a_pull_copying_from_the_hf_cache_on_another_disk_checks_its_room_first(
    tmp_path: Path, hub: FakeHubServer
) -> None:
    """With AUTOMASK_DATA_DIR on another disk than the Hugging Face cache, a pull copies the cached model (no hard
    links across disks): onto a disk without room for it, it failed only once the disk was full."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) here")
    env = _env(tmp_path, hub)
    fetch = f"import huggingface_hub as h; h.snapshot_download({REPO!r}, allow_patterns={list(DEFAULT_FILES)!r})"
    subprocess.run([sys.executable, "-c", fetch], env=env, check=True, capture_output=True, timeout=120)
    needed = sum(f.stat().st_size for f in hub.repos[REPO].iterdir())
    data = Path(tempfile.mkdtemp(dir=shm))
    try:
        env = _with_free_space(tmp_path, env | {"AUTOMASK_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}, needed - 1)
        proc = run(["models", "pull", "clipseg"], env)
        _says_no_room(proc, data / "models", needed, needed - 1)
        assert list((data / "models").iterdir()) == []
    finally:
        shutil.rmtree(data)


def test_a_model_of_two_repositories_checks_the_room_for_both_before_downloading(
    tmp_path: Path, tiny_clipseg_dir: Path
) -> None:
    """grounded-sam (detector + SAM) checked the free space one repository at a time: with room for one only, the
    first was downloaded before the second found no room; and the message named the hidden staging folder
    `.grounded-sam.partial`, not the models folder."""
    repos = {"IDEA-Research/grounding-dino-tiny": tiny_clipseg_dir, "facebook/sam-vit-base": tiny_clipseg_dir}
    weights = (tiny_clipseg_dir / "model.safetensors").stat().st_size
    with fake_hub(repos) as server:
        env = _with_free_space(tmp_path, _env(tmp_path, server), weights + 1000)  # room for one repository's
        proc = run(["models", "pull", "grounded-sam"], env)
    models = tmp_path / "data" / "models"
    assert proc.returncode == 4, proc.stderr
    assert f"it needs {2 * weights / 1e6:.1f} MB more on the disk holding '{models}'" in proc.stderr
    assert not [r for r in server.requests if r.startswith("GET") and "model.safetensors" in r], server.requests
    assert not (models / "grounded-sam").exists()


def test_a_model_part_copied_from_the_hf_cache_counts_in_the_one_room_check_of_the_model(
    tmp_path: Path, tiny_clipseg_dir: Path
) -> None:
    """grounded-sam with its detector complete in the Hugging Face cache (on another disk than the data folder, so
    copied) and its SAM to download checked the room twice, each for its own part: with room for one part, both
    checks passed and the pull filled the disk. It is one check of the disk for the copy and the download together;
    on the cache's own disk the copy (hard links) needs no room."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) here")
    detector = "IDEA-Research/grounding-dino-tiny"
    repos = {detector: tiny_clipseg_dir, "facebook/sam-vit-base": tiny_clipseg_dir}
    weights = (tiny_clipseg_dir / "model.safetensors").stat().st_size
    copied = sum(f.stat().st_size for f in tiny_clipseg_dir.iterdir())
    data = Path(tempfile.mkdtemp(dir=shm))
    try:
        with fake_hub(repos) as server:
            env = _env(tmp_path, server)
            fetch = f"import huggingface_hub as h; h.snapshot_download({detector!r}, allow_patterns={DEFAULT_FILES!r})"
            subprocess.run([sys.executable, "-c", fetch], env=env, check=True, capture_output=True, timeout=120)
            server.requests.clear()
            free = max(copied, weights) + 1000  # room for either part, not for both
            proc = run(
                ["models", "pull", "grounded-sam"],
                _with_free_space(tmp_path, env | {"AUTOMASK_DATA_DIR": str(data)}, free),
            )
            gets = [r for r in server.requests if r.startswith("GET") and r.endswith(".safetensors")]
            (tmp_path / "same").mkdir()
            same_disk = run(
                ["models", "pull", "grounded-sam"], _with_free_space(tmp_path / "same", env, weights + 1000)
            )
        assert proc.returncode == 4, proc.stderr
        assert f"it needs {(copied + weights) / 1e6:.1f} MB more on the disk holding '{data / 'models'}'" in proc.stderr
        assert gets == [], server.requests
        assert list((data / "models").iterdir()) == []
        assert same_disk.returncode == 0, same_disk.stderr  # the cached part hard-linked: room for the download only
    finally:
        shutil.rmtree(data)


def test_a_repository_with_only_bin_weights_counts_them_in_the_room_check_of_the_model(
    tmp_path: Path, tiny_clipseg_dir: Path
) -> None:
    """A repository with no safetensors (its pytorch_model.bin is what is downloaded) checked its room on its own,
    after the other repository of the model was downloaded: with room for one, the pull went ahead. The room check
    is one sum for the whole model, the .bin weights included, before any download."""
    bin_only = tmp_path / "bin-only"
    shutil.copytree(tiny_clipseg_dir, bin_only)
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    repos = {"IDEA-Research/grounding-dino-tiny": tiny_clipseg_dir, "facebook/sam-vit-base": bin_only}
    weights = (tiny_clipseg_dir / "model.safetensors").stat().st_size
    with fake_hub(repos) as server:
        env = _with_free_space(tmp_path, _env(tmp_path, server), weights + 1000)  # room for one repository's
        proc = run(["models", "pull", "grounded-sam"], env)
        gets = [r for r in server.requests if r.startswith("GET") and r.endswith((".safetensors", ".bin"))]
        server.requests.clear()
        again = run(["models", "pull", "grounded-sam"], _env(tmp_path, server))  # with room: the .bin once
        bins = [r for r in server.requests if r.startswith("GET") and r.endswith(".bin")]
    models = tmp_path / "data" / "models"
    assert proc.returncode == 4, proc.stderr
    assert f"it needs {2 * weights / 1e6:.1f} MB more on the disk holding '{models}'" in proc.stderr
    assert gets == [], server.requests
    assert again.returncode == 0, again.stderr
    assert bins == [f"GET /facebook/sam-vit-base/resolve/{SHA}/pytorch_model.bin"], server.requests
    part = models / "grounded-sam" / "facebook--sam-vit-base"
    assert (part / "pytorch_model.bin").read_bytes() == (bin_only / "pytorch_model.bin").read_bytes()


def test_a_weight_download_asks_the_hub_for_a_fresh_link(tmp_path: Path, tiny_clipseg_dir: Path) -> None:
    """The hub answers a weight file with a redirect to a signed CDN link that expires. The links of every weight
    file of a model were asked for at once, before the first download (the room check): a weight downloaded after
    the others had taken longer than a link lives was refused (403), and the pull failed. Each download now asks
    the hub for its link as it starts."""
    repos = {"IDEA-Research/grounding-dino-tiny": tiny_clipseg_dir, "facebook/sam-vit-base": tiny_clipseg_dir}
    with fake_hub(repos) as server:
        server.cdn_link_life, server.pause = 1.0, 1.2  # the first download outlives the second one's first link
        proc = run(["models", "pull", "grounded-sam"], _env(tmp_path, server))
        weights = [r for r in server.requests if r.startswith("GET /cdn/")]
    assert proc.returncode == 0, proc.stderr
    assert len(weights) == 2, server.requests
    for part in ("IDEA-Research--grounding-dino-tiny", "facebook--sam-vit-base"):
        model = tmp_path / "data" / "models" / "grounded-sam" / part / "model.safetensors"
        assert model.read_bytes() == (tiny_clipseg_dir / "model.safetensors").read_bytes()
