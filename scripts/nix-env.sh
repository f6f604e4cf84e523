#!/usr/bin/env bash
# Sourced by the scripts: single-user Nix from Debian's nix-bin, no sandbox,
# no binary cache (there is no network; nothing here needs nixpkgs).
export NIX_REMOTE=local
NIX_BUILD_OPTS=(--option sandbox false --option substituters '' --option build-users-group '')
