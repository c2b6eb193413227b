"""deploy/ (compose file, Dockerfile, nginx config) checked against the product, since no container runtime runs here.

Every automask service's command runs through the real click command with its last step (starting the HTTP
server, the Celery worker, the migration, the download) replaced by a recorder, under the service's environment:
so every flag exists, every value validates, and the settings the process would start with are asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from click.testing import CliRunner

from automask.cli import main
from automask.models import CATALOGUE
from automask.server.config import ServerSettings
from automask.settings import Settings
from server_helpers import FakeBackend, live_server, loopback_socket

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")  # name, ":-" or "-", default
API = ("api-1", "api-2")
WORKERS = ("worker-1", "worker-2")
SERVERS = ("postgres", "rabbitmq", "redis")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR:-default}` substitution, applied to every string in `value`."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: env.get(m.group(1)) or m.group(3) or "", value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return dict(interpolate(raw, env or {}))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def automask_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the automask image."""
    return {name: s for name, s in compose["services"].items() if s.get("image") == "automask:local"}


def dockerfile_env() -> dict[str, str]:
    """The `ENV NAME=value` settings of deploy/Dockerfile (one per line or continued with backslashes)."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = [p for line in text.splitlines() if line.startswith("ENV ") for p in line.split()[1:]]
    return dict(p.split("=", 1) for p in pairs)


def seconds(duration: str) -> float:
    """A compose or nginx duration ('90s', '2m') in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", duration)
    assert match, duration
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


# -- the file itself ------------------------------------------------------------------------------------------------


def test_every_variable_has_a_default_so_up_works_without_an_env_file() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    found = VARIABLE.findall(text)
    assert {name for name, _, _ in found} == {
        "POSTGRES_PASSWORD",
        "RABBITMQ_PASSWORD",
        "AUTOMASK_MODEL",
        "PUBLIC_URL",
        "WORKER_THREADS",
        "HTTP_PORT",
    }
    assert [name for name, sep, default in found if sep != ":-" or not default] == []
    assert "$" not in yaml.safe_dump(load_compose())  # nothing left uninterpolated (no bare $VAR either)


def test_services_and_their_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*SERVERS, "migrate", "models", *API, *WORKERS, "nginx"}
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, (name, target)
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: it has no check"
            else:
                assert rule["condition"] == "service_completed_successfully", (name, target)
                assert services[target]["restart"] == "no", f"{target} is a one-shot: it must not restart"
    healthy = {"condition": "service_healthy"}
    done = {"condition": "service_completed_successfully"}
    for name in (*API, *WORKERS):
        deps = services[name]["depends_on"]
        assert deps["migrate"] == done and all(deps[s] == healthy for s in SERVERS), name
    for name in (*API, *WORKERS):  # API nodes too: /readyz fails until a worker has the downloaded model
        assert services[name]["depends_on"]["models"] == done
    assert services["migrate"]["depends_on"] == {"postgres": healthy}
    assert services["nginx"]["depends_on"] == {name: healthy for name in API}


def test_only_the_load_balancer_is_published(compose: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in compose["services"].items() if "ports" in s}
    assert published == {"nginx": ["8080:8080"]}
    assert load_compose({"HTTP_PORT": "9000"})["services"]["nginx"]["ports"] == ["9000:8080"]


