#!/bin/sh
# `docker run IMAGE worker` runs `cvat-hooks worker`; `docker run IMAGE cvat-hooks --help` or any
# other program runs as given (like the official images' entrypoints).
set -e
# Temporary files (the trial's embedded Redis socket, export staging) live on the data volume, so
# the container also runs with a read-only root filesystem.
mkdir -p "${TMPDIR:-/tmp}" 2>/dev/null || true
if [ "$#" -eq 0 ] || ! command -v "$1" >/dev/null 2>&1; then
  exec cvat-hooks "$@"
fi
exec "$@"
