#!/bin/sh
# Answer a local client (etc/examples/unix-socket.yaml) with who it is, as
# the kernel told superd, and this machine's load.
printf 'hello uid %s gid %s pid %s\n' \
    "${REMOTE_UID:-?}" "${REMOTE_GID:-?}" "${REMOTE_PID:-?}"
read -r one five fifteen _ < /proc/loadavg
printf 'load %s %s %s\n' "$one" "$five" "$fifteen"
