#!/usr/bin/env bash
# Speed of the working tree against a revision (default: HEAD), alternating
# (see benches/compare.py): builds both in release, the revision in a git
# worktree with a target folder of its own, then runs the measures.
#   bash benches/compare.sh [REV] [--repeats 5] [--threads 2]
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:-HEAD}"
shift || true
python3 -m pip install -q numpy safetensors
base="${TMPDIR:-/tmp}/modelc-base-$(git rev-parse --short "$rev")"
[ -d "$base" ] || git worktree add -f "$base" "$rev" -q
(cd "$base" && CARGO_TARGET_DIR="$base/target" cargo build --release --bin modelc)
cargo build --release --bin modelc
exec python3 benches/compare.py --base "$base/target/release/modelc" "$@"
