#!/bin/sh
# Install the headless browser the web page's test (tests/test_web_page.py)
# drives: Debian's own Chromium and its matching chromedriver, from apt (no
# browser build is downloaded by the tests or by Selenium: the test points
# Selenium at /usr/bin/chromedriver, so Selenium Manager never runs).
#
# Idempotent: does nothing when everything is installed; otherwise runs
# apt-get update once and installs what is missing. Needs root (or sudo).
set -eu

PACKAGES="chromium chromium-driver"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        *"install ok installed"*) ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "install-browser: all present ($PACKAGES)"
else
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-browser: apt-get not found; install by hand:$missing" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO="sudo"
        else
            echo "install-browser: run as root (missing:$missing)" >&2
            exit 1
        fi
    fi
    echo "install-browser: installing$missing"
    $SUDO apt-get update
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
fi

echo "install-browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium: not runnable'), $(/usr/bin/chromedriver --version 2>/dev/null || echo 'chromedriver: not runnable')"
