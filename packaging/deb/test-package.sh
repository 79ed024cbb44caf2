#!/usr/bin/env bash
# Package test: builds the .deb, runs lintian, installs it on this machine (Debian 12) the way
# an operator does, checks what the operator relies on, upgrades it with a modified conffile,
# removes it, purges it, and checks that nothing is left. Run as root:
#
#     packaging/deb/test-package.sh            # builds with packaging/deb/build.sh
#     DEB=path/to/egressguard_X_amd64.deb packaging/deb/test-package.sh   # tests that file
#
# systemd need not run as PID 1 (CI has none): the maintainer scripts then enable the unit
# without starting it, and this script runs the agent itself under the unit's identity and
# capabilities. Everything the package does to the kernel (nftables) happens in a network
# namespace of this script's own. Cleans up after itself, also on failure; the egressguard
# user and group are removed at the end when this script created them.
#
# Needs: cargo-deb, lintian, dpkg-dev, binutils, nftables, iproute2, systemd (for
# systemd-analyze; it need not be running).
# Single-quoted $… below is meant for the inner shell or is literal text.
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

PKG=egressguard
NS="egpkgtest$$"
UNIT=/usr/lib/systemd/system/egressguard.service
POLICY=/etc/egressguard/policy.yaml
STATE=/var/lib/egressguard
# The exposure score the unit must not exceed (systemd-analyze security; lower is better).
MAX_EXPOSURE=2.0

t0=$(date +%s)
step() { printf '\n--- %s (+%ss)\n' "$1" "$(($(date +%s) - t0))"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
check() { # check DESCRIPTION COMMAND...: runs COMMAND, fails the test with DESCRIPTION
    local what=$1; shift
    if "$@"; then echo "ok: $what"; else fail "$what"; fi
}
installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null || true)" = installed ]; }
known() { dpkg-query -W "$PKG" >/dev/null 2>&1 && [ "$(dpkg-query -W -f='${db:Status-Status}' "$PKG")" != not-installed ]; }
in_ns() { ip netns exec "$NS" "$@"; }
table_in_ns() { ip netns exec "$NS" nft list table inet egressguard >/dev/null 2>&1; }
# The identity and privileges the unit gives the agent (User=, AmbientCapabilities=,
# CapabilityBoundingSet=, NoNewPrivileges=), without systemd.
as_agent() {
    setpriv --reuid=egressguard --regid=egressguard --init-groups \
        --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin \
        --bounding-set=-all,+net_admin --no-new-privs "$@"
}

[ "$(id -u)" = 0 ] || fail "run as root (installs a package)"
for tool in lintian dpkg-deb ip nft setpriv systemd-analyze; do
    command -v "$tool" >/dev/null || fail "missing tool: $tool"
done
if known; then
    # Never purge an operator's installation by accident; CI machines are disposable.
    [ -n "${CI:-}" ] || fail "$PKG is installed on this machine; purge it first or run with CI=1"
    echo "purging a $PKG left by an earlier run"
    dpkg --purge "$PKG" >/dev/null
fi
user_existed=no
getent passwd egressguard >/dev/null && user_existed=yes
group_existed=no
getent group egressguard >/dev/null && group_existed=yes

