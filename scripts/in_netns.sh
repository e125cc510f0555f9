#!/usr/bin/env bash
# Runs a command in a private network namespace whose only interface is loopback (up), so nothing it starts
# can listen on, or advertise, an external address. Used for everything Ray: Ray binds every interface and
# registers the machine's external address even when told 127.0.0.1; in here the only address is 127.0.0.1.
#
#   scripts/in_netns.sh python -m pytest -q tests/test_ray_embed.py
#   scripts/in_netns.sh bundlerec-export --ray ...
#
# As root: `unshare --net`; otherwise `unshare --net --map-root-user` (needs unprivileged user namespaces).
# Exit status 125 means the namespace could not be made (unshare/ip missing or not permitted).
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi
for tool in unshare ip; do
    command -v "$tool" >/dev/null || { echo "in_netns.sh: $tool not found" >&2; exit 125; }
done
flags=(--net)
[ "$(id -u)" -eq 0 ] || flags+=(--map-root-user)
unshare "${flags[@]}" true 2>/dev/null || { echo "in_netns.sh: unshare ${flags[*]} not permitted here" >&2; exit 125; }
# shellcheck disable=SC2016  # $@ expands in the inner shell
exec unshare "${flags[@]}" -- bash -c 'ip link set lo up || exit 125; exec "$@"' in_netns.sh "$@"
