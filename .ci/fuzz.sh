#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time each
# (FUZZ_SECONDS, default 30) on the nightly toolchain. Seeds come from
# fuzz/seeds/<target>/ (committed); the growing corpus lives in
# fuzz/corpus/<target>/ (not committed). A crash fails the script and
# leaves its input in fuzz/artifacts/<target>/: turn it into a regression
# test (see docs/development/fuzzing-and-chaos.md) before fixing.
#
# Usage: .ci/fuzz.sh [target…]   (default: every target)
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${FUZZ_SECONDS:-30}"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cd fuzz
if [ "$#" -gt 0 ]; then
    targets="$*"
else
    targets="$(cargo +nightly fuzz list)"
fi

# Build once up front so the time bound is spent fuzzing.
cargo +nightly fuzz build

for t in $targets; do
    mkdir -p "corpus/$t" "seeds/$t"
    echo "fuzz.sh: $t for ${secs}s" >&2
    cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len=20000 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
done
echo "fuzz.sh: no crash in: $targets" >&2
