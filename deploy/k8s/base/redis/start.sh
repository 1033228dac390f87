#!/bin/sh
# Starts redis-server with the ACL users of users.acl (beside this script). Passwords come from the environment
# (Kubernetes: the Secret dense-serve-redis-auth; Compose: .env) and reach the ACL file only as SHA-256 hashes,
# never the command line. Arguments are passed on to redis-server.
#   REDIS_ADMIN_PASSWORD  required: user default (operators, probes)
#   REDIS_APP_PASSWORD    required: user dense-serve (api, grpc, workers)
#   REDIS_KEDA_PASSWORD   optional: user keda (KEDA's scaler); unset = user keda off
#   DENSE_REDIS_PREFIX    the key prefix of dense-serve (default "dense")
#   REDIS_ACL_FILE        where the filled-in file goes (default /run/redis/users.acl, a memory volume)
set -eu
: "${REDIS_ADMIN_PASSWORD:?is required (ACL user default)}"
: "${REDIS_APP_PASSWORD:?is required (ACL user dense-serve)}"
prefix=${DENSE_REDIS_PREFIX:-dense}
case $prefix in
  '' | *[!A-Za-z0-9_.-]*) echo "start.sh: DENSE_REDIS_PREFIX '$prefix' is not [A-Za-z0-9_.-]+" >&2; exit 2 ;;
esac
out=${REDIS_ACL_FILE:-/run/redis/users.acl}
sha() { printf '%s' "$1" | sha256sum | cut -d ' ' -f 1; }
keda=off
if [ -n "${REDIS_KEDA_PASSWORD:-}" ]; then keda="on #$(sha "$REDIS_KEDA_PASSWORD")"; fi
umask 077
sed -e '/^#/d' -e '/^[[:space:]]*$/d' \
  -e "s/@ADMIN@/on #$(sha "$REDIS_ADMIN_PASSWORD")/" \
  -e "s/@APP@/on #$(sha "$REDIS_APP_PASSWORD")/" \
  -e "s/@KEDA@/$keda/" \
  -e "s/@PREFIX@/$prefix/g" \
  "$(dirname "$0")/users.acl" >"$out"
exec redis-server "$@" --aclfile "$out"
