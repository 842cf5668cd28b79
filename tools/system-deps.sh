#!/usr/bin/env bash
# The system libraries the ffcv extra builds against (OpenCV, libjpeg-turbo, found through
# pkg-config), installed from Debian's packages when this machine allows it (root and apt-get,
# as on the project's CI). Exit 0 when they are there (or were installed), 1 when not: the
# Makefile then installs kdcache without the ffcv extra and the FFCV tests skip.
set -u
have() { pkg-config --exists opencv4 libturbojpeg 2>/dev/null; }
have && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "system-deps: installing OpenCV, libjpeg-turbo and pkg-config (Debian packages) for ffcv"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends libopencv-dev libturbojpeg0-dev pkg-config \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends \
            libopencv-dev libturbojpeg0-dev pkg-config; }; } >/tmp/kdcache-system-deps.log 2>&1
    have && exit 0
    echo "system-deps: apt-get did not install them (see /tmp/kdcache-system-deps.log)"
fi
echo "system-deps: no OpenCV/libjpeg-turbo through pkg-config: kdcache installs without the" \
    "ffcv extra and the FFCV tests skip"
exit 1
