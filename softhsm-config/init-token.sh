#!/bin/sh
# Sets up tapsign's SoftHSM2 token under VAR_DIR, idempotently:
#   VAR_DIR/softhsm/softhsm2.conf   rendered from softhsm2.conf.in
#   VAR_DIR/softhsm/tokens/         the token files (0700)
#   VAR_DIR/softhsm/user.pin        the user PIN tapsign logs in with (0600, generated once)
#   VAR_DIR/softhsm/so.pin          the security officer PIN (0600, generated once)
# then runs 'tapsign hsm init --create-token', which initialises the token if it is new
# (PINs pass through memory, never a command line) and creates the missing keys.
# Usage: init-token.sh VAR_DIR TAPSIGN_EXECUTABLE
set -eu

var_dir=$1
tapsign=$2
here=$(cd "$(dirname "$0")" && pwd)
dir="$var_dir/softhsm"

umask 077
mkdir -p "$dir/tokens"
tokendir=$(cd "$dir/tokens" && pwd)
rendered=$(sed "s|@TOKENDIR@|$tokendir|" "$here/softhsm2.conf.in")
if [ ! -f "$dir/softhsm2.conf" ] || [ "$(cat "$dir/softhsm2.conf")" != "$rendered" ]; then
    echo "==> writing $dir/softhsm2.conf"
    printf '%s\n' "$rendered" > "$dir/softhsm2.conf"
fi
for pin in user so; do
    if [ ! -s "$dir/$pin.pin" ]; then
        echo "==> generating $dir/$pin.pin"
        LC_ALL=C tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 24 > "$dir/$pin.pin"
    fi
done

echo "==> tapsign hsm init --create-token (token 'tapsign' in $tokendir)"
SOFTHSM2_CONF="$dir/softhsm2.conf" TAPSIGN_HSM_PIN_FILE="$dir/user.pin" \
    "$tapsign" hsm init --create-token --so-pin-file "$dir/so.pin"
