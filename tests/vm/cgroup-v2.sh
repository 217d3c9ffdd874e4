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
for moved in system.slice/agentcube.service container; do
    [ -d $CG/$moved/agentcube-manager ] || fail "$moved: the manager did not move into a leaf"
done
[ $failed -eq 0 ] && echo "cgroup-v2: all scenarios passed"
exit $failed
