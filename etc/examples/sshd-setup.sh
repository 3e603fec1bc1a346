#!/bin/sh
# Prepare the private sshd that superd starts (etc/examples/sshd.yaml):
# a host key and an sshd_config in DIR, and sshd's privilege separation
# directory /run/sshd.  Existing files in DIR are kept.  Run as root.
#
# usage: sh sshd-setup.sh [DIR]        (default /etc/superd/sshd)
#
# /run/sshd is emptied at boot; on systemd hosts keep it with
#     echo 'd /run/sshd 0755 root root' > /etc/tmpfiles.d/superd-sshd.conf
set -eu

dir=${1:-/etc/superd/sshd}
here=$(dirname "$0")
umask 022
mkdir -p "$dir"
if [ ! -f "$dir/ssh_host_ed25519_key" ]; then
    ssh-keygen -q -t ed25519 -N '' -C "superd sshd host key" -f "$dir/ssh_host_ed25519_key"
fi
if [ ! -f "$dir/sshd_config" ]; then
    cp "$here/sshd_config" "$dir/sshd_config"
fi
chmod 0600 "$dir/ssh_host_ed25519_key"
chmod 0644 "$dir/sshd_config"
mkdir -p /run/sshd
chmod 0755 /run/sshd
echo "sshd for superd: host key and config in $dir"
ssh-keygen -l -f "$dir/ssh_host_ed25519_key.pub"
