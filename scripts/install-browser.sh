#!/bin/sh
# Install the headless browser the web page's test (tests/test_web_page.py)
# drives: Debian's own Chromium and its matching chromedriver, from apt (no
# browser build is downloaded by the tests or by Selenium: the test points
# Selenium at /usr/bin/chromedriver, so Selenium Manager never runs).
#
# Idempotent (scripts/apt-ensure.sh): installs only what is missing. Needs root (or sudo).
set -eu

PACKAGES="chromium chromium-driver"

sh "$(dirname "$0")/apt-ensure.sh" install-browser $PACKAGES

echo "install-browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium: not runnable'), $(/usr/bin/chromedriver --version 2>/dev/null || echo 'chromedriver: not runnable')"
