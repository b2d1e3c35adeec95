#!/usr/bin/env bash
# Installs what satellite's demo and tests need and is missing, with the
# platform's package manager (apt on Debian/Ubuntu, dnf on RHEL/Rocky/Alma).
# Usage: scripts/setup.sh [demo|test|package]
#   demo     what `satellite demo` needs
#   test     the demo's, and everything else the test suite needs
#   package  what scripts/package.sh needs to build, check and lint the
#            .deb, the .rpm, the SELinux module and the systemd units
set -euo pipefail
what="${1:-test}"

# Debian package names; rhel_name maps the few that differ.
# libapache2-mod-qos: the waiting-page limit (httpd-conf/satellite.conf).
demo_pkgs=(apache2 apache2-utils openssl curl ca-certificates libaprutil1-dbd-sqlite3 sqlite3 iproute2
  libapache2-mod-qos)
# A real single-node Slurm for tests/sched_slurm.rs (tests/support/slurm.rs);
# binutils: nm, to check that the CGI programs link none of the demo crate.
# The browser suite (Chromium over WebDriver, JupyterLab in a venv) and the
# TLS grading (testssl.sh); on RHEL chromium, chromedriver and testssl come
# from EPEL.
# prometheus: promtool checks the metrics' exposition (tests/metrics.rs).
# postgresql: initdb, pg_ctl and postgres for the PostgreSQL store's tests,
# which start a private cluster on a Unix socket of their own (the
# packaged cluster is not used, and not created: see below).
# libaprutil1-dbd-pgsql: Apache's map lookup on PostgreSQL (tests/frontends.rs).
test_pkgs=(slurmctld slurmd slurm-client munge binutils
  chromium chromium-driver python3-venv python3-pip testssl.sh fonts-dejavu-core
  prometheus postgresql libaprutil1-dbd-pgsql)
# rpm: rpmbuild-free checks of the .rpm (rpm -qlp); the SELinux reference
# policy headers build the module; systemd gives systemd-analyze;
# binutils: readelf, for the programs' glibc symbol versions; python3-pip
# unpacks Zig from PyPI's ziglang for the glibc-2.28 release build
# (scripts/release-build.sh).
package_pkgs=(rpm rpmlint lintian checkpolicy semodule-utils selinux-policy-dev systemd binutils python3-pip)

rhel_name() {
  case "$1" in
    apache2) echo "httpd mod_ssl" ;;
    apache2-utils) echo "httpd-tools" ;;
    libaprutil1-dbd-sqlite3) echo "apr-util-sqlite" ;;
    libaprutil1-dbd-pgsql) echo "apr-util-pgsql" ;;
    libapache2-mod-qos) echo "" ;; # EPEL's mod_qos: optional, installed below
    slurmctld) echo "slurm-slurmctld" ;;
    slurmd) echo "slurm-slurmd" ;;
    slurm-client) echo "slurm" ;;
    semodule-utils) echo "policycoreutils" ;;
    selinux-policy-dev) echo "selinux-policy-devel" ;;
    lintian) echo "" ;; # Debian's package checker; package.sh skips it when absent
    chromium-driver) echo "chromedriver" ;;
    python3-venv) echo "python3" ;;
    testssl.sh) echo "testssl" ;;
    fonts-dejavu-core) echo "dejavu-sans-fonts" ;;
    prometheus) echo "golang-github-prometheus" ;; # EPEL; ships promtool
    postgresql) echo "postgresql-server" ;;
    *) echo "$1" ;;
  esac
}

case "$what" in
  demo) pkgs=("${demo_pkgs[@]}") ;;
  test) pkgs=("${demo_pkgs[@]}" "${test_pkgs[@]}") ;;
  package) pkgs=("${demo_pkgs[@]}" "${package_pkgs[@]}") ;;
  *) echo "usage: scripts/setup.sh [demo|test|package]" >&2; exit 2 ;;
esac

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi

if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Debian's postgresql would create and start a cluster on port 5432
    # that nothing here uses; the tests make their own.
    if [[ " ${missing[*]} " == *" postgresql "* ]] && [ ! -e /etc/postgresql-common/createcluster.d/satellite-tests.conf ]; then
      "${sudo_cmd[@]}" mkdir -p /etc/postgresql-common/createcluster.d
      echo "create_main_cluster = false" |
        "${sudo_cmd[@]}" tee /etc/postgresql-common/createcluster.d/satellite-tests.conf >/dev/null
    fi
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian 12's mod_qos enables itself in the system's Apache but cannot
  # load there (it wants the PCRE 1 that Debian 12's httpd, now linked with
  # PCRE2, no longer brings: "undefined symbol: pcre_free"), which breaks
  # that Apache's config test.
  # satellite's httpd-conf/modules-debian.conf loads libpcre first; the
  # system's own Apache is put back as it was.
  if [ -e /etc/apache2/mods-enabled/qos.load ]; then
    configtest=$("${sudo_cmd[@]}" /usr/sbin/apache2ctl -t 2>&1 || true)
    case "$configtest" in
      *"undefined symbol: pcre_free"*)
        echo "setup: disabling the system Apache's mod_qos, which cannot load there" >&2
        "${sudo_cmd[@]}" a2dismod -q -f qos >/dev/null
        ;;
    esac
  fi
elif command -v dnf >/dev/null 2>&1; then
  names=()
  for p in "${pkgs[@]}"; do read -r -a n <<<"$(rhel_name "$p")"; names+=("${n[@]}"); done
  missing=()
  for p in "${names[@]}"; do rpm -q "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    "${sudo_cmd[@]}" dnf install -y -q "${missing[@]}"
  fi
  # The waiting-page limit needs EPEL's mod_qos; without EPEL the demo and
  # tests still run (the limit's test then fails and says why).
  if ! rpm -q mod_qos >/dev/null 2>&1; then
    "${sudo_cmd[@]}" dnf install -y -q mod_qos ||
      echo "setup: mod_qos (EPEL) not installed: Apache will not limit guesses at token hosts" >&2
  fi
else
  echo "setup: neither apt-get nor dnf found; install by hand: ${pkgs[*]}" >&2
  exit 1
fi
