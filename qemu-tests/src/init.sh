#!/bin/busybox sh
# /init of the hostbind QEMU test guests (baked into the initramfs by hostbind-qemu-tests'
# image builder). Mounts the basics, loads the virtio + vsock modules listed in
# /lib/modules/order, starts the agent (log on the second serial port) and the test app
# (its lines, prefixed HBAPP, on the console).
/bin/busybox mkdir -p /proc /sys /dev /run/hostbind /var/lib /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "HBINIT start uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" || echo "HBINIT insmod $m failed"
done
AGENT_LOG=info
for a in $(cat /proc/cmdline); do
  case "$a" in
    hostbind.hostname=*) hostname "${a#hostbind.hostname=}" ;;
    hostbind.agent_log=*) AGENT_LOG="${a#hostbind.agent_log=}" ;;
  esac
done
echo "HBINIT modules loaded uptime=$(cut -d' ' -f1 /proc/uptime)"
# Through a pipe, so the agent's log has no terminal colours.
(RUST_LOG="$AGENT_LOG" /bin/hostbind-agent run --socket /run/hostbind/agent.sock 2>&1 | cat >/dev/ttyS1) &
/bin/hostbind-guest-app
echo "HBINIT app exited status=$?"
while true; do sleep 3600; done
