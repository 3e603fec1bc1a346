#!/bin/sh
# An example service: greets the client, then answers each line it sends.
# Whatever this script prints goes to the client; what it prints on stderr
# goes to superd's log, tagged with the service name and pid.
echo "hello ${REMOTE_ADDR:-stranger}, this is ${SUPERD_SERVICE} on $(hostname)"
echo "hello: client ${REMOTE_ADDR}:${REMOTE_PORT} connected" >&2
while IFS= read -r line; do
    [ "$line" = "quit" ] && break
    printf 'you said: %s\n' "$line"
done
echo "bye"
