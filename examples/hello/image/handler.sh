#!/bin/sh
# Exec-mode handler of the hello example: the job's payload arrives on stdin, the result goes to
# stdout, and the exit code tells the runtime what happened (0 = done). The payload is either a
# JSON object with a "name" (`{"name": "world"}`, as in the README) or the name as plain text.
set -eu
payload=$(cat)
case "$payload" in
    "{"*)
        # The "name" string of a one-line JSON object; busybox has no JSON parser, and this
        # example needs no more than that.
        name=$(printf '%s' "$payload" | sed -n 's/.*"name"[[:space:]]*:[[:space:]]*"\([^"\\]*\)".*/\1/p')
        ;;
    *) name=$payload ;;
esac
[ -n "$name" ] || name=world
printf 'Hello, %s!\n' "$name"
