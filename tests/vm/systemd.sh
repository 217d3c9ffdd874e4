#!/bin/sh
# The local backend under a real systemd (this machine's, systemd as the guest's PID 1 on a cgroup
# v2 kernel: `scripts/vm.py --systemd`), run by `make cgroup-v2` as a unit of that systemd:
#   tests/vm/systemd.sh <repository> <isolation test binary>
# - a service with Delegate=yes (`systemd-run -p Delegate=yes`): the isolation tests' limits;
# - an ordinary user's scope (`systemd-run --user --scope -p Delegate=yes`, uid 1000 under its own
#   user@1000.service, as the README tells users without root): the same tests, as that user;
# - deploy/systemd/agentcube.service itself, started and stopped with systemctl: an SDK session,
#   its sandbox's cgroup under the service's, and a stop that removes every sandbox.
set -u
REPO="$1"
TESTS="$2"
BIN="$REPO/target/debug"
CG=/sys/fs/cgroup
CORE="memory_limit_kills_a_hog pids_limit_stops_a_fork_bomb cgroups_are_removed_with_the_sandbox"
failed=0
fail() { echo "systemd: FAILED: $*"; failed=1; }

echo "systemd: $(systemctl --version | head -1)"
# The system bus, which systemd-run talks over (its socket is not up this early in the boot).
systemctl start dbus.socket || fail "no system bus"
echo "systemd: scenario service: systemd-run -p Delegate=yes"
systemd-run --quiet --wait --pipe --collect --unit=isolation-tests -p Delegate=yes -E HOME=/root \
    -- "$TESTS" $CORE --test-threads=1 > /tmp/service.log 2>&1 || { cat /tmp/service.log; fail "service: tests"; }
grep -E "^test " /tmp/service.log

echo "systemd: scenario user: systemd-run --user --scope -p Delegate=yes, as uid 1000"
systemctl start user@1000.service || { journalctl -b --no-pager | grep -i -E "user@1000|user-runtime|pam" | tail -20; fail "user: no user manager"; }
USERCG=$CG/user.slice/user-1000.slice/user@1000.service
echo "systemd: controllers handed to user@1000.service: $(cat $USERCG/cgroup.controllers)"
# systemd before 252 hands a user no cpu controller: the tests then expect no CPU limit.
NO_CPU=
grep -qw cpu $USERCG/cgroup.controllers || NO_CPU=AGENTCUBE_TEST_NO_CPU_CONTROLLER=1
setpriv --reuid=1000 --regid=1000 --init-groups env -i PATH="$PATH" HOME=/tmp XDG_RUNTIME_DIR=/run/user/1000 $NO_CPU \
    systemd-run --quiet --user --scope -p Delegate=yes -- "$TESTS" $CORE --test-threads=1 > /tmp/user.log 2>&1 \
    || { cat /tmp/user.log; fail "user: tests"; }
grep -E "^test " /tmp/user.log
grep -q "WITHOUT cgroup limits" /tmp/user.log && fail "user: the sandboxes ran without limits"

echo "systemd: scenario unit: deploy/systemd/agentcube.service"
mkdir -p /tmp/manifests && cp "$REPO/examples/code-interpreter.yaml" /tmp/manifests/
WM=18080 ROUTER=18081
printf '%s\n' AGENTCUBE_IMAGES=host AGENTCUBE_WM_PORT=$WM AGENTCUBE_ROUTER_PORT=$ROUTER > /tmp/agentcube.env
sed -e "s|/usr/local/bin/agentcube|$BIN/agentcube|" -e "s|/etc/agentcube/manifests|/tmp/manifests|" \
    -e "s|/var/lib/agentcube|/tmp/agentcube-state|" -e "s|/etc/agentcube/agentcube.env|/tmp/agentcube.env|" \
    "$REPO/deploy/systemd/agentcube.service" > /run/systemd/system/agentcube.service
systemctl daemon-reload && systemctl start agentcube || fail "unit: start"
up=
for _ in $(seq 120); do
    curl -sf http://127.0.0.1:$ROUTER/health/ready > /dev/null && curl -sf http://127.0.0.1:$WM/health > /dev/null && up=1 && break
    sleep 0.5
done
[ -n "$up" ] || { journalctl -u agentcube --no-pager | tail -30; fail "unit: not serving"; }
"$REPO/.venv/bin/python" -B - $WM $ROUTER <<'EOF' || fail "unit: SDK session"
import glob, sys
from agentcube import CodeInterpreterClient
wm, router = sys.argv[1:]
with CodeInterpreterClient(workload_manager_url=f"http://127.0.0.1:{wm}", router_url=f"http://127.0.0.1:{router}") as ci:
    assert ci.execute_command("echo served").strip() == "served"
    # The sandboxes' cgroups (this session's and the warm pool's) are under the service's own,
    # with their limits.
    found = glob.glob("/sys/fs/cgroup/system.slice/agentcube.service/agentcube/*/*/memory.max")
    print("systemd: sandbox cgroups:", len(found), [open(f).read().strip() for f in found])
    assert found and all(open(f).read().strip() != "max" for f in found), found
EOF
grep -q "$(systemctl show -p MainPID --value agentcube)" $CG/system.slice/agentcube.service/agentcube-manager/cgroup.procs \
    || fail "unit: the manager is not in its leaf"
systemctl stop agentcube
result=$(systemctl show -p Result --value agentcube) status=$(systemctl show -p ExecMainStatus --value agentcube)
[ "$result" = success ] && [ "$status" = 0 ] || fail "unit: stop ended with $result, status $status"
journalctl -u agentcube --no-pager | grep -q "stopped; no sandbox left running" \
    || { journalctl -u agentcube --no-pager | tail -20; fail "unit: no clean stop"; }
left=$(pgrep -a -x "bwrap|picod")
[ -z "$left" ] || fail "unit: sandbox processes outlived the service: $left"

[ $failed -eq 0 ] && echo "systemd: all scenarios passed"
exit $failed
