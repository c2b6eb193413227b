"""An API node answering with `FakeBackend`, for tests that need several real server processes on one database:
`python tests/api_node.py PORT`, settings from the environment (AUTOMASK_DATA_DIR or AUTOMASK_DATABASE_URL,
AUTOMASK_REDIS_URL, AUTOMASK_SERVER_AUTH_FAIL_LIMIT, ...), as `automask serve` reads them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from automask.pipeline import MaskGenerator
from automask.server import http
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.settings import Settings
from server_helpers import FakeBackend


def main() -> None:
    import uvicorn

    settings, server = Settings(), ServerSettings(port=int(sys.argv[1]))
    app = create_app(settings, server, MaskGenerator(FakeBackend(), settings))
    uvicorn.Server(http.config_for(app, server, log_level="warning")).run()


if __name__ == "__main__":
    main()
