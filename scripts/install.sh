#!/bin/sh
# Installs pier on a host and writes its agent configuration from flags, in one line:
#
#   sh install.sh --package pier_0.1.0-1_amd64.deb \
#     --queue-url https://sqs.eu-west-1.amazonaws.com/123456789012/pier-web-1 --region eu-west-1 \
#     --tag role=web --tag env=production --group web-prod \
#     --registry-bucket my-pier-state --trusted-key BASE64_PUBLIC_KEY
#
# --package PATH|URL   the .deb or .rpm to install (an http(s) URL is downloaded first); the
#                      host's package manager is found (apt/dpkg, dnf/yum/rpm). Leave it out
#                      to only (re)write the configuration of an installed pier.
# --queue-url URL      the host's SQS queue (transport: sqs). Without it: the local spool.
# --region REGION      AWS region (default: the environment, or the instance metadata on EC2)
# --endpoint-url URL   an S3/SQS-compatible endpoint instead of AWS's (tests, private clouds)
# --tag KEY=VALUE      a host tag, for groups' tag filters (repeatable)
# --group NAME         a deployment group this host joins (repeatable; daemon.deployment_groups)
# --trusted-key KEY    a controller's public key, as `pier keygen` prints it, or the absolute
#                      path of a .pub file (repeatable); with none the agent runs open
# --registry-bucket B  where the host announces itself for `pier hosts` and groups
# --registry-prefix P  key prefix in that bucket (default none)
# --host-id ID         the host id (default: the EC2 instance id, else the machine id)
# --availability-zone Z  the host's zone off EC2 (on EC2 the instance metadata says)
# --config PATH        the file to write (default /etc/pier/agent.yml)
# --no-start           do not (re)start the service
#
# The new configuration is checked with `pier-agent check-config` before it replaces the old
# one, which is kept beside it (agent.yml.bak.TIMESTAMP) when it differed. Needs root.
set -eu

package=""
queue_url=""
region=""
endpoint_url=""
tags=""
groups=""
keys=""
registry_bucket=""
registry_prefix=""
host_id=""
zone=""
config=/etc/pier/agent.yml
start=1

die() {
    echo "install.sh: $*" >&2
    exit 64
}
need_value() {
    [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see the top of this script)"
}
# A YAML single-quoted scalar: any text, with ' doubled.
q() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"
}
nl='
'

while [ $# -gt 0 ]; do
    case "$1" in
    --package) need_value "$@"; package=$2; shift 2 ;;
    --queue-url) need_value "$@"; queue_url=$2; shift 2 ;;
    --region) need_value "$@"; region=$2; shift 2 ;;
    --endpoint-url) need_value "$@"; endpoint_url=$2; shift 2 ;;
    --tag)
        need_value "$@"
        case "$2" in
        *=*) [ "${2%%=*}" != "" ] || die "--tag $2: the key is empty (KEY=VALUE)" ;;
        *) die "--tag $2: write KEY=VALUE" ;;
        esac
        tags="$tags$2$nl"
        shift 2
        ;;
    --group) need_value "$@"; groups="$groups$2$nl"; shift 2 ;;
    --trusted-key) need_value "$@"; keys="$keys$2$nl"; shift 2 ;;
    --registry-bucket) need_value "$@"; registry_bucket=$2; shift 2 ;;
    --registry-prefix) need_value "$@"; registry_prefix=$2; shift 2 ;;
    --host-id) need_value "$@"; host_id=$2; shift 2 ;;
    --availability-zone) need_value "$@"; zone=$2; shift 2 ;;
    --config) need_value "$@"; config=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    -h | --help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "run as root: it installs a package and writes $config"
[ -z "$registry_prefix" ] || [ -n "$registry_bucket" ] || die "--registry-prefix needs --registry-bucket"

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT INT TERM

