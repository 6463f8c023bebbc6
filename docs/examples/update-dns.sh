#!/bin/sh
# Recovery-plan script action: point a DNS name at the failed-over VM's new address.
#
# Install: copy into the scripts folder of each recovery-site agent (<agent home>/scripts/),
# make it executable, and add it to a plan:
#
#   sitepair-broker plans add-action erp --group 1 --when after \
#       --script update-dns.sh --arg web01.corp.example. --arg 10.20.0.15 \
#       --action-name "point web01 at the recovery site"
#
# Arguments: NAME ADDRESS [TTL]. Environment (set by the agent): SITEPAIR_PLAN, SITEPAIR_GROUP,
# SITEPAIR_FAILOVER_TYPE, SITEPAIR_VMS. A test failover must not touch production DNS, so the
# script does nothing then. Needs nsupdate (Debian: bind9-dnsutils) and, for signed updates, a
# TSIG key in /etc/sitepair/dns.key. Exit status and output are kept in the plan's job; a
# non-zero status stops a planned or test plan at this step.
set -eu

name=${1:?usage: update-dns.sh NAME ADDRESS [TTL]}
address=${2:?usage: update-dns.sh NAME ADDRESS [TTL]}
ttl=${3:-60}
server=${DNS_SERVER:-127.0.0.1}
key=${DNS_KEY:-/etc/sitepair/dns.key}

if [ "${SITEPAIR_FAILOVER_TYPE:-}" = "test" ]; then
    echo "test failover: leaving $name alone"
    exit 0
fi

keyopt=""
[ -r "$key" ] && keyopt="-k $key"

# shellcheck disable=SC2086 # $keyopt is empty or two words on purpose
nsupdate $keyopt <<EOT
server $server
update delete $name A
update add $name $ttl A $address
send
EOT
echo "$name now points at $address (plan ${SITEPAIR_PLAN:-?}, group ${SITEPAIR_GROUP:-?})"