work=$(mktemp -d)
agent_pid=
cleanup() {
    local rc=$?
    set +e
    [ -n "$agent_pid" ] && kill -KILL "$agent_pid" 2>/dev/null
    if known; then
        if ip netns list | grep -qw "$NS"; then in_ns dpkg --purge "$PKG" >/dev/null 2>&1
        else dpkg --purge "$PKG" >/dev/null 2>&1; fi
    fi
    ip netns del "$NS" 2>/dev/null
    rm -rf "$work" /run/egressguard
    [ "$user_existed" = no ] && getent passwd egressguard >/dev/null && userdel egressguard >/dev/null 2>&1
    [ "$group_existed" = no ] && getent group egressguard >/dev/null && groupdel egressguard >/dev/null 2>&1
    echo
    if [ "$rc" = 0 ]; then echo "package test passed in $(($(date +%s) - t0))s"
    else echo "package test FAILED (exit $rc) after $(($(date +%s) - t0))s" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
ip netns add "$NS"

step "build"
if [ -z "${DEB:-}" ]; then
    DEB=$(packaging/deb/build.sh | tail -n 1)
fi
[ -f "$DEB" ] || fail "no package at $DEB"
DEB=$(readlink -f "$DEB")
echo "package: $DEB ($(du -h "$DEB" | cut -f1))"
dbgsym=${DEB%/*}/$PKG-dbgsym_${DEB#*/"$PKG"_}
dbgsym=${dbgsym%.deb}.ddeb
if [ -f "$dbgsym" ]; then
    check "debug symbols in the -dbgsym package" \
        sh -c "dpkg-deb -c '$dbgsym' | grep -q '/usr/lib/debug/.build-id/.*\.debug$'"
fi

step "lintian"
# Errors and warnings fail; each accepted tag is overridden with a reason (lintian-overrides).
lintian_rc=0
lintian --fail-on error,warning --pedantic --display-info "$DEB" >"$work/lintian.log" 2>&1 || lintian_rc=$?
grep -v '^running with root privileges' "$work/lintian.log" || true
check "lintian: no error, no warning (pedantic)" test "$lintian_rc" = 0

step "package metadata"
control=$(dpkg-deb -f "$DEB")
check "depends on nftables" grep -Eq '^Depends:.*\bnftables\b' <<<"$control"
check "recommends conntrack" grep -Eq '^Recommends:.*\bconntrack\b' <<<"$control"
check "policy is a conffile" grep -qx "$POLICY" <(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles)
dpkg-deb -c "$DEB" | awk '{print $6}' >"$work/files"
check "no file outside the expected places" sh -c "! grep -Ev \
    '^\./((usr|usr/share|usr/lib|etc)/)?$|^\./(usr/sbin|usr/share/(doc|man|bash-completion|zsh|lintian)|usr/lib/systemd|etc/egressguard)/' \
    '$work/files'"

step "install (apt, as an operator does)"
# apt resolves nftables/procps/adduser from the Debian mirror if they are missing.
apt-get install -y -q --no-install-recommends "$DEB" >"$work/apt.log" 2>&1 \
    || { cat "$work/apt.log"; fail "apt-get install"; }
check "package installed" installed
for f in /usr/sbin/egressguard "$POLICY" "$UNIT" \
    /usr/share/man/man8/egressguard.8.gz \
    /usr/share/man/man5/egressguard-policy.5.gz \
    /usr/share/bash-completion/completions/egressguard \
    /usr/share/zsh/vendor-completions/_egressguard \
    /usr/share/doc/egressguard/copyright /usr/share/doc/egressguard/changelog.Debian.gz \
    /usr/share/doc/egressguard/examples/isp-edge.yaml \
    /usr/share/doc/egressguard/examples/vps-host.yaml \
    /usr/share/doc/egressguard/examples/mail-and-scanner.yaml; do
    check "file $f" test -s "$f"
done
check "binary is executable" test -x /usr/sbin/egressguard
check "binary runs" /usr/sbin/egressguard --version
check "man page is gzipped roff egressguard(8)" sh -c 'zcat /usr/share/man/man8/egressguard.8.gz | grep -q "^\.TH EGRESSGUARD 8"'
check "man page is gzipped roff egressguard-policy(5)" sh -c 'zcat /usr/share/man/man5/egressguard-policy.5.gz | grep -q "^\.TH EGRESSGUARD\\\\-POLICY 5"'
check "man page documents the check verb" sh -c 'zcat /usr/share/man/man8/egressguard.8.gz | grep -qi "egressguard check"'
check "bash completion loads and completes the verbs" bash -c '
    source /usr/share/bash-completion/completions/egressguard
    complete -p egressguard >/dev/null || exit 1
    COMP_WORDS=(egressguard ch); COMP_CWORD=1; COMP_LINE="egressguard ch"; COMP_POINT=${#COMP_LINE}
    "$(complete -p egressguard | sed -n "s/.*-F \([^ ]*\) .*/\1/p")" egressguard ch egressguard
    [[ " ${COMPREPLY[*]} " == *" check "* ]]'
check "zsh completion defines _egressguard" grep -q '^#compdef egressguard' /usr/share/zsh/vendor-completions/_egressguard
check "installed policy is the shipped default" cmp -s policies/default.yaml "$POLICY"
check "shipped policy is in dry-run mode" grep -qx 'mode: dry-run' "$POLICY"
check "dpkg knows the conffile" sh -c "dpkg-query -W -f='\${Conffiles}' $PKG | grep -q '$POLICY'"
check "dpkg --verify finds every file intact (md5sums)" sh -c "[ -z \"\$(dpkg --verify $PKG)\" ]"

step "user, group, directories"
check "system group egressguard" sh -c '[ "$(getent group egressguard | cut -d: -f3)" -lt 1000 ]'
check "system user egressguard" sh -c '[ "$(getent passwd egressguard | cut -d: -f3)" -lt 1000 ]'
check "user cannot log in" sh -c 'getent passwd egressguard | grep -q ":/usr/sbin/nologin$"'
check "state dir 0750 egressguard:egressguard" \
    sh -c "[ \"\$(stat -c '%a %U %G' $STATE)\" = '750 egressguard egressguard' ]"
check "policy owned by root, mode 0644 (the agent reads it, never writes it)" \
    test "$(stat -c '%a %U' "$POLICY")" = '644 root'

step "systemd unit"
check "unit enabled (multi-user.target.wants)" \
    test "$(readlink -f /etc/systemd/system/multi-user.target.wants/egressguard.service)" = "$UNIT"
check "systemd-analyze verify" systemd-analyze verify --man=no "$UNIT"
systemd-analyze security --offline=true "$UNIT" >"$work/security.txt" 2>&1 || true
score=$(sed -n 's/.*Overall exposure level for egressguard.service: \([0-9.]*\).*/\1/p' "$work/security.txt")
echo "systemd-analyze security exposure: ${score:-?} (must be <= $MAX_EXPOSURE)"
check "exposure score <= $MAX_EXPOSURE" awk -v s="${score:-99}" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }'
check "unit runs check before start" grep -qx 'ExecStartPre=/usr/sbin/egressguard check --policy /etc/egressguard/policy.yaml' "$UNIT"
check "unit reloads with SIGHUP" grep -qx 'ExecReload=/bin/kill -HUP $MAINPID' "$UNIT"
check "unit bounds capabilities to CAP_NET_ADMIN" grep -qx 'CapabilityBoundingSet=CAP_NET_ADMIN' "$UNIT"

step "the agent under the unit's identity and capabilities"
check "egressguard check passes on the installed conffile (as the agent)" \
    as_agent /usr/sbin/egressguard check --policy "$POLICY"
# What the unit's RuntimeDirectory= would create.
install -d -m 0750 -o egressguard -g egressguard /run/egressguard
# Not through a shell function: $! must be the agent itself (ip and setpriv exec).
ip netns exec "$NS" env EGRESSGUARD_LOG=info setpriv --reuid=egressguard --regid=egressguard --init-groups \
    --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin --bounding-set=-all,+net_admin \
    --no-new-privs /usr/sbin/egressguard run --policy "$POLICY" --state-dir "$STATE" \
    --socket /run/egressguard/control.sock >"$work/agent.log" 2>&1 &
agent_pid=$!
wait_log() { # wait_log PATTERN: polls the agent's log for PATTERN, 10 s at most
    local deadline=$(($(date +%s) + 10))
    until grep -q "$1" "$work/agent.log"; do
        [ "$(date +%s)" -lt "$deadline" ] || { cat "$work/agent.log"; fail "agent never logged '$1'"; }
        kill -0 "$agent_pid" 2>/dev/null || { cat "$work/agent.log"; fail "agent died"; }
        sleep 0.1
    done
}
wait_log "started"
echo "ok: agent started as egressguard with CAP_NET_ADMIN only"
kill -HUP "$agent_pid"
wait_log "policy reloaded"
echo "ok: agent reloads on SIGHUP"
kill -TERM "$agent_pid"
agent_rc=0
wait "$agent_pid" || agent_rc=$?
agent_pid=
check "agent stops cleanly on SIGTERM (exit $agent_rc)" test "$agent_rc" = 0
# The external nft the agent runs inherits CAP_NET_ADMIN through the ambient set, despite
# NoNewPrivileges: build the agent's table that way, as enforcement will.
check "nft run by the agent's identity can write the ruleset" \
    in_ns setpriv --reuid=egressguard --regid=egressguard --init-groups \
    --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin --bounding-set=-all,+net_admin \
    --no-new-privs nft -f - <<'EOF'
table inet egressguard {
    set blocked_v4 { type ipv4_addr; flags timeout; elements = { 192.0.2.66 timeout 1h } }
}
EOF
check "without capabilities it cannot" sh -c "! ip netns exec $NS setpriv --reuid=egressguard \
    --regid=egressguard --init-groups --inh-caps=-all --bounding-set=-all --no-new-privs \
    nft list ruleset >/dev/null 2>&1"
rm -rf /run/egressguard
echo "evidence" >"$STATE/state.db"
chown egressguard:egressguard "$STATE/state.db"

step "upgrade keeps a modified conffile"
marker="# operator edit $$"
echo "$marker" >>"$POLICY"
v1=$(dpkg-deb -f "$DEB" Version)
# A newer revision of the same package, with the shipped policy changed as well, so that dpkg
# meets a conffile changed on both sides (the hard case).
dpkg-deb -R "$DEB" "$work/v2"
sed -i "s/^Version: .*/Version: ${v1}+pkgtest1/" "$work/v2/DEBIAN/control"
echo "# changed upstream" >>"$work/v2$POLICY"
(cd "$work/v2" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum >DEBIAN/md5sums)
dpkg-deb --root-owner-group -b "$work/v2" "$work/egressguard_v2.deb" >/dev/null
in_ns dpkg -i --force-confold "$work/egressguard_v2.deb" >"$work/dpkg.log" 2>&1 \
    || { cat "$work/dpkg.log"; fail "upgrade"; }
check "upgraded to ${v1}+pkgtest1" test "$(dpkg-query -W -f='${Version}' $PKG)" = "${v1}+pkgtest1"
check "operator's policy kept" grep -qx "$marker" "$POLICY"
check "new shipped policy beside it as .dpkg-dist" grep -qx "# changed upstream" "$POLICY.dpkg-dist"
check "kept policy still valid" as_agent /usr/sbin/egressguard check --policy "$POLICY"
check "state kept across upgrade" grep -qx evidence "$STATE/state.db"
check "unit still enabled after upgrade" test -L /etc/systemd/system/multi-user.target.wants/egressguard.service
check "blocks kept across upgrade" table_in_ns
rm -f "$POLICY.dpkg-dist"
# And the same version again (reinstall): the modified conffile is not touched.
in_ns dpkg -i "$work/egressguard_v2.deb" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "reinstall"; }
check "operator's policy kept on reinstall" grep -qx "$marker" "$POLICY"

