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
# Idempotent (scripts/apt-ensure.sh): installs only what is missing. Needs root (or sudo).
set -eu

PACKAGES="cargo rustc libzmq3-dev pkg-config librust-zmq-dev librust-serde-json-dev librust-tokio-dev librust-futures-dev"

sh "$(dirname "$0")/apt-ensure.sh" install-rust-deps $PACKAGES

echo "install-rust-deps: $(/usr/bin/cargo --version), $(/usr/bin/rustc --version)"
