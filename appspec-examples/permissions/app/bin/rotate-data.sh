#!/bin/sh
# Keeps the ten newest files in data/.
cd "$(dirname "$0")/../data" || exit 1
ls -1t | tail -n +11 | while read -r f; do rm -f -- "$f"; done