def test_server_healthchecks_use_each_servers_own_probe(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["postgres"]["healthcheck"]["test"] == ["CMD-SHELL", "pg_isready -U automask -d automask"]
    assert services["rabbitmq"]["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


# -- settings: every AUTOMASK_* variable is a real setting, and the URLs reach the servers ---------------------------


def setting_names() -> set[str]:
    names = {"AUTOMASK_" + field.upper() for field in Settings.model_fields}
    return names | {"AUTOMASK_SERVER_" + field.upper() for field in ServerSettings.model_fields}


def test_every_automask_variable_is_a_setting(compose: dict[str, Any]) -> None:
    services = automask_services(compose)
    assert set(services) == {"migrate", "models", *API, *WORKERS}
    known = setting_names()
    for name, service in services.items():
        unknown = {k for k in service["environment"] if k.startswith("AUTOMASK_")} - known
        assert unknown == set(), f"{name}: not automask settings: {sorted(unknown)}"
    assert set(dockerfile_env()) - {"PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"} == {
        "AUTOMASK_DATA_DIR"
    }


@pytest.mark.parametrize("passwords", [{}, {"POSTGRES_PASSWORD": "pg-s3cret", "RABBITMQ_PASSWORD": "mq-s3cret"}])
def test_service_urls_match_the_servers_credentials(passwords: dict[str, str]) -> None:
    services = load_compose(passwords)["services"]
    for name, service in automask_services({"services": services}).items():
        env = service["environment"]
        db = urlsplit(env["AUTOMASK_DATABASE_URL"])
        pg = services["postgres"]["environment"]
        assert (db.scheme, db.hostname, db.port) == ("postgresql", "postgres", 5432), name
        assert (db.username, db.password, db.path) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], "/automask")
        assert pg["POSTGRES_DB"] == "automask"
        mq, rabbit = urlsplit(env["AUTOMASK_BROKER_URL"]), services["rabbitmq"]["environment"]
        assert (mq.scheme, mq.hostname, mq.port) == ("amqp", "rabbitmq", 5672), name
        assert (mq.username, mq.password) == (rabbit["RABBITMQ_DEFAULT_USER"], rabbit["RABBITMQ_DEFAULT_PASS"])
        assert mq.path == "/" + rabbit["RABBITMQ_DEFAULT_VHOST"]
        assert env["AUTOMASK_REDIS_URL"] == "redis://redis:6379/0"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == passwords.get("POSTGRES_PASSWORD", "automask")


# -- every command through the real CLI -----------------------------------------------------------------------------


class Recorder:
    """Stands in for the last step of a command; keeps what it was called with."""

    def __init__(self, result: Any = None) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.result = result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.result(*args) if callable(self.result) else self.result


