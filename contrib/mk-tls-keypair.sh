#!/bin/sh
# mk-tls-keypair.sh: a TLS key pair for estd, signed by a factory's root CA.
#
# Foundries devices trust the factory root (factory_ca.pem) and check the
# server's host name, so estd's TLS certificate is signed by that root and
# names the server in its SubjectAltName.  Needs nothing but openssl.
#
# Usage: mk-tls-keypair.sh PKIDIR DNSNAME [OUTPREFIX]
# See usage() below for the details.

set -eu

prog=${0##*/}

usage() {
	cat >&2 <<EOF
usage: $prog PKIDIR DNSNAME [OUTPREFIX]

Make a P-256 key and a TLS server certificate for estd, signed by the
factory root CA in PKIDIR (factory_ca.pem and factory_ca.key).

  PKIDIR     the factory PKI directory holding factory_ca.pem and factory_ca.key
  DNSNAME    the name devices use to reach the server, e.g. est.example.com
             (an IPv4 address is also put into the certificate as an IP name)
  OUTPREFIX  where to write OUTPREFIX.key and OUTPREFIX.pem
             [default: PKIDIR/local-tls]

Environment: DAYS  validity of the certificate in days [default: 825]

Existing output files are never overwritten.  The private key is written
with mode 600 and never printed.  Then point estd at the pair:
  tls-cert = OUTPREFIX.pem
  tls-key = OUTPREFIX.key
EOF
	exit 2
}

die() {
	echo "$prog: $*" >&2
	exit 1
}

# True if $1 is a dotted-quad IPv4 address (each part 0..255, no leading 0s).
is_ipv4() {
	case $1 in
	*[!0-9.]* | .* | *. | *..*) return 1 ;;
	esac
	old_ifs=$IFS
	IFS=.
	# shellcheck disable=SC2086 # splitting on dots is the point
	set -- $1
	IFS=$old_ifs
	[ $# -eq 4 ] || return 1
	for part in "$@"; do
		case $part in
		0 | [1-9] | [1-9][0-9] | 1[0-9][0-9] | 2[0-4][0-9] | 25[0-5]) ;;
		*) return 1 ;;
		esac
	done
	return 0
}

# True if $1 can be a DNS name in a certificate: letters, digits, hyphens
# and dots, optionally one leading "*." label, at most 64 characters (the
# upper bound of a commonName, RFC 5280 appendix A).
is_dns_name() {
	name=${1#\*.}
	[ -n "$name" ] && [ ${#1} -le 64 ] || return 1
	case $name in
	*[!A-Za-z0-9.-]* | .* | *. | *..* | -* | *.-* | *-.* | *-) return 1 ;;
	esac
	return 0
}

[ $# -ge 2 ] && [ $# -le 3 ] || usage
case $1 in -h | --help) usage ;; esac

pkidir=$1
dnsname=$2
prefix=${3:-$pkidir/local-tls}
days=${DAYS:-825}

case $days in
'' | *[!0-9]* | 0*) die "DAYS must be a whole number of days above 0, not '$days'" ;;
esac

[ -d "$pkidir" ] || die "$pkidir is not a directory"
ca_cert=$pkidir/factory_ca.pem
ca_key=$pkidir/factory_ca.key
[ -r "$ca_cert" ] || die "cannot read the factory root certificate $ca_cert"
[ -r "$ca_key" ] || die "cannot read the factory root key $ca_key"
ca_cert_pub=$(openssl x509 -in "$ca_cert" -noout -pubkey 2>/dev/null) \
	|| die "$ca_cert is not a PEM certificate"
ca_key_pub=$(openssl pkey -in "$ca_key" -pubout 2>/dev/null) \
	|| die "$ca_key is not a PEM private key (or its passphrase was wrong)"
[ "$ca_cert_pub" = "$ca_key_pub" ] || die "$ca_key does not belong to $ca_cert"

if is_ipv4 "$dnsname"; then
	san="DNS:$dnsname,IP:$dnsname"
elif is_dns_name "$dnsname"; then
	san="DNS:$dnsname"
else
	die "'$dnsname' is not a DNS name or an IPv4 address"
fi

key=$prefix.key
cert=$prefix.pem
for file in "$key" "$cert"; do
	[ ! -e "$file" ] || die "$file exists; remove it or choose another OUTPREFIX"
done
outdir=$(dirname -- "$prefix")
[ -d "$outdir" ] || die "$outdir (from OUTPREFIX) is not a directory"

# Scratch files live next to the output and go away however we exit.
csr=$prefix.csr.$$
extensions=$prefix.ext.$$
errors=$prefix.err.$$
done_ok=
cleanup() {
	rm -f -- "$csr" "$extensions" "$errors"
	# A half-made pair is worse than none: the next run would refuse it.
	[ -n "$done_ok" ] || rm -f -- "$key" "$cert"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

# The key is private from its first byte: no window with wider permissions.
(
	umask 077
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
		-out "$key" 2>/dev/null
) || die "openssl could not make a P-256 key"
chmod 600 "$key"

openssl req -new -key "$key" -subj "/CN=$dnsname" -out "$csr" \
	|| die "openssl could not make the certificate request"

cat >"$extensions" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF

# A random positive 128-bit serial; no serial file is left in PKIDIR.
serial=0x$(openssl rand -hex 16)

(
	umask 022
	openssl x509 -req -in "$csr" -CA "$ca_cert" -CAkey "$ca_key" \
		-set_serial "$serial" -days "$days" -sha256 \
		-extfile "$extensions" -out "$cert" 2>"$errors"
) || {
	cat "$errors" >&2
	die "openssl could not sign the certificate with $ca_key"
}
done_ok=yes

echo "wrote $key (private key, mode 600) and $cert:"
openssl x509 -in "$cert" -noout -subject -issuer -enddate -ext subjectAltName
