#!/bin/sh
# Install the OS packages the Rust client (clients/rust) needs to build OFFLINE:
# Debian's own Rust toolchain (cargo 1.65 / rustc 1.63: the one those crates are
# packaged for, and the crate's rust-version), libzmq, and the Debian-packaged
# Rust crates it uses (zmq 0.9, serde_json 1; tokio 1 and futures 0.3 for the
# async client, cargo feature `tokio`, and its tests and examples), which land
# in /usr/share/cargo/registry (see clients/rust/.cargo/config.toml).
# pkg-config is needed by the zmq-sys build script to find libzmq.
# The tests build with this toolchain (/usr/bin/cargo, /usr/bin/rustc) even where
# another one (rustup's) is on PATH: they build with what a fresh machine gets.
#
# Idempotent: does nothing when everything is installed; otherwise runs
# apt-get update once and installs what is missing. Needs root (or sudo).
set -eu

PACKAGES="cargo rustc libzmq3-dev pkg-config librust-zmq-dev librust-serde-json-dev librust-tokio-dev librust-futures-dev"

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

echo "install-rust-deps: $(/usr/bin/cargo --version), $(/usr/bin/rustc --version)"
