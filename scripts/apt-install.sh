#!/usr/bin/env bash
# Installs Debian packages (through sudo when not root): the test scripts
# call it only for what they found missing, so a prepared machine never
# touches apt.
set -euo pipefail
[ "$#" -gt 0 ] || exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