# 1. The package.
if [ -n "$package" ]; then
    case "$package" in
    http://* | https://*)
        file=$workdir/$(basename "${package%%\?*}")
        echo "install.sh: downloading $package"
        if command -v curl >/dev/null 2>&1; then
            curl -fsSL --retry 3 -o "$file" "$package" || die "could not download $package"
        elif command -v wget >/dev/null 2>&1; then
            wget -q -O "$file" "$package" || die "could not download $package"
        else
            die "neither curl nor wget is installed to download $package"
        fi
        ;;
    *)
        [ -f "$package" ] || die "--package $package: no such file"
        file=$package
        ;;
    esac
    case "$file" in
    *.deb)
        command -v dpkg >/dev/null 2>&1 || die "$file is a .deb but this host has no dpkg (use the .rpm)"
        case "$file" in /*) ;; *) file=$(pwd)/$file ;; esac
        if command -v apt-get >/dev/null 2>&1; then
            # apt resolves the package's few dependencies (libc6); --force-confold keeps an
            # edited configuration on an upgrade without asking.
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Options::=--force-confold "$file"
        else
            dpkg -i --force-confold "$file"
        fi
        ;;
    *.rpm)
        command -v rpm >/dev/null 2>&1 || die "$file is an .rpm but this host has no rpm (use the .deb)"
        # Debian's `rpm` package installs into a database dpkg knows nothing of: a host whose
        # packages dpkg manages gets the .deb.
        if command -v dpkg >/dev/null 2>&1 && ! command -v dnf >/dev/null 2>&1 && ! command -v yum >/dev/null 2>&1; then
            die "$file is an .rpm but dpkg manages this host's packages (use the .deb)"
        fi
        if command -v dnf >/dev/null 2>&1; then
            dnf install -y "$file"
        elif command -v yum >/dev/null 2>&1; then
            yum install -y "$file"
        else
            rpm -Uvh "$file"
        fi
        ;;
    *) die "--package $package: expected a .deb or an .rpm" ;;
    esac
fi
command -v pier-agent >/dev/null 2>&1 || die "pier-agent is not installed: give --package"

# 2. The configuration, written beside the old one, checked, then put in place.
new=$workdir/agent.yml
{
    echo "# Written by install.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Every key: docs/configuration.md"
    echo "# (/usr/share/doc/pier/configuration.md). Check an edit with: pier-agent check-config"
    echo "root_dir: /var/lib/pier"
    [ -z "$host_id" ] || echo "host_id: $(q "$host_id")"
    if [ -n "$queue_url" ]; then
        echo "transport:"
        echo "  type: sqs"
        echo "  queue_url: $(q "$queue_url")"
    else
        echo "transport:"
        echo "  type: spool"
    fi
    if [ -n "$region" ] || [ -n "$endpoint_url" ]; then
        echo "aws:"
        [ -z "$region" ] || echo "  region: $(q "$region")"
        [ -z "$endpoint_url" ] || echo "  endpoint_url: $(q "$endpoint_url")"
    fi
    [ -z "$zone" ] || echo "availability_zone: $(q "$zone")"
    if [ -n "$tags" ]; then
        echo "tags:"
        printf '%s' "$tags" | while IFS= read -r tag; do
            echo "  $(q "${tag%%=*}"): $(q "${tag#*=}")"
        done
    fi
    if [ -n "$groups" ]; then
        echo "daemon:"
        echo "  deployment_groups:"
        printf '%s' "$groups" | while IFS= read -r group; do
            echo "    - $(q "$group")"
        done
    fi
    if [ -n "$registry_bucket" ]; then
        echo "registry:"
        echo "  bucket: $(q "$registry_bucket")"
        [ -z "$registry_prefix" ] || echo "  prefix: $(q "$registry_prefix")"
    fi
    if [ -n "$keys" ]; then
        echo "trusted_keys:"
        printf '%s' "$keys" | while IFS= read -r key; do
            case "$key" in
            /*) echo "  - file: $(q "$key")" ;;
            *) echo "  - public_key: $(q "$key")" ;;
            esac
        done
    fi
} >"$new"

if ! pier-agent check-config --config "$new" >"$workdir/check.out" 2>&1; then
    sed "s|$new|the new configuration|" "$workdir/check.out" >&2
    echo "install.sh: $config was left as it was" >&2
    exit 78
fi
mkdir -p "$(dirname "$config")"
if [ -f "$config" ] && ! cmp -s "$new" "$config"; then
    backup=$config.bak.$(date -u +%Y%m%dT%H%M%SZ)
    cp -p "$config" "$backup"
    echo "install.sh: the previous configuration is kept as $backup"
fi
chmod 600 "$new"
cp "$new" "$config.new"
mv -f "$config.new" "$config"
pier-agent check-config --config "$config"

# 3. The service.
if [ "$start" -eq 1 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl enable pier-agent.service >/dev/null 2>&1 || true
        systemctl restart pier-agent.service
        systemctl --no-pager --lines=0 status pier-agent.service || true
        echo "install.sh: pier-agent is running; its log: journalctl -u pier-agent"
    else
        echo "install.sh: systemd is not running here; start the agent with: pier-agent run --config $config"
    fi
fi
