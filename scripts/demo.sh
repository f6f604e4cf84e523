#!/usr/bin/env bash
# The main job on a bundled example: builds tests/fixtures/closure.nix with
# Nix, streams its image with nixstream into `docker load`, and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-deps
. scripts/nix-env.sh
cargo build --release --quiet
app=$(nix-build --no-out-link "${NIX_BUILD_OPTS[@]}" tests/fixtures/closure.nix 2>/dev/null)
work=$(mktemp -d)
conf=$(scripts/conf-for-closure "$app" "$work" --tag nixstream-demo:latest --cmd "$app/bin/app")
echo "demo: streaming the closure of $app ($(nix-store -qR "$app" | wc -l) store paths) into docker load" >&2
scripts/with-dockerd bash -c "
  docker rmi -f nixstream-demo:latest >/dev/null 2>&1 || true
  target/release/nixstream stream '$conf' | docker load
  docker run --rm --network=none nixstream-demo:latest
"
rm -rf "$work"
