# The accumsync image: one image for worker, beat, flower, metrics, migrate and the sandbox.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY models models
COPY tasks tasks
COPY worker worker
COPY migrations migrations
RUN pip install . && useradd --system --home-dir /app accumsync
USER accumsync

# Embedded defaults keep their files here when no broker or database URL is set.
ENV ACCUMSYNC_HOME=/tmp/accumsync
CMD ["celery", "-A", "worker", "worker", "-l", "INFO"]
