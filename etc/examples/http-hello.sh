#!/bin/sh
# A tiny HTTP/1.0 responder for superd (etc/examples/http.yaml): superd
# gives it one connection on stdin/stdout.  It reads the request line and
# the headers, then answers 200 with a text body (GET, HEAD) or 501.
cr=$(printf '\r')

IFS= read -r request || exit 0
request=${request%"$cr"}
set -f                                 # split the request line into words,
set -- $request                        # without expanding * or ? in them
method=${1:-} target=${2:-/}
while IFS= read -r header; do          # headers end with an empty line
    header=${header%"$cr"}
    [ -z "$header" ] && break
done

case $method in
GET|HEAD)
    status="200 OK"
    body=$(printf 'hello from superd\npath: %s\nclient: %s\n' \
        "$target" "${REMOTE_ADDR:-unknown}")
    ;;
*)
    status="501 Not Implemented"
    body="method not implemented"
    ;;
esac
body="$body
"
length=$(printf '%s' "$body" | wc -c)

printf 'HTTP/1.0 %s\r\n' "$status"
printf 'Content-Type: text/plain; charset=utf-8\r\n'
printf 'Content-Length: %d\r\n' "$length"
printf 'Connection: close\r\n\r\n'
[ "$method" = HEAD ] || printf '%s' "$body"
