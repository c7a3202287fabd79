#!/usr/bin/env bash
# Node counts and estimated FLOPs (at batch 1, sequence 128) of every spec's
# forward and training program, before and after the e-graph optimiser, and
# the time the optimiser took. Usage: benches/optimize.sh (builds in release).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p modelc
bin=target/release/modelc
printf '| spec | program | nodes | optimised | GFLOP | optimised GFLOP | optimise s |\n|---|---|---:|---:|---:|---:|---:|\n'
for spec in specs/*.model; do
    name=$(basename "$spec" .model)
    for mode in forward train; do
        flag=""
        [ "$mode" = train ] && flag="--train"
        if out=$($bin ir "$spec" $flag --opt --stats 2>/dev/null); then
            before=$(echo "$out" | sed -n 's/^model [^:]*: \([0-9]*\) nodes.*/\1/p')
            after=$(echo "$out" | sed -n 's/^optimised: \([0-9]*\) nodes.*/\1/p')
            f1=$(echo "$out" | sed -n '1s/.*(\([0-9.e+-]*\) at B=1.*/\1/p')
            f2=$(echo "$out" | sed -n '2s/.*(\([0-9.e+-]*\) at B=1.*/\1/p')
            secs=$(echo "$out" | sed -n 's/.* in \([0-9.]*\) s .*/\1/p')
            printf '| %s | %s | %s | %s | %.3f | %.3f | %s |\n' "$name" "$mode" "$before" "$after" \
                "$(echo "$f1 / 1e9" | awk '{printf "%f", $1 / $3}')" "$(echo "$f2 / 1e9" | awk '{printf "%f", $1 / $3}')" "$secs"
        fi
    done
done
