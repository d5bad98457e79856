#!/usr/bin/env bash
# tunepipe's wheel installed into an environment that already holds a newer stack (prefect 3.9,
# trl past 1.12, the newest fastapi prefect allows), then the quickstart run there.
# Usage: bash benchmarks/user_stack.sh [WORKDIR]   (about 10 minutes on 2 cores; needs the registry)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
python3 -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install -q torch==2.13.0 "prefect==3.9.1" "trl>=1.13" "fastapi==0.150.0"
"$pip" wheel -q --no-deps -w "$work/wheel" "$repo"
"$pip" install -q "$work"/wheel/tunepipe-*.whl
"$pip" list 2>/dev/null | grep -iE '^(prefect|trl|fastapi|transformers|sqlalchemy|torch|tunepipe) '
mkdir -p "$work/project" && cd "$work/project"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME="$work/prefect"
"$work/venv/bin/tunepipe" run --json > "$work/quickstart.json"
echo "quickstart ran beside the newer stack: $work/quickstart.json"
