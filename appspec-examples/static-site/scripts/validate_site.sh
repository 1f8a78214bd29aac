#!/bin/bash
# ValidateService: the site is in place, complete, and readable by the web server's group.
set -euo pipefail
root=/var/www/pier-static-site

fail() { echo "validate_site: $*" >&2; exit 1; }

for f in index.html about.html css/site.css js/site.js robots.txt; do
  [ -s "$root/$f" ] || fail "$root/$f is missing or empty"
done
grep -q '<title>pier static site</title>' "$root/index.html" || fail "$root/index.html is not this site's page"

# Every file 644 and every directory 755, as the AppSpec's permissions say.
bad=$(find "$root" -mindepth 1 \( \( -type f ! -perm 644 \) -o \( -type d ! -perm 755 \) \) -print)
[ -z "$bad" ] || fail "unexpected modes on: $bad"
[ "$(stat -c %G "$root/index.html")" = www-data ] || fail "$root/index.html is not group www-data"

echo "validate_site: $(find "$root" -type f | wc -l) files in place under $root"
