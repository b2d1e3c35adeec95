#!/usr/bin/env bash
# Builds the .deb and the .rpm (with man pages, completions, systemd units
# and the SELinux module) from programs built for glibc 2.28
# (scripts/release-build.sh), checks that no program needs a newer GLIBC_
# symbol version, then checks the packages on this machine: installs the
# .deb, runs `satellite --version`, one CGI request, `satellite check` and
# the demo against the installed files, verifies and scores the systemd
# units; follows the admin guide's Debian steps on the system Apache (the
# postinst enables nothing until the site passes the config test, then
# `dpkg-reconfigure satellite` enables the modules and the site) and runs
# `satellite check --live` and a live session; purges the package with that
# session live, asserts it is unreachable and nothing is left but the
# service user, and puts the system Apache's configuration back; lists the
# .rpm's files, scriptlets and requirements (and reads its site and
# removal steps) and runs rpmlint. Run by .ci/run after the tests, as root (it installs a
# package). Everything it builds lands in target/dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dist=$root/target/dist
started=$SECONDS

step() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - started))"; }
fail() { echo "package.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root: it installs and purges the .deb"
bash scripts/setup.sh package
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

# The oldest glibc the programs run on (RHEL/Rocky/Alma 8); the programs
# both packages ship.
min_glibc=2.28
programs=(satellite cron getlink redeemtoken destroytoken linktoken tokenjobstate update-jobs index)

# check_glibc DIR: each program in DIR needs no GLIBC_ symbol version newer
# than $min_glibc, and no library but glibc's (SQLite is compiled in).
# readelf -V lists each library a program needs and the symbol versions it
# needs from it: the dynamic loader refuses to start a program when any of
# them is missing, so the highest is the oldest glibc it runs on.
check_glibc() {
  local dir=$1 program needs highest libs lib
  for program in "${programs[@]}"; do
    [ -f "$dir/$program" ] || fail "no $dir/$program"
    needs=$(readelf -V --wide "$dir/$program" | sed -n '/^Version needs section/,$p')
    [ -n "$needs" ] || fail "$dir/$program: readelf -V shows no version needs"
    highest=$(grep -o 'Name: GLIBC_[0-9.]*' <<<"$needs" | sed 's/Name: GLIBC_//' | sort -uV | tail -n1)
    [ -n "$highest" ] || fail "$dir/$program: needs no GLIBC_ version at all?"
    [ "$(printf '%s\n%s\n' "$highest" "$min_glibc" | sort -V | tail -n1)" = "$min_glibc" ] ||
      fail "$dir/$program needs GLIBC_$highest, newer than GLIBC_$min_glibc: it would not start on EL8"
    libs=$(readelf -d "$dir/$program" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
    for lib in $libs; do
      case "$lib" in
        libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux-*.so.* | libgcc_s.so.1) ;;
        *) fail "$dir/$program links $lib, which is not part of glibc" ;;
      esac
    done
    printf '%-14s highest GLIBC_%-6s needs %s\n' "$program" "$highest" "$libs"
  done
}

step "packaging tools"
# Both compile from source the first time (minutes); later runs reuse them.
for tool in cargo-deb cargo-generate-rpm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    t=$SECONDS
    cargo install --locked "$tool"
    echo "installed $tool in $((SECONDS - t))s"
  fi
done

step "release build for glibc $min_glibc (scripts/release-build.sh)"
# Zig links the programs against glibc 2.28's symbols, whatever this
# machine's glibc, so that both packages install on EL8 as on Debian 12.
bin=$(bash scripts/release-build.sh | tail -n1)
host=$(rustc -vV | sed -n 's/^host: //p')
[ -x "$bin/satellite" ] || fail "no release programs in $bin"
rm -rf "$dist"
mkdir -p "$dist"

step "the programs need glibc $min_glibc at most (ELF version needs)"
check_glibc "$bin"

