#!/bin/sh
# Exec-mode handler of the hello example: the job's payload arrives on stdin, the result goes to
# stdout, and the exit code tells the runtime what happened (0 = done).
set -eu
name=$(cat)
[ -n "$name" ] || name=world
printf 'Hello, %s!\n' "$name"
