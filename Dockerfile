# The accumsync image: one image for the workers, beat, flower, metrics, migrate and the sandbox.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Every dependency at the version and hash the lock names (runtime and the flower extra), then
# this checkout itself without resolving anything again.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY models models
COPY tasks tasks
COPY worker worker
COPY migrations migrations
ARG EXTRAS=flower
RUN pip install --no-deps ".[${EXTRAS}]" && useradd --system --home-dir /app accumsync
USER accumsync

# Embedded defaults keep their files here when no broker or database URL is set.
ENV ACCUMSYNC_HOME=/tmp/accumsync
CMD ["celery", "-A", "worker", "worker", "-l", "INFO", "--without-gossip", "--without-mingle"]
