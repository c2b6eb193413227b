"""The HTTP service: a drop-in replacement for the hosted "automatic-mask-generator" API (v1 and v2).

`automask.server.app.create_app` builds the ASGI app (needs the `server` extra: fastapi, uvicorn);
`automask.server.commands` holds the click commands `serve`, `worker` and `db`, `automask.server.keys_cli` the `keys`
commands (importing them stays light).
"""
