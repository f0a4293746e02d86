#!/bin/sh
# Install the OS packages the Rust client (clients/rust) needs to build OFFLINE:
# libzmq and the Debian-packaged Rust crates it uses (zmq 0.9, serde_json 1;
# tokio 1 and futures 0.3 for the async client, cargo feature `tokio`, and its
# tests and examples), which land in /usr/share/cargo/registry (see
# clients/rust/.cargo/config.toml).
# pkg-config is needed by the zmq-sys build script to find libzmq.
# A Rust toolchain (cargo, rustc >= 1.63) is expected to be on PATH already.
#
# Idempotent: does nothing when everything is installed; otherwise runs
# apt-get update once and installs what is missing. Needs root (or sudo).
set -eu

PACKAGES="libzmq3-dev pkg-config librust-zmq-dev librust-serde-json-dev librust-tokio-dev librust-futures-dev"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        *"install ok installed"*) ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "install-rust-deps: all present ($PACKAGES)"
else
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-rust-deps: apt-get not found; install by hand:$missing" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO="sudo"
        else
            echo "install-rust-deps: run as root (missing:$missing)" >&2
            exit 1
        fi
    fi
    echo "install-rust-deps: installing$missing"
    $SUDO apt-get update
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
fi

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    echo "install-rust-deps: note: cargo is not on PATH; install a Rust toolchain (rustup, or apt-get install cargo)" >&2
fi