step "man pages and completions (satellite generate)"
"$bin/satellite" generate --out "$dist"
gzip -9nf "$dist"/man/*.1

step "SELinux module"
# The reference policy's Makefile expands the interfaces with m4, then runs
# checkmodule -M -m and semodule_package, as for any policy module.
mkdir -p "$dist/selinux"
cp selinux/satellite.te selinux/satellite.fc selinux/satellite.if "$dist/selinux/"
make -s -C "$dist/selinux" -f /usr/share/selinux/devel/Makefile satellite.pp
[ -s "$dist/selinux/satellite.pp" ] || fail "no satellite.pp"
echo "built $(du -h "$dist/selinux/satellite.pp" | cut -f1) satellite.pp"

step "systemd units for the rpm (the web server's group is apache there)"
mkdir -p "$dist/rpm-systemd"
for unit in dist/systemd/*; do
  sed 's/^SocketGroup=www-data$/SocketGroup=apache/' "$unit" >"$dist/rpm-systemd/$(basename "$unit")"
done

step "the Apache site file of each package (dist/apache-site.conf, each platform's paths)"
# One template: the values the admin edits (domain, ports, certificate),
# with Debian's certificate paths and commands in the .deb and RHEL's in
# the .rpm.
render_site() { # OUT CONFIGTEST ENABLE LISTEN CERT KEY MODULES-LINE
  mkdir -p "$(dirname "$1")"
  sed -e "s|@CONFIGTEST@|$2|" -e "s|@ENABLE@|$3|" -e "s|@LISTEN@|$4|" \
    -e "s|@CERT@|$5|" -e "s|@KEY@|$6|" -e "s|@INCLUDE_MODULES@|$7|" dist/apache-site.conf |
    cat -s >"$1"
  ! grep -n "@[A-Z_]*@" "$1" || fail "$1 keeps a placeholder"
}
render_site "$dist/debian-site/satellite.conf" "apache2ctl configtest" "dpkg-reconfigure satellite" \
  "Debian's ports.conf, with mod_ssl enabled," /etc/ssl/certs/satellite.pem /etc/ssl/private/satellite.key ""
render_site "$dist/rpm-site/httpd-site.conf" "httpd -t" "/usr/lib/satellite/package-setup site" \
  "httpd.conf and mod_ssl's ssl.conf" /etc/pki/tls/certs/satellite.crt /etc/pki/tls/private/satellite.key \
  "Include /usr/share/satellite/httpd-conf/modules-rhel.conf"
diff "$dist/debian-site/satellite.conf" "$dist/rpm-site/httpd-site.conf" || true

step "cargo deb"
# --target: the assets' target/release/ becomes target/$host/release/,
# where the glibc-$min_glibc programs are.
cargo deb -p satellite --no-build --locked --target "$host" --output "$dist/"
deb=$(ls "$dist"/satellite_*.deb)
# Its libc6 version is written in Cargo.toml (not $auto: see there); it
# must not ask for more than the programs need.
deb_depends=$(dpkg-deb -f "$deb" Depends)
echo "Depends: $deb_depends"
libc6=$(sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p' <<<"$deb_depends")
[ -n "$libc6" ] || fail "the .deb does not depend on a libc6 version: $deb_depends"
[ "$(printf '%s\n%s\n' "$libc6" "$min_glibc" | sort -V | tail -n1)" = "$min_glibc" ] ||
  fail "the .deb wants libc6 >= $libc6, newer than $min_glibc"
# The site file is a conffile (the admin's edits survive upgrades) with
# Debian's certificate paths.
deb_site=etc/apache2/sites-available/satellite.conf
dpkg-deb --info "$deb" conffiles | grep -qx "/$deb_site" || fail "the .deb's /$deb_site is not a conffile"
dpkg-deb --fsys-tarfile "$deb" | tar -xO "./$deb_site" | grep -q "^Define SATELLITE_CERT /etc/ssl/certs/" ||
  fail "the .deb's site does not default to Debian's certificate path"

step "cargo generate-rpm"
# cargo-deb strips the programs itself; cargo-generate-rpm takes them as
# they are, so it gets stripped copies (rpmlint: unstripped-binary).
mkdir -p "$dist/bin"
for program in "${programs[@]}"; do
  strip -s -o "$dist/bin/$program" "$bin/$program"
done
check_glibc "$dist/bin" >/dev/null
cargo generate-rpm -p crates/satellite --output "$dist/"
rpm_file=$(ls "$dist"/satellite-*.rpm)

step "the .rpm: files and scriptlets"
# Read whole before grep -q: with pipefail, grep quitting early fails rpm.
rpm_files=$(rpm -qlp "$rpm_file")
rpm_scripts=$(rpm -qp --scripts "$rpm_file")
rpm_flags=$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm_file")
rpm_requires=$(rpm -qpR "$rpm_file")
echo "$rpm_files"
echo "$rpm_scripts"
echo "$rpm_requires"
# The EL names of what satellite needs there, and no glibc newer than
# $min_glibc (the automatic libc.so.6(GLIBC_x) requirements).
for must in httpd mod_ssl apr-util-sqlite; do
  grep -q "^$must\b" <<<"$rpm_requires" || fail "the .rpm does not require $must"
done
rpm_glibc=$(grep -o 'GLIBC_[0-9.]*' <<<"$rpm_requires" | sed 's/GLIBC_//' | sort -uV | tail -n1 || true)
if [ -n "$rpm_glibc" ]; then
  [ "$(printf '%s\n%s\n' "$rpm_glibc" "$min_glibc" | sort -V | tail -n1)" = "$min_glibc" ] ||
    fail "the .rpm requires GLIBC_$rpm_glibc, newer than $min_glibc"
fi
for must in /usr/lib/satellite/bin/satellite /usr/lib/satellite/bin/getlink \
  /usr/share/selinux/packages/satellite.pp /usr/lib/systemd/system/satellite-cron.service \
  /usr/share/man/man1/satellite.1.gz /etc/cron.d/satellite; do
  grep -qx "$must" <<<"$rpm_files" || fail "the .rpm lacks $must"
done
grep -q "package-setup configure" <<<"$rpm_scripts" || fail "the .rpm has no postinstall"
# RHEL's Apache wiring: postinstall links the site into conf.d only once
# `httpd -t` passes with it (package-setup site); an erase (preuninstall,
# $1 = 0) runs package-setup remove, which takes it out of conf.d again (a
# file of the admin's own there is moved to .rpmsave) and reloads httpd,
# so no session stays reachable after `rpm -e`. This machine has no httpd
# to run them on: the scriptlets and the shipped package-setup are read.
rpm_script() { # NAME: the body of one scriptlet
  awk -v name="$1" '/^[a-z]+ scriptlet/ { on = index($0, name " scriptlet") == 1; next } on' <<<"$rpm_scripts"
}
rpm_script postinstall | grep -q "^/usr/lib/satellite/package-setup site" || fail "the .rpm's postinstall does not enable the site"
rpm_script preuninstall | grep -q 'if \[ "$1" -eq 0 \]' || fail "the .rpm's preuninstall does not check for an erase"
rpm_script preuninstall | grep -q "^ */usr/lib/satellite/package-setup remove" || fail "the .rpm's preuninstall does not run package-setup remove"
rpm_extract=$(mktemp -d)
# Debian 12's rpm2cpio (rpm 4.18.0) exits 1 after writing a zstd payload
# whole: the files extracted are what is checked.
(cd "$rpm_extract" && { rpm2cpio "$rpm_file" || true; } |
  cpio -idm --quiet ./usr/lib/satellite/package-setup ./etc/satellite/httpd-site.conf)
