#!/usr/bin/env bash
# Start the services the integration tests talk to (Redis, PostgreSQL, RabbitMQ), installing them
# (and the compose checker and promtool) if absent.
# Idempotent: a running service is left alone.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need() {  # need COMMAND PACKAGE...
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "services: installing ${*:2}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${@:2}" >/dev/null
}

need redis-server redis-server
# compose.yaml is checked by Debian's docker-compose (1.29: `config` needs no engine) and the
# Compose Specification's JSON schema it ships (tests/unit/test_compose.py).
need docker-compose docker-compose
# promtool checks and unit-tests ops/prometheus (tests/unit/test_alerts.py); Debian ships it in
# the prometheus package, whose server the tests do not need: stopped if the install started it.
if ! command -v promtool >/dev/null 2>&1; then
  pgrep -x prometheus >/dev/null 2>&1 && running=1 || running=0
  need promtool --no-install-recommends prometheus  # not node-exporter and its collectors
  if [ "$running" = 0 ] && pgrep -x prometheus >/dev/null 2>&1; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "services: starting redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then need pg_ctlcluster postgresql; fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "services: starting postgresql"
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi

# RabbitMQ (the amqp:// tests): its app started again if a run left it stopped, else the server.
rabbit_up() { timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' >/dev/null 2>&1; }
need rabbitmq-server rabbitmq-server
if ! rabbit_up; then
  echo "services: starting rabbitmq"
  as_root rabbitmqctl start_app >/dev/null 2>&1 \
    || as_root rabbitmq-server -detached >/dev/null 2>&1 \
    || as_root service rabbitmq-server start >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do rabbit_up && break; sleep 1; done
  rabbit_up || { echo "services: rabbitmq did not come up" >&2; exit 1; }
fi

for _ in $(seq 1 60); do
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; then
    # trust auth for the local test user is the machine's setup; check we can log in
    if psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
      echo "services: redis and postgresql are up"
      exit 0
    fi
  fi
  sleep 1
done
echo "services: redis or postgresql did not come up" >&2
exit 1
