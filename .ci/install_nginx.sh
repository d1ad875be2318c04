#!/usr/bin/env bash
# Install Debian's nginx for the remote-shard tests (tests/test_remote_*.py serve shards over HTTP from loopback).
# Nothing to do when nginx is installed; needs root otherwise (CI runs as root). Starts no daemon: each test brings
# up its own nginx on a free loopback port with a private config and stops it (the tests fall back to Python's
# http.server when nginx is missing, unless DIT_REQUIRE_NGINX=1).
set -euo pipefail

if command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]]; then
    echo "install_nginx: nginx is installed ($(/usr/sbin/nginx -v 2>&1))"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install_nginx: need root to apt-get install nginx-light" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
# Debian's post-install script starts the service: keep it from doing so (the tests run their own instance).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    made_policy=1
fi
trap '[[ $made_policy = 1 ]] && rm -f "$policy"' EXIT
apt-get update -q
apt-get install -y -q --no-install-recommends nginx-light
echo "install_nginx: installed nginx-light ($(/usr/sbin/nginx -v 2>&1))"
