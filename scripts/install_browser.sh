#!/usr/bin/env bash
# Installs headless Chromium and its WebDriver (Debian packages chromium, chromium-driver) where apt is there, for
# the browser test of `onestep serve` (tests/test_serve.py; without them it is skipped). Nothing downloads a browser
# from elsewhere.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "Chromium found: $(command -v chromium), $(command -v chromedriver)"; exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing Chromium: apt-get install -y chromium chromium-driver"
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }) \
    && { echo "Chromium installed"; exit 0; }
fi
echo "Chromium is not installed and could not be installed automatically (sudo apt-get install chromium chromium-driver); the browser test of onestep serve is skipped." >&2
exit 1
