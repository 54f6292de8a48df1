#!/bin/bash
# The power-cut guest's program, run by tests/powercut/init at every boot
# from the data disk (/data). It starts the real dcs-edge with
# /data/etc/edge.toml, then takes commands from the harness on the host
# (10.0.2.2, port dcs.ctl= on the kernel command line), one per line:
#   rotate   rotate the buffer's encryption key the way an operator would:
#            a new key file and a new configuration written with plain shell
#            redirections (no fsync), then a restart of the agent
# With dcs.failpoint=NAME on the kernel command line, the agent pauses at
# that point (DCS_TEST_FAILPOINT) so the harness can cut the power there.
# The power cut is the harness's kill -9 of qemu; nothing here shuts down.
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
say() { echo "guest: $*"; }

FAILPOINT=$(arg dcs.failpoint)
if [[ -n "$FAILPOINT" ]]; then
    export DCS_TEST_FAILPOINT="$FAILPOINT"
fi

AGENT_PID=
start_agent() {
    /data/bin/dcs-edge run --config /data/etc/edge.toml </dev/null &
    AGENT_PID=$!
    say "dcs-edge started (pid $AGENT_PID)"
}

rotate() {
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >/data/etc/buffer-b.key
    cat /data/etc/edge-rotated.toml >/data/etc/edge.toml
    say "key rotated in the configuration; restarting dcs-edge"
    kill -TERM "$AGENT_PID"
    wait "$AGENT_PID"
    start_agent
}

mkdir -p /data/var
say "boot $(cut -d' ' -f1 /proc/uptime)s after power-on; buffer files:" /data/var/*
start_agent

CTL=$(arg dcs.ctl)
if [[ -n "$CTL" ]] && exec 3<>"/dev/tcp/10.0.2.2/$CTL"; then
    echo "booted" >&3
    while read -r cmd <&3; do
        case "$cmd" in
        rotate)
            rotate
            echo "rotated" >&3
            ;;
        *) say "unknown command: $cmd" ;;
        esac
    done
fi
# Until the power is cut.
while :; do sleep 3600; done
