#!/bin/sh
# Prints what the application can see of its own tree.
root=$(cd "$(dirname "$0")/.." && pwd)
echo "pier permissions example under $root"
ls -lR "$root"