[ -s "$rpm_extract/usr/lib/satellite/package-setup" ] && [ -s "$rpm_extract/etc/satellite/httpd-site.conf" ] ||
  fail "could not extract package-setup and httpd-site.conf from the .rpm"
grep -q '^rhel_enabled=/etc/httpd/conf.d/satellite.conf$' "$rpm_extract/usr/lib/satellite/package-setup" ||
  fail "the .rpm's package-setup does not manage /etc/httpd/conf.d/satellite.conf"
sed -n '/^disable_site()/,/^}/p' "$rpm_extract/usr/lib/satellite/package-setup" | grep -q 'rm -f "$rhel_enabled"' ||
  fail "the .rpm's package-setup remove does not take the site out of conf.d"
grep -q "^Define SATELLITE_CERT /etc/pki/tls/certs/" "$rpm_extract/etc/satellite/httpd-site.conf" ||
  fail "the .rpm's site does not default to RHEL's certificate path"
grep -q "^cn /etc/satellite/httpd-site.conf$" <<<"$rpm_flags" || fail "/etc/satellite/httpd-site.conf is not %config(noreplace)"
rm -rf "$rpm_extract"
grep -q "^cn /etc/cron.d/satellite$" <<<"$rpm_flags" ||
  fail "/etc/cron.d/satellite is not %config(noreplace): $(grep cron.d <<<"$rpm_flags")"
