#!/bin/sh
# Installs the system packages tapsign needs, when they are missing:
#   SoftHSM2 (the PKCS#11 token tapsign runs on by default), OpenSC (pkcs11-tool, to inspect
#   tokens), and a C compiler with the OpenSSL and Python headers (for hsm/_p256.c, the
#   batched verifier's C loop).
# Uses apt-get when root, sudo apt-get when sudo works without a password; otherwise it
# stops and says what to install. Idempotent: does nothing when everything is present.
# Usage: install-packages.sh PYTHON
set -eu

python=${1:-python3}
debian=""
brew=""
need() { debian="$debian $1"; brew="$brew $2"; }

command -v softhsm2-util >/dev/null 2>&1 || need softhsm2 softhsm
command -v pkcs11-tool >/dev/null 2>&1 || need opensc opensc
command -v pkg-config >/dev/null 2>&1 || need pkg-config pkg-config
if ! command -v cc >/dev/null 2>&1; then
    need build-essential ""
elif ! printf '#include <openssl/ec.h>\n' \
        | cc $(pkg-config --cflags libcrypto 2>/dev/null) -E -x c - >/dev/null 2>&1; then
    need libssl-dev openssl@3
fi
"$python" - <<'PY' || need python3-dev ""
import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
PY

if [ -z "$debian" ]; then
    echo "==> system packages present (SoftHSM2 $(softhsm2-util --version), OpenSC, C compiler, OpenSSL and Python headers)"
    exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        sudo=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo"
    else
        sudo="none"
    fi
    if [ "$sudo" != none ]; then
        echo "==> installing with apt-get:$debian"
        $sudo apt-get update -qq
        # shellcheck disable=SC2086 # the package list is meant to split
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $debian
        exit 0
    fi
fi

cat >&2 <<MSG
tapsign needs system packages that are missing, and cannot install them here
(not root, no password-less sudo, or no apt-get). Install them, then run make again:
  Debian/Ubuntu:   sudo apt-get install$debian
  macOS/Homebrew:  brew install$brew   (and xcode-select --install for the C compiler)
MSG
exit 1