def run_service(
    service: dict[str, Any], monkeypatch: pytest.MonkeyPatch, data_dir: Path, extra_env: dict[str, str] | None = None
) -> None:
    """Run the service's command as the image would (`automask` + command) under its environment (the data folder
    moved to `data_dir`). Logging is left as it is (serve and worker configure the root logger)."""
    import automask.server.commands
    import automask.server.metrics

    monkeypatch.setattr(automask.server.commands, "configure_logging", Recorder())
    closed = Recorder()  # not a real listener on 0.0.0.0:9100: its url, and close, which the command calls at its end
    listen = Recorder(result=SimpleNamespace(url="http://127.0.0.1:9100/metrics", close=closed))
    monkeypatch.setattr(automask.server.metrics, "listen", listen)
    for name in [k for k in os.environ if k.startswith("AUTOMASK_")]:
        monkeypatch.delenv(name)
    env = {**dockerfile_env(), **service["environment"], "AUTOMASK_DATA_DIR": str(data_dir), **(extra_env or {})}
    result = CliRunner().invoke(main, service["command"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    command = service["command"]
    if "--metrics-port" in command:  # served where the flags say, on the compose network
        where = (command[command.index("--metrics-host") + 1], int(command[command.index("--metrics-port") + 1]))
        assert listen.calls == [(where, {})] and len(closed.calls) == 1


@pytest.mark.parametrize("name", API)
def test_api_nodes_serve_on_all_interfaces_with_keys(
    name: str, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import automask.server.app
    import automask.server.http

    def fake_app(settings: Any, server: Any) -> SimpleNamespace:  # what serve reads of an app: stop hook, settings
        hooks = SimpleNamespace(ask_stop=lambda: None, settings=settings, store=SimpleNamespace(close=lambda: None))
        return SimpleNamespace(made=(settings, server), state=SimpleNamespace(automask=hooks))

    create_app = Recorder(result=fake_app)
    run = Recorder()
    check_broker = Recorder()  # no RabbitMQ named `rabbitmq` here
    monkeypatch.setattr(automask.server.app, "create_app", create_app)
    monkeypatch.setattr(automask.server.app, "check_broker", check_broker)
    monkeypatch.setattr(automask.server.http, "run", run)
    monkeypatch.setattr(automask.server.http, "listen", lambda server: [loopback_socket()])  # not 0.0.0.0:8000
    service = compose["services"][name]
    assert "--no-auth" not in service["command"]
    run_service(service, monkeypatch, tmp_path)
    (app, server), kwargs = run.calls[0]
    settings, app_server = app.made
    assert app_server is server and kwargs["log_level"] == "info"
    assert kwargs["on_signal"] is app.state.automask.ask_stop  # a stop signal reaches the app's jobs
    assert (server.host, server.port, server.auth) == ("0.0.0.0", 8000, True)
    assert server.public_url == "http://localhost:8080"
    assert settings.database_url == "postgresql://automask:automask@postgres:5432/automask"
    assert settings.broker_url == "amqp://automask:automask@rabbitmq:5672/automask"
    assert check_broker.calls == [((str(settings.broker_url),), {})]  # reached once at start
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.model == "clipseg"
    # the port nginx and the healthcheck use is the one served
    assert f"server {name}:{server.port} " in (DEPLOY / "nginx.conf").read_text()


@pytest.mark.parametrize("name", WORKERS)
def test_workers_load_the_pulled_model_offline(
    name: str, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import automask.server.worker

    run_worker = Recorder()
    monkeypatch.setattr(automask.server.worker, "run_worker", run_worker)
    service = compose["services"][name]
    run_service(service, monkeypatch, tmp_path)
    (settings, server), kwargs = run_worker.calls[0]
    assert kwargs == {"model": "clipseg", "concurrency": 1, "loglevel": "info"}
    assert (settings.offline, settings.threads, settings.model) == (True, 2, "clipseg")
    assert settings.broker_url == "amqp://automask:automask@rabbitmq:5672/automask"
    assert settings.redis_url and settings.database_url
    assert server.timeout == ServerSettings().timeout
    # SIGTERM lets the running task finish: the grace period outlasts a request's time limit
    assert seconds(service["stop_grace_period"]) > server.timeout
    # the model comes from the models volume, mounted where <data dir>/models is
    assert service["volumes"] == [f"models:{dockerfile_env()['AUTOMASK_DATA_DIR']}/models:ro"]
    assert "clipseg" in CATALOGUE and not CATALOGUE["clipseg"].gated


def test_the_models_service_pulls_the_workers_model_into_the_shared_volume(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import automask.cli_models
    import automask.models

    pull = Recorder(result=tmp_path / "models" / "clipseg")
    monkeypatch.setattr(automask.models, "pull", pull)
    monkeypatch.setattr(automask.cli_models, "_export_after_pull", Recorder())
    service = compose["services"]["models"]
    run_service(service, monkeypatch, tmp_path)
    (name, settings), _ = pull.calls[0]
    worker = compose["services"]["worker-1"]
    assert name == worker["command"][worker["command"].index("--model") + 1] == "clipseg"
    assert settings.models_dir == tmp_path / "models"  # pull writes <data dir>/models/<name>
    assert service["volumes"] == [f"models:{dockerfile_env()['AUTOMASK_DATA_DIR']}/models"]
    other = load_compose({"AUTOMASK_MODEL": "grounded-sam"})["services"]
    assert other["models"]["command"][-1] == "grounded-sam" == other["worker-2"]["command"][2]


def test_migrate_upgrades_the_shared_database(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import automask.server.migrations

    migrate = Recorder(result=("0001", "0002"))
    monkeypatch.setattr(automask.server.migrations, "migrate", migrate)
    run_service(compose["services"]["migrate"], monkeypatch, tmp_path)
    (store,), _ = migrate.calls[0]
    url = store.url
    assert (url.drivername, url.host, url.port, url.database) == ("postgresql+psycopg", "postgres", 5432, "automask")
    assert (url.username, url.password) == ("automask", "automask")


def test_readme_commands_are_valid(compose: dict[str, Any]) -> None:
    """Every `docker compose ... run --rm SERVICE ARGS` in deploy/README.md names a service and valid CLI flags."""
    lines = re.findall(
        r"docker compose -f deploy/compose.yaml run --rm ([\w-]+)([^\n#`]*)", (DEPLOY / "README.md").read_text()
    )
    assert len(lines) >= 2
    for service, args in lines:
        assert service in automask_services(compose)
        argv = args.split() or compose["services"][service]["command"]
        result = CliRunner().invoke(main, [*argv, "--help"])
        assert result.exit_code == 0 and "Usage: " in result.output, (argv, result.output)
    assert CliRunner().invoke(main, ["keys", "create", "--no-such-flag", "--help"]).exit_code == 2  # the check works


# -- healthchecks, nginx, Dockerfile -------------------------------------------------------------------------------


class _Probe(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_api_healthcheck_probes_readyz_and_fails_on_503(compose: dict[str, Any]) -> None:
    from automask.server.routes import router

    test = compose["services"]["api-1"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    url = urlsplit(re.findall(r"'(http://[^']+)'", test[3])[0])
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", 8000, "/readyz")
    assert url.path in {route.path for route in router.routes}  # type: ignore[attr-defined]
    server = HTTPServer(("127.0.0.1", 0), _Probe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = test[3].replace(":8000/", f":{server.server_port}/")
    try:
        exits = {}
        for status in (200, 503):
            _Probe.status = status
            exits[status] = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode
    finally:
        server.shutdown()
        server.server_close()
    assert exits[200] == 0 and exits[503] != 0
    assert compose["services"]["api-2"]["healthcheck"] == compose["services"]["api-1"]["healthcheck"]


def test_nginx_forwards_to_both_api_nodes_with_room_for_the_largest_body(compose: dict[str, Any]) -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    assert re.findall(r"^\s*server (\S+?):(\d+)", conf, re.M) == [("api-1", "8000"), ("api-2", "8000")]
    size = re.search(r"client_max_body_size (\d+)m;", conf)
    assert size and int(size.group(1)) * 2**20 >= ServerSettings().body_limit(Settings().max_image_bytes)
    read = re.search(r"proxy_read_timeout (\S+);", conf)
    assert read and seconds(read.group(1)) > ServerSettings().timeout
    keepalive = re.search(r"keepalive_timeout (\S+);", conf)
    assert keepalive and seconds(keepalive.group(1)) < ServerSettings().keepalive_timeout
    assert "non_idempotent" not in conf  # a POST a node received is never sent to the other one
    assert re.search(r"listen (\d+);", conf).group(1) == compose["services"]["nginx"]["ports"][0].split(":")[1]  # type: ignore[union-attr]
    assert compose["services"]["nginx"]["volumes"] == ["./nginx.conf:/etc/nginx/conf.d/default.conf:ro"]


NGINX_FORWARDED_FOR = {
    "$remote_addr": lambda sent, peer: peer,
    "$proxy_add_x_forwarded_for": lambda sent, peer: f"{sent}, {peer}" if sent else peer,
}
"""The X-Forwarded-For nginx sends for each value nginx.conf may give it: (the client's header, its address) -> it."""


def test_a_client_behind_nginx_cannot_pick_its_address_for_the_failed_authentication_limit(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx sets X-Forwarded-For as nginx.conf says, the API nodes trust it as compose.yaml says (uvicorn's proxy
    headers): a client sending a fresh X-Forwarded-For with each guessed key is still the one address nginx saw,
    locked out past the limit."""
    conf = (DEPLOY / "nginx.conf").read_text()
    directive = re.search(r"proxy_set_header X-Forwarded-For (\S+);", conf)
    assert directive and directive.group(1) in NGINX_FORWARDED_FOR
    forwarded = NGINX_FORWARDED_FOR[directive.group(1)]
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", compose["services"]["api-1"]["environment"]["FORWARDED_ALLOW_IPS"])
    with live_server(tmp_path, FakeBackend(), auth_fail_limit=3) as live:
        codes = [
            httpx.get(
                f"{live.url}/v1/credits",
                headers={"x-api-key": f"am_guess{i}_x", "x-forwarded-for": forwarded(f"203.0.113.{i}", "198.51.100.7")},
            ).status_code
            for i in range(5)
        ]
    assert codes == [401, 401, 401, 429, 429]


def test_dockerfile_installs_the_cpu_torch_first_and_runs_automask() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the project supports 3.10)
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.strip()]
    assert lines[[ln.startswith("FROM ") for ln in lines].index(True)] == "FROM python:3.11-slim"
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    torch = next(i for i, ln in enumerate(runs) if "torch==" in ln)
    assert runs[torch] == "RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0"
    install = next(i for i, ln in enumerate(runs) if 'pip install ".[' in ln)
    assert torch < install
    extras = re.search(r'"\.\[([^\]]+)\]"', runs[install]).group(1).split(",")  # type: ignore[union-attr]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(extras) <= set(project["optional-dependencies"]) and extras == ["all"]
    assert project["scripts"]["automask"] == "automask.cli:main"
    assert 'ENTRYPOINT ["automask"]' in lines and "EXPOSE 8000" in lines
    copied = [p for ln in lines if ln.startswith("COPY ") for p in ln.split()[1:-1]]
    assert copied == ["pyproject.toml", "README.md", "src"] and all((ROOT / p).exists() for p in copied)
    text = (DEPLOY / "Dockerfile.dockerignore").read_text()
    ignore = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*" and {f"!{p}" for p in copied} <= {p.rstrip("/") for p in ignore}