grep -q "SocketGroup=apache" "$dist/rpm-systemd/satellite-serve.socket"
if command -v rpmlint >/dev/null 2>&1; then
  step "rpmlint (findings are reported, not fatal)"
  rpmlint "$rpm_file" || true
fi

if command -v lintian >/dev/null 2>&1; then
  step "lintian (findings are reported, not fatal)"
  lintian --allow-root "$deb" || true
fi

step "install the .deb"
case "$(dpkg-query -W -f='${db:Status-Abbrev}' satellite 2>/dev/null || true)" in
  "" | un* | pn*) ;;
  *) fail "satellite is already installed here; purge it first" ;;
esac
[ ! -e /var/www/satellite ] || fail "/var/www/satellite exists; the purge check needs a machine without it"
dpkg-deb --contents "$deb"
# The system Apache's configuration is put back as it was found, whatever
# happens below; the modules satellite enables start disabled (in
# maintainer mode, as a fresh apache2 has them), so that the postinst is
# seen enabling them.
site=/etc/apache2/sites-available/satellite.conf
satellite_modules="socache_shmcb ssl rewrite headers proxy proxy_http proxy_wstunnel dbd cgid http2"
guide=$(mktemp -d)
tar -C / -cf "$guide/apache-state.tar" etc/apache2 var/lib/apache2
# The certificate goes where the .deb's site expects it, as the guide says.
guide_cert=/etc/ssl/certs/satellite.pem
guide_key=/etc/ssl/private/satellite.key
[ ! -e "$guide_cert" ] && [ ! -e "$guide_key" ] || fail "$guide_cert or $guide_key exists already; package.sh would overwrite it"
put_back() {
  apache2ctl stop >/dev/null 2>&1 || true
  rm -rf /etc/apache2 /var/lib/apache2
  tar -C / -xf "$guide/apache-state.tar"
  rm -f "$guide_cert" "$guide_key"
  [ -z "${backend_pid:-}" ] || kill "$backend_pid" 2>/dev/null || true
  [ -z "${watcher_pid:-}" ] || kill "$watcher_pid" 2>/dev/null || true
}
trap put_back EXIT
for module in $satellite_modules; do
  a2dismod -m -f -q "$module" >/dev/null
