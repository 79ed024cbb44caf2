#!/usr/bin/env bash
# The systemd unit under a real systemd: boots a Debian 12 container (systemd-nspawn, its own
# network namespace) with systemd as PID 1, installs the .deb in it and checks what
# test-package.sh cannot without systemd: the postinst starts the agent, Type=notify
# readiness, the capabilities and sandbox the agent really gets, that `nft` works inside that
# sandbox, reload (good and broken policy), a broken policy refused at start, restart on
# upgrade, stop on remove with the blocks kept, and the table gone on purge. Run as root:
#
#     packaging/deb/test-unit-nspawn.sh                      # builds with build.sh
#     DEB=target/debian/egressguard_X_amd64.deb packaging/deb/test-unit-nspawn.sh
#
# The container root is made once with debootstrap from the Debian mirror and kept in
# $EG_NSPAWN_ROOT (default /var/tmp/egressguard-nspawn/bookworm); every run boots a throwaway
# copy of it (--ephemeral). Needs: debootstrap, systemd-container.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROOT=${EG_NSPAWN_ROOT:-/var/tmp/egressguard-nspawn/bookworm}
t0=$(date +%s)
step() { printf '\n--- %s (+%ss)\n' "$1" "$(($(date +%s) - t0))"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root"
for tool in debootstrap systemd-nspawn; do
    command -v "$tool" >/dev/null || fail "missing tool: $tool (apt-get install debootstrap systemd-container)"
done

work=$(mktemp -d)
cleanup() {
    local rc=$?
    rm -rf "$work"
    if [ "$rc" = 0 ]; then echo "unit test passed in $(($(date +%s) - t0))s"
    else echo "unit test FAILED (exit $rc) after $(($(date +%s) - t0))s" >&2; fi
    exit "$rc"
}
trap cleanup EXIT

step "package"
if [ -z "${DEB:-}" ]; then
    DEB=$(packaging/deb/build.sh | tail -n 1)
fi
[ -f "$DEB" ] || fail "no package at $DEB"
cp "$DEB" "$work/egressguard.deb"

step "container root ($ROOT)"
if [ ! -x "$ROOT/usr/lib/systemd/systemd" ] || [ ! -e "$ROOT/.egressguard-complete" ]; then
    rm -rf "$ROOT"
    mkdir -p "$(dirname "$ROOT")"
    # The package's dependencies come in here: the container has no network.
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,nftables,adduser,procps \
        bookworm "$ROOT" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
    touch "$ROOT/.egressguard-complete"
fi

# The test runs as a unit at boot, writes its result to the bound directory and powers off.
cat >"$work/inside.sh" <<'INSIDE'
#!/bin/bash
set -uo pipefail
exec >/results/result.log 2>&1
trap 'systemctl poweroff' EXIT
failures=0
ok() { echo "ok: $1"; }
bad() { echo "FAIL: $1"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
wait_for() { # wait_for SECONDS COMMAND...: polls COMMAND until it succeeds
    local deadline=$(($(date +%s) + $1)); shift
    until "$@"; do [ "$(date +%s)" -lt "$deadline" ] || return 1; sleep 0.2; done
}
active() { [ "$(systemctl is-active egressguard)" = active ]; }
journal_has() { journalctl -u egressguard --no-pager -o cat | grep -q "$1"; }
table() { nft list table inet egressguard >/dev/null 2>&1; }

dpkg -i /results/egressguard.deb || bad "dpkg -i"
check "enabled by postinst" test "$(systemctl is-enabled egressguard)" = enabled
check "started by postinst (Type=notify: active only after READY=1)" wait_for 15 active
pid=$(systemctl show -p MainPID --value egressguard)
status=$(cat "/proc/$pid/status")
echo "$status" | grep -E '^(Cap|NoNewPrivs|Seccomp)'
for c in CapEff CapPrm CapAmb CapBnd; do
    check "$c is CAP_NET_ADMIN only" grep -Eq "^$c:\s+0000000000001000$" <<<"$status"
done
check "NoNewPrivs" grep -Eq '^NoNewPrivs:\s+1$' <<<"$status"
check "seccomp filter" grep -Eq '^Seccomp:\s+2$' <<<"$status"
check "runs as egressguard" test "$(stat -c %U "/proc/$pid")" = egressguard
check "runtime dir 0750 egressguard" test "$(stat -c '%a %U %G' /run/egressguard)" = "750 egressguard egressguard"
check "state dir 0750 egressguard" test "$(stat -c '%a %U %G' /var/lib/egressguard)" = "750 egressguard egressguard"
check "/etc read-only for the agent" sh -c "! nsenter -t $pid -m sh -c 'touch /etc/egressguard/x' 2>/dev/null"
check "conntrack switches set by the privileged ExecStartPre (when nf_conntrack is loaded)" \
    sh -c '[ ! -e /proc/sys/net/netfilter/nf_conntrack_acct ] || [ "$(sysctl -n net.netfilter.nf_conntrack_acct)" = 1 ]'

check "systemctl reload" systemctl reload egressguard
check "reload reached the agent" wait_for 5 journal_has "policy reloaded"
echo "bogus_key: 1" >>/etc/egressguard/policy.yaml
check "reload of a broken policy fails visibly" sh -c '! systemctl reload egressguard'
check "agent still running on the previous policy" active
check "restart with a broken policy is refused by ExecStartPre" sh -c '! systemctl restart egressguard'
check "the error names file:line:column" journal_has "policy.yaml:[0-9]*:[0-9]*: error"
sed -i '/^bogus_key/d' /etc/egressguard/policy.yaml
systemctl reset-failed egressguard 2>/dev/null
check "starts again with the policy fixed" systemctl start egressguard
check "active" wait_for 15 active

# `nft` under exactly the agent's sandbox: the installed unit with its ExecStart replaced.
sed -e '/^Type=/d' -e '/^ExecStart/d' -e '/^ExecReload/d' -e '/^NotifyAccess=/d' -e '/^Restart/d' \
    -e 's|^\[Service\]|[Service]\nType=oneshot\nExecStart=/usr/sbin/nft -f /run/eg-table.nft|' \
    /usr/lib/systemd/system/egressguard.service >/etc/systemd/system/egtest-nft.service
cat >/run/eg-table.nft <<'NFT'
table inet egressguard {
    set blocked_v4 { type ipv4_addr; flags timeout; elements = { 192.0.2.7 timeout 1h } }
}
NFT
chmod 644 /run/eg-table.nft
systemctl daemon-reload
check "nft writes the ruleset from inside the agent's sandbox" systemctl start egtest-nft
check "table inet egressguard exists" table
rm -f /etc/systemd/system/egtest-nft.service
systemctl daemon-reload

old_pid=$(systemctl show -p MainPID --value egressguard)
dpkg -i /results/egressguard.deb >/dev/null || bad "reinstall"
check "restarted on upgrade" wait_for 15 sh -c "[ \"\$(systemctl show -p MainPID --value egressguard)\" != $old_pid ] && [ \"\$(systemctl is-active egressguard)\" = active ]"
check "blocks kept across the restart" table

dpkg -r egressguard >/dev/null || bad "dpkg -r"
check "stopped on remove" sh -c '[ "$(systemctl is-active egressguard)" != active ]'
check "blocks kept on remove" table
check "state kept on remove" test -d /var/lib/egressguard
dpkg --purge egressguard >/dev/null || bad "dpkg --purge"
check "table gone on purge" sh -c '! nft list table inet egressguard >/dev/null 2>&1'
check "state gone on purge" test ! -e /var/lib/egressguard
check "policy gone on purge" test ! -e /etc/egressguard

if [ "$failures" = 0 ]; then echo "ALL PASSED"; else echo "$failures FAILED"; fi
INSIDE
chmod 755 "$work/inside.sh"
# The test unit lives in the cached root (rewritten each run); each boot gets a copy of it.
cat >"$ROOT/etc/systemd/system/egtest.service" <<'UNIT'
[Unit]
Description=egressguard package test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/results/inside.sh
[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
ln -sfn ../egtest.service "$ROOT/etc/systemd/system/multi-user.target.wants/egtest.service"

step "boot the container"
# --ephemeral: a throwaway copy of $ROOT, removed when the container stops.
timeout 300 systemd-nspawn --quiet --ephemeral --private-network --register=no --keep-unit \
    --bind="$work:/results" -D "$ROOT" --boot >"$work/console.log" 2>&1 </dev/null || true
cat "$work/result.log" 2>/dev/null || { tail -40 "$work/console.log"; fail "no result from the container"; }
grep -qx "ALL PASSED" "$work/result.log" || fail "checks failed inside the container"
