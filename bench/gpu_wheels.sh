#!/usr/bin/env bash
# Run HERE, on a machine with PyPI, before bench/gpu_check.sh runs on a lent GPU machine (which reaches no index).
# Fetches into .whl/ (git-ignored through .git/info/exclude) the Python 3.12 wheels that the GPU machine's image
# lacks for automask, its tests and server: the image has torch, numpy, Pillow, OpenCV, onnxruntime, httpx, click,
# rich, huggingface_hub, tokenizers, scikit-image and pytest (/work/.library/device/KINDS.md), and transformers 5.17 with huggingface_hub
# 1.33, which are replaced by the versions tested here (transformers 5.25 needs huggingface_hub 2.4 and kernels). Pinned to what CI installs; about 20 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    transformers==5.25.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 python-dotenv==1.2.4 fastapi==0.165.0 starlette==1.10.0 \
    annotated-doc==0.0.7 opentelemetry-api==1.45.2 uvicorn==0.54.0 python-multipart==0.0.34 fastapi-offline==1.7.7 \
    sqlalchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 mako==1.4.3 huggingface-hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2 \
    httpcore2==2.16.2 truststore==0.10.5 kernels==0.19.1 tomlkit==0.15.3 \
    click==8.5.1 anyio==4.16.0 idna==3.20 h11==0.16.0
ls .whl
du -sh .whl