done
# A fresh host has no state for the site; an earlier run here may have
# left "disabled by the admin", which the postinst would rightly respect.
rm -f /var/lib/apache2/site/*/satellite
# install_deb LOG [apt-get args]: the maintainer scripts' output in LOG.
install_deb() {
  local log=$1
  shift
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" "$deb" >"$log" 2>&1 ||
    { cat "$log"; fail "apt-get install $* failed"; }
  grep -e "^satellite: " -e "^    " "$log" || true
}
install_deb "$guide/install.txt"
# No certificate yet and the example domain: the postinst changes nothing
# in Apache and says what to fix and what to run.
for line in "satellite: the Apache site satellite is not enabled yet; Apache is unchanged" \
  "SATELLITE_DOMAIN in $site is still the example satellite.example.org" \
  "SSLCertificateFile: file '/etc/ssl/certs/satellite.pem' does not exist or is empty" \
  "then run: dpkg-reconfigure satellite"; do
  grep -qF "$line" "$guide/install.txt" || fail "the install did not say: $line"
done
! a2query -q -s satellite || fail "the install enabled the site satellite before it passes the config test"
for module in $satellite_modules; do
  ! a2query -q -m "$module" || fail "the install left the module $module enabled without the site"
done
for path in /usr/bin/satellite /var/www/satellite/cgi/getlink.cgi /var/www/satellite/bin/cron \
  /var/www/satellite/etc/satellite.toml /var/www/satellite/var/state.sqlite; do
  [ -e "$path" ] || fail "after install, $path is missing"
done
[ "$(stat -c %U:%G /var/www/satellite/var)" = satellite:www-data ] || fail "var/ is not satellite:www-data"
check_glibc /usr/lib/satellite/bin >/dev/null
[[ " $(id -nG satellite) " == *" www-data "* ]] || fail "the satellite user is not in group www-data"

step "an edited satellite.toml survives a reinstall"
echo "# edited by package.sh" >>/var/www/satellite/etc/satellite.toml
install_deb "$guide/reinstall.txt" --reinstall
tail -n1 /var/www/satellite/etc/satellite.toml | grep -qx "# edited by package.sh" ||
  fail "the reinstall overwrote satellite.toml"

step "the installed programs start: satellite --version and one CGI request"
version=$(/usr/bin/satellite --version) || fail "satellite --version failed"
echo "$version"
[[ "$version" == "satellite "* ]] || fail "satellite --version printed: $version"
# getlink.cgi as Apache runs it (as www-data, CGI/1.1 environment, a
# client on loopback, which the default tgtipmask allows): it writes a
# pending token to the installed database and answers with it.
answer=$(cd /var/www/satellite/cgi && runuser -u www-data -- env -i PATH=/usr/bin:/bin \
  GATEWAY_INTERFACE=CGI/1.1 SERVER_PROTOCOL=HTTP/1.1 REQUEST_METHOD=GET \
  SCRIPT_NAME=/getlink.cgi REMOTE_ADDR=127.0.0.1 HTTP_HOST=localhost ./getlink.cgi) ||
  fail "getlink.cgi failed: $answer"
echo "$answer"
grep -q "^Your token is" <<<"$answer" || fail "getlink.cgi gave no token"

step "satellite check against the installed files (WARN and FAIL are fine, a crash is not)"
set +e
satellite check
code=$?
set -e
[ "$code" -le 1 ] || fail "satellite check crashed (exit $code)"
man -w satellite-check >/dev/null 2>&1 || [ -e /usr/share/man/man1/satellite-check.1.gz ] ||
  fail "no man page for satellite-check"
/var/www/satellite/bin/cron --help >/dev/null

step "the demo from the installed programs"
port=$((20000 + RANDOM % 20000))
/usr/bin/satellite demo --walkthrough --port "$port"

step "systemd units: verify and score"
units=(/usr/lib/systemd/system/satellite-serve.socket /usr/lib/systemd/system/satellite-serve.service
  /usr/lib/systemd/system/satellite-cron.service /usr/lib/systemd/system/satellite-jobstates.service)
systemd-analyze verify "${units[@]}"
for unit in "${units[@]}"; do
  case "$unit" in *.socket) continue ;; esac
  # --offline: CI containers have no running systemd to ask.
  score=$(systemd-analyze security --offline=true "$unit" 2>&1 | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  echo "$(basename "$unit"): exposure $score"
  awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.5) }' || fail "$(basename "$unit") scores $score (over 2.5)"
done

step "the admin guide's install on the system Apache, check --live, a live session"
# docs/admin-guide.md's Debian steps as written: the certificate, the
# site's values, `dpkg-reconfigure satellite` (the postinst enables the
# modules and the site and reloads the running Apache gracefully, no
# systemd needed). On loopback ports (this machine's ports.conf is set
# aside for it), with a self-signed wildcard certificate, and a stand-in
# for Debian's 000-default answering first on the plain-HTTP port: the
# redirect must still be satellite's.
domain=guide.test
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$domain" \
  -addext "subjectAltName=DNS:$domain,DNS:*.$domain" \
  -keyout "$guide/key.pem" -out "$guide/cert.pem" 2>/dev/null
cp "$guide/cert.pem" "$guide_cert"
install -m 600 "$guide/key.pem" "$guide_key"
# Below the kernel's ephemeral range (32768 and up): a client connection
# of another program may hold a port there, and Apache's graceful restart
# cannot bind a new Listen on it (it stops instead).
https_port=$((20000 + RANDOM % 12000))
http_port=$((https_port + 1))
printf 'Listen 127.0.0.1:%s\n<IfModule ssl_module>\n    Listen 127.0.0.1:%s\n</IfModule>\n' \
  "$http_port" "$https_port" >/etc/apache2/ports.conf
printf '<VirtualHost *:%s>\n    DocumentRoot /var/www/html\n</VirtualHost>\n' "$http_port" \
  >/etc/apache2/sites-available/000-stand-in.conf
a2ensite -q 000-stand-in
apache2ctl start
sed -i -e "s|^Define SATELLITE_DOMAIN .*|Define SATELLITE_DOMAIN $domain|" \
  -e "s|^Define SATELLITE_PORT .*|Define SATELLITE_PORT $https_port|" \
  -e "s|^Define SATELLITE_HTTP_PORT .*|Define SATELLITE_HTTP_PORT $http_port|" \
  "$site"
toml=/var/www/satellite/etc/satellite.toml
sed -i "s/^extbasename = .*/extbasename = \"$domain\"/; s/^job_binding = .*/job_binding = \"warn\"/" "$toml"
dpkg-reconfigure satellite >"$guide/reconfigure.txt" 2>&1 || { cat "$guide/reconfigure.txt"; fail "dpkg-reconfigure satellite failed"; }
cat "$guide/reconfigure.txt"
for line in "satellite: enabled the Apache module ssl" "satellite: enabled the Apache module proxy_wstunnel" \
  "satellite: enabled the Apache site satellite ($site)" "satellite: restarted Apache"; do
  grep -qF "$line" "$guide/reconfigure.txt" || fail "dpkg-reconfigure satellite did not say: $line"
