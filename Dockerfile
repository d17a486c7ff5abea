# composer: pages on 8080, admin (metrics, healthz, readyz) on 9911.
# Python 3.11: the version the test suite and bench/ run on, and the cheapest per page of the
# three here, from source and compiled alike (bench/instructions.py, user-space instructions
# per page20 page from source: 3.11.7 3.85 M, 3.12.1 4.33 M, 3.13.0 4.20 M, page0 268 k, 307 k,
# 295 k; compiled by scripts/compile, each with its own interpreter: page20 2.28 M, 2.62 M,
# 2.61 M, page0 236 k, 274 k, 268 k).
FROM python:3.11-slim AS build

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The request path is compiled with mypyc (scripts/compile): gcc here, nothing of it at run time.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md routes.yaml ./
COPY templates ./templates
COPY manifests ./manifests
COPY composer ./composer
COPY scripts/compile ./scripts/compile
# [otel]: tracing ships in the image, off until OTEL_EXPORTER_OTLP_ENDPOINT is set. mypy (with
# mypyc, which type-checks what it compiles: hence the YAML stubs) and setuptools are build
# tools, kept out of the image's virtualenv.
RUN python -m venv /opt/composer \
 && /opt/composer/bin/pip install '.[otel]' \
 && pip install --target /tmp/build-tools 'mypy>=2.4' 'setuptools>=65' types-PyYAML \
 && PYTHONPATH=/tmp/build-tools /opt/composer/bin/python scripts/compile \
      --into "$(/opt/composer/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/composer/bin:$PATH
COPY --from=build /opt/composer /opt/composer
WORKDIR /app
COPY routes.yaml ./
COPY templates ./templates
COPY manifests ./manifests
RUN useradd --system --uid 10001 --no-create-home composer

USER composer
EXPOSE 8080 9911
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9911/healthz', timeout=2).status == 200 else 1)"]
# Mount your own routes.yaml, templates/ and manifests/ over /app to serve them (or pass
# --manifest / COMPOSER_MANIFEST); edits are picked up without a restart. The admin port
# listens on every interface of the container (composer's own default is 127.0.0.1), so a
# scraper can reach it: publish it only where your metrics are allowed to be read.
CMD ["composer", "serve", "--admin-host", "0.0.0.0"]
