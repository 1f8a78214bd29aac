# Library of pier-multi-report (sourced).

# report_page NAME OWNER: an HTML page naming the site, its owner and this host.
report_page() {
  local name=$1 owner=$2
  cat <<HTML
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$(html_escape "$name") status</title></head>
<body>
<h1>$(html_escape "$name")</h1>
<p>Owner: $(html_escape "$owner")</p>
<p>Host: $(html_escape "$(hostname 2>/dev/null || cat /etc/hostname)")</p>
<p>Deployment: $(html_escape "${DEPLOYMENT_ID:-local}")</p>
</body></html>
HTML
}

html_escape() {
  local s=$1
  s=${s//&/&amp;}
  s=${s//</&lt;}
  s=${s//>/&gt;}
  printf '%s' "$s"
}