done
a2query -q -s satellite || fail "dpkg-reconfigure satellite did not enable the site"
for _ in $(seq 50); do
  curl -s -o /dev/null --cacert "$guide/cert.pem" --resolve "manage.$domain:$https_port:127.0.0.1" \
    "https://manage.$domain:$https_port/" && break
  sleep 0.2
done
# The watcher as the guide runs it without systemd (check --live proves
# it: an ended session's websocket must close).
setpriv --reuid=satellite --regid=satellite --init-groups \
  --inh-caps=+net_admin,+kill --ambient-caps=+net_admin,+kill \
  env SATELLITE_CONFIG=/var/www/satellite/etc/satellite.toml \
  /var/www/satellite/bin/cron --watch >"$guide/watcher.txt" 2>&1 &
watcher_pid=$!
for _ in $(seq 100); do
  grep -q "watching the database" "$guide/watcher.txt" && break
  sleep 0.1
done
grep -q "watching the database" "$guide/watcher.txt" || { cat "$guide/watcher.txt"; fail "the guide's watcher did not start"; }
satellite check --live --cacert "$guide/cert.pem" >"$guide/check.txt" || true
cat "$guide/check.txt"
for line in "OK   Apache serves a certificate for \*.$domain and $domain" \
  "OK   http://check-satellite.$domain/ on 127.0.0.1:$http_port redirects" \
  "OK   live: redeem from 127.0.0.1" "reached the temporary backend" \
  "OK   live: after destroy" "(cron --watch cut it)"; do
  grep -q "$line" "$guide/check.txt" || fail "check --live on the guide's install: no '$line'"
