#!/usr/bin/env bash
# The shortest real path on the bundled example: build a closure with Nix
# (tests/fixtures/closure.nix), turn it into an image with `nixstream image`
# straight into `docker load`, and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-deps
. scripts/nix-env.sh
cargo build --release --quiet
app=$(nix-build --no-out-link "${NIX_BUILD_OPTS[@]}" tests/fixtures/closure.nix 2>/dev/null)
echo "demo: nixstream image $app ($(nix-store -qR "$app" 2>/dev/null | wc -l) store paths) | docker load" >&2
scripts/with-dockerd bash -c "
  set -euo pipefail
  docker rmi -f nixstream-demo:latest >/dev/null 2>&1 || true
  target/release/nixstream image '$app' --tag nixstream-demo:latest --config '{\"Cmd\": [\"$app/bin/app\"]}' | docker load
  docker run --rm --network=none nixstream-demo:latest
"
