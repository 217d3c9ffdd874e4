#!/bin/sh
# The local backend's cgroup limits on cgroup v2, run as root inside `scripts/vm.py`'s guest (a
# real kernel with every controller on the unified hierarchy) by `make test`:
#   tests/vm/cgroup-v2.sh <isolation test binary> [directory for the tests' logs]
# Three places a manager runs on a v2 host, each set up as systemd or a container runtime would:
#   session:   a login session's scope, the shell that started it beside it (`agentcube up` from a
#              terminal): its sandboxes' cgroups go under the hierarchy's root
#   service:   a service with Delegate=yes, alone in its cgroup: they go under it, the manager
#              moving into a leaf of its own
#   container: the root of a cgroup namespace, alone in it (a container): likewise
#   user:      without root, a scope of the user's own systemd started by
#              `systemd-run --user --scope -p Delegate=yes`, given only memory and pids (what
#              systemd before 252 delegates to a user): they go under it, no CPU limits
# In each, the isolation tests that need limits run: a memory hog killed at its limit, a fork
# bomb stopped at the pid limit, the limits written and the cgroups gone with their sandbox.
set -u
TESTS="$1"
LOGS="${2:-/tmp}"
CG=/sys/fs/cgroup
# Every limit test in the first scenario (`agentcube up`'s); the other two, where only the place
# differs, run the three that show limits are in force and go with their sandbox.
FULL="memory_limit_kills_a_hog pids_limit_stops_a_fork_bomb cgroups_are_removed_with_the_sandbox out_of_memory_takes_commands_before_picod files_are_served_while_processes_hold_the_whole_limit"
CORE="memory_limit_kills_a_hog pids_limit_stops_a_fork_bomb cgroups_are_removed_with_the_sandbox"
failed=0
fail() { echo "cgroup-v2: FAILED: $*"; failed=1; }

echo "+cpu +memory +pids" > $CG/cgroup.subtree_control
mkdir -p $CG/user.slice/session-1.scope $CG/system.slice/agentcube.service $CG/container
echo "+cpu +memory +pids" > $CG/user.slice/cgroup.subtree_control
echo "+cpu +memory +pids" > $CG/system.slice/cgroup.subtree_control

# Runs the tests $5 of the command after it in cgroup $2 (beside this script when $3 is "shared",
# else alone), then checks that its sandbox cgroups went under $4 and that none is left.
scenario() {
    name=$1 cgroup=$2 shared=$3 expect=$4 filter=$5; shift 5
    echo "cgroup-v2: scenario $name: the manager in $cgroup${shared:+, beside the shell that started it}"
    [ -n "$shared" ] && echo $$ > $CG$cgroup/cgroup.procs
    sh -c 'echo $$ > '"$CG$cgroup"'/cgroup.procs && exec "$@"' sh "$@" $filter --test-threads=1 > $LOGS/$name.log 2>&1
    rc=$?
    grep -E "^test |^test result" $LOGS/$name.log
    [ $rc -eq 0 ] || { grep -E "panicked|assert|left|right|WITHOUT" $LOGS/$name.log | head -20; fail "$name: tests"; }
    [ -d "$CG$expect" ] || fail "$name: no $CG$expect"
    left=$(find $CG -mindepth 1 -type d -path "*/agentcube/*" | head -5)
    [ -z "$left" ] || fail "$name: sandbox cgroups left: $left"
}

scenario session /user.slice/session-1.scope shared /agentcube "$FULL" "$TESTS"
echo $$ > $CG/cgroup.procs  # this script back at the root: the next two run alone
scenario service /system.slice/agentcube.service "" /system.slice/agentcube.service/agentcube "$CORE" "$TESTS"
# A container: the tests see the cgroup namespace's root as /, cgroup2 mounted from inside it.
scenario container /container "" /container/agentcube "$CORE" \
    unshare --cgroup --mount sh -c 'umount /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"' sh "$TESTS"
# The user's scope, delegated as systemd does it: user@1000.service's directory and its
# cgroup.procs, cgroup.threads and cgroup.subtree_control files given to the user, whose manager
# makes the rest as that user; root (systemd) moves the manager's process in, which then runs as
# the user. Only memory and pids are handed to it.
USERCG=/user.slice/user-1000.slice/user@1000.service
mkdir -p $CG$USERCG
echo "+memory +pids" > $CG/user.slice/user-1000.slice/cgroup.subtree_control
chown 1000:1000 $CG$USERCG $CG$USERCG/cgroup.procs $CG$USERCG/cgroup.threads $CG$USERCG/cgroup.subtree_control
AS_USER="setpriv --reuid=1000 --regid=1000 --clear-groups env HOME=/tmp"
$AS_USER sh -c "mkdir -p $CG$USERCG/app.slice/run-r1.scope \
    && echo '+memory +pids' > $CG$USERCG/cgroup.subtree_control \
    && echo '+memory +pids' > $CG$USERCG/app.slice/cgroup.subtree_control" || fail "user: delegation"
scenario user $USERCG/app.slice/run-r1.scope "" $USERCG/app.slice/run-r1.scope/agentcube "$CORE" \
    $AS_USER AGENTCUBE_TEST_NO_CPU_CONTROLLER=1 "$TESTS"
WM="$(dirname "$TESTS")/../workload-manager"
# The same with --require-cgroups: refused at start, naming the missing controller, nothing left.
$AS_USER mkdir $CG$USERCG/app.slice/run-r2.scope
timeout 60 sh -c 'echo $$ > '"$CG$USERCG/app.slice/run-r2.scope"'/cgroup.procs && exec "$@"' sh $AS_USER "$WM" --backend local \
    --store memory --require-cgroups --manifests /tmp --state-dir /tmp/required-state > $LOGS/required.log 2>&1 \
    && fail "required: started without the cpu controller"
grep -q "not given the cpu controller" $LOGS/required.log || { cat $LOGS/required.log; fail "required: no reason given"; }
left=$(find $CG$USERCG/app.slice/run-r2.scope/agentcube -mindepth 1 -type d 2>/dev/null)
[ -z "$left" ] || { cat $LOGS/required.log; fail "required: cgroups left: $left"; }
# Without root and without such a scope (a terminal's login session, the shell beside it): no
# limits, and the warning says how to get them.
echo $$ > $CG/user.slice/session-1.scope/cgroup.procs
mkdir -p /tmp/unprivileged-manifests
$AS_USER "$WM" --backend local --store memory --bind 127.0.0.1 --port 18089 --manifests /tmp/unprivileged-manifests \
    --state-dir /tmp/unprivileged-state > $LOGS/unprivileged.log 2>&1 &
wm=$!
for _ in $(seq 60); do grep -q "WITHOUT cgroup limits" $LOGS/unprivileged.log && break; sleep 0.5; done
kill $wm; wait $wm
echo $$ > $CG/cgroup.procs
grep "WITHOUT cgroup limits" $LOGS/unprivileged.log | grep -q "systemd-run --user --scope -p Delegate=yes" \
    || { cat $LOGS/unprivileged.log; fail "unprivileged: the warning does not say how to get limits"; }
for moved in system.slice/agentcube.service container $USERCG/app.slice/run-r1.scope; do
    [ -d $CG/$moved/agentcube-manager ] || fail "$moved: the manager did not move into a leaf"
done
[ $failed -eq 0 ] && echo "cgroup-v2: all scenarios passed"
exit $failed
