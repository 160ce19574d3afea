#!/usr/bin/env bash
# Shared by the ops scripts: install Debian packages idempotently (apt-get update only when the
# package lists are missing, once per script run).
apt_ready=0
apt_install() {
  if [ "$apt_ready" = 0 ]; then
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]; then
      apt-get update -qq
    fi
    apt_ready=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
