#!/bin/sh
# Usage: sh scripts/apt-ensure.sh LABEL PACKAGE...
# Install whichever of the Debian packages PACKAGE... is not installed yet, for
# the project's own set-up scripts (install-rust-deps.sh, install-browser.sh).
#
# Idempotent: does nothing when everything is installed; otherwise runs
# apt-get update once and installs what is missing. Needs root (or sudo).
set -eu

label=$1
shift

missing=""
for pkg in "$@"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        *"install ok installed"*) ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "$label: all present ($*)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$label: apt-get not found; install by hand:$missing" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "$label: run as root (missing:$missing)" >&2
        exit 1
    fi
fi
echo "$label: installing$missing"
$SUDO apt-get update
# shellcheck disable=SC2086
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
