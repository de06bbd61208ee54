#!/usr/bin/env bash
# The system packages of the browser test (tests/test_serve_page.py): Debian's chromium and
# chromium-driver, so Selenium drives a real headless Chromium through that chromedriver and never
# downloads one. A no-op when both are present; otherwise apt-get installs them (as root, or with
# sudo; about 75 s). Without apt-get (not Debian or Ubuntu) it says so and goes on: the test then
# skips with that reason. README's test command and .ci/run both call this.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "browser-deps: no apt-get here; install Chromium and its chromedriver yourself, or the page test skips" >&2
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# a failed install (no network, no sudo) is said in one line and is not fatal: the page test then skips
# with its reason, and the rest of the suite still runs
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        --no-install-recommends chromium chromium-driver >/dev/null; }; then
    echo "browser-deps: could not install chromium and chromium-driver with apt-get; the page test will skip" >&2
fi
