#!/usr/bin/env bash
# Installs the Debian packages a real napari viewer needs under Xvfb (Qt 6's xcb
# platform plugin, OpenGL through Mesa's llvmpipe), if any is missing. Part of the
# README's test command (and so of CI); needs root or sudo only when installing.
set -euo pipefail

# Debian 12 packages. Qt 6 (napari[pyqt6], the napari extra): the libraries its xcb platform plugin
# (PyQt6/Qt6/plugins/platforms/libqxcb.so, libQt6XcbQpa, libQt6Gui, the GLX integration) link against,
# found with ldd and dpkg -S; their own dependencies (libxcb1, libxkbcommon0, libxcb-shm0, ...) come along.
APT_PACKAGES=(
    # virtual X server; xvfb-run refuses to start without xauth
    xvfb xauth
    # OpenGL through Mesa (llvmpipe software rendering): GLX for vispy's canvas, EGL that Qt 6 loads
    libgl1 libglx-mesa0 libgl1-mesa-dri libegl1 libegl-mesa0
    # vispy finds fonts through fontconfig; Qt needs glib and D-Bus libraries
    libfontconfig1 libglib2.0-0 libdbus-1-3
    # Qt 6's xcb platform plugin; without libxcb-cursor0 Qt 6 aborts with "could not load the Qt platform
    # plugin xcb"
    libxcb-cursor0 libxkbcommon-x11-0 libx11-xcb1 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
    libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-sync1 libxcb-xfixes0 libxcb-xkb1
)

echo "== system packages: Debian packages for napari under Xvfb + Mesa (${#APT_PACKAGES[@]} packages)"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    echo "   all already installed, skipping apt-get"
else
    echo "   installing: ${missing[*]}"
    SUDO=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo -n)
        else
            echo "error: not root and no sudo; cannot install: ${missing[*]}" >&2
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get -q -o DPkg::Lock::Timeout=300 update </dev/null
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 \
        install -y --no-install-recommends "${missing[@]}" </dev/null
fi

exit 0