done
! grep -q "FAIL live" "$guide/check.txt" || fail "check --live failed on the guide's install"
# A user's live session, to be gone after the purge.
backend_port=$((https_port + 2))
mkdir -p "$guide/www" && echo "the notebook" >"$guide/www/index.html"
python3 -m http.server --bind 127.0.0.9 --directory "$guide/www" "$backend_port" >/dev/null 2>&1 &
backend_pid=$!
manage=(curl -s --cacert "$guide/cert.pem" --resolve "manage.$domain:$https_port:127.0.0.1")
token=$("${manage[@]}" "https://manage.$domain:$https_port/getlink.cgi" | tail -1)
for _ in $(seq 50); do
  ss -ltn | grep -q "127.0.0.9:$backend_port" && break
  sleep 0.1
done
redeemed=$("${manage[@]}" --interface 127.0.0.9 "https://manage.$domain:$https_port/redeemtoken.cgi?token=$token&port=$backend_port")
[ "$redeemed" = "Success!" ] || fail "redeem on the guide's install: $redeemed"
user_url=(curl -s --cacert "$guide/cert.pem" --resolve "$token.$domain:$https_port:127.0.0.1" "https://$token.$domain:$https_port/")
"${user_url[@]}" | grep -q "the notebook" || fail "the live session does not reach its backend"
echo "the guide's install serves a live session at https://$token.$domain:$https_port/"

step "purge the .deb with that session live: nothing reachable, nothing left but the service user"
# The guide: stop a watcher you started yourself before removing.
kill "$watcher_pid" 2>/dev/null || true
wait "$watcher_pid" 2>/dev/null || true
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq satellite >"$guide/purge.txt" 2>&1 ||
  { cat "$guide/purge.txt"; fail "apt-get purge failed"; }
grep "^satellite: " "$guide/purge.txt" || true
grep -qF "satellite: disabled the Apache site satellite" "$guide/purge.txt" || fail "the purge did not say it disabled the site"
[ ! -e /etc/apache2/sites-enabled/satellite.conf ] || fail "after purge, the Apache site satellite is still enabled"
[ ! -e "$site" ] || fail "after purge, $site is still there"
# The purge reloaded Apache gracefully (no systemd needed); wait for the
# new generation to answer.
for _ in $(seq 50); do
  "${user_url[@]}" 2>/dev/null | grep -q "the notebook" || break
  sleep 0.2
done
! "${user_url[@]}" 2>/dev/null | grep -q "the notebook" || fail "after purge, the session still reaches its backend"
put_back
trap - EXIT
for path in /usr/bin/satellite /usr/lib/satellite /var/www/satellite /etc/cron.d/satellite \
  /usr/share/doc/satellite /usr/share/satellite /usr/lib/systemd/system/satellite-cron.service \
  /usr/share/man/man1/satellite.1.gz /run/satellite; do
  [ ! -e "$path" ] && [ ! -L "$path" ] || fail "after purge, $path is still there"
done
status=$(dpkg-query -W -f='${db:Status-Abbrev}' satellite 2>/dev/null || true)
case "$status" in "" | un* | pn*) ;; *) fail "dpkg still has satellite: $status" ;; esac
getent passwd satellite >/dev/null || fail "the purge removed the service user (policy keeps it)"

step "done"
ls -l "$dist"/*.deb "$dist"/*.rpm "$dist"/selinux/satellite.pp
echo "package.sh took $((SECONDS - started))s"