step "remove (not purge): policy, state and blocks stay"
in_ns dpkg -r "$PKG" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -r"; }
check "binary gone" test ! -e /usr/sbin/egressguard
check "unit gone" test ! -e "$UNIT"
check "policy kept" grep -qx "$marker" "$POLICY"
check "state kept" grep -qx evidence "$STATE/state.db"
check "blocks kept (nft table inet egressguard)" table_in_ns
check "unit masked until reinstall or purge" \
    test "$(readlink /etc/systemd/system/egressguard.service)" = /dev/null

step "purge: nothing left"
in_ns dpkg --purge "$PKG" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg --purge"; }
check "package unknown to dpkg" test -z "$(known && echo yes)"
check "/etc/egressguard gone" test ! -e /etc/egressguard
check "state dir gone" test ! -e "$STATE"
check "nft table inet egressguard gone" test -z "$(table_in_ns && echo present)"
check "no unit symlink or mask left" sh -c '! find /etc/systemd/system -name "egressguard*" | grep -q .'
check "no deb-systemd-helper state left" sh -c '! find /var/lib/systemd/deb-systemd-helper-enabled /var/lib/systemd/deb-systemd-helper-masked -name "egressguard*" 2>/dev/null | grep -q .'
leftover=$(find /usr /etc /var/lib /run -path /proc -prune -o -name '*egressguard*' -print 2>/dev/null \
    | grep -v -e "^$PWD" -e '^/var/lib/dpkg/' -e '^/var/cache/' -e "^$work" || true)
check "no file named egressguard left (found: ${leftover:-none})" test -z "$leftover"
# Debian practice: a system user and group stay on purge (files elsewhere may belong to them).
check "system user kept on purge" sh -c 'getent passwd egressguard >/dev/null'
