# syntax=docker/dockerfile:1
# mono_quant service image: one image, two roles (docker-compose.yml picks the command).
#   API:    uvicorn app.main:create_app --factory --host 0.0.0.0 --port 8000   (the default CMD)
#   worker: celery -A app.jobs.celery_queue worker --pool solo --concurrency 1 ...
#
# CPU torch by default. A CUDA image (for GPU workers):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t monoquant:cuda .
# (any CUDA variant pytorch.org lists for the pinned torch; the wheels bring their own CUDA
# libraries, the host needs the NVIDIA driver and the NVIDIA container toolkit).

ARG PYTHON_VERSION=3.11

# ---- build: a virtual environment with torch, the dependencies, then the package -------------
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extras of pyproject.toml to install: server (API), distributed (Celery, Redis, PostgreSQL),
# hf (zipped Hugging Face model folders).
ARG EXTRAS=server,distributed,hf
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the index chosen above, so no later step pulls another build of it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Dependencies before the code: this layer is rebuilt only when pyproject.toml changes.
WORKDIR /src
COPY pyproject.toml ./
RUN python - <<'PY'
import os, re, subprocess, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
optional = project.get("optional-dependencies", {})
wanted, seen = list(project["dependencies"]), set()

def add(extra):
    if extra in seen:
        return
    seen.add(extra)
    for requirement in optional[extra]:
        self_ref = re.fullmatch(r"mono-quant\[(.+)\]", requirement.replace(" ", ""))
        if self_ref:
            for inner in self_ref.group(1).split(","):
                add(inner)
        else:
            wanted.append(requirement)

for extra in filter(None, os.environ.get("EXTRAS", "").split(",")):
    add(extra.strip())
subprocess.check_call([sys.executable, "-m", "pip", "install", *wanted])
PY

# The code last; --no-deps: everything it needs is already installed above.
COPY README.md ./
COPY mono_quant ./mono_quant
COPY app ./app
# The pages (/, /docs, /redoc) need their static files in the image: fail the build without them.
RUN pip install --no-deps . && python -c "import app.main, app.jobs.celery_queue, mono_quant" \
    && python -c "from app.routes.pages import STATIC_DIR as s, DOCS_ASSETS_DIR as d; \
assert all((s / n).is_file() for n in ('index.html', 'job-page.js', 'job-page.css')), s; \
assert (d / 'swagger-ui-bundle.js').is_file(), d"

# ---- runtime: the environment only, a non-root user, data on a volume ---------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 monoquant \
    && useradd --system --uid 10001 --gid monoquant --home-dir /home/monoquant --create-home monoquant \
    && mkdir -p /data \
    && chown monoquant:monoquant /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MONOQUANT_DATA_DIR=/data
WORKDIR /home/monoquant
USER monoquant
VOLUME ["/data"]
EXPOSE 8000

# The API's liveness. Worker containers override it (docker-compose.yml): a solo worker busy
# with a job cannot answer HTTP or `celery inspect ping`, so they check a heartbeat file.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
