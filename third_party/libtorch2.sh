#!/usr/bin/env bash
# The LibTorch 2.x leg: a Debian 13 (trixie) root with libtorch-dev 2.6 and python3-torch 2.6,
# made with debootstrap from the Debian archive this machine already uses, and kept outside the
# checkout so later runs on the same machine reuse it. Idempotent, like install.sh.
#
#   third_party/libtorch2.sh setup   make or update the root, nothing else
#   third_party/libtorch2.sh test    setup, then configure, build and ctest a copy of this tree
#                                    inside the root (README command 3)
#   third_party/libtorch2.sh run CMD run CMD inside the root (e.g. "python3 -c 'import torch'")
#
# TORCHFIT_TRIXIE_ROOT moves the root (default /var/cache/torchfit/trixie); TORCHFIT_NINJA_FLAGS
# and CTEST_ARGS pass flags to the build and the test run (e.g. CTEST_ARGS="-R Interop").
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source_dir=$(cd "$here/.." && pwd)
root=${TORCHFIT_TRIXIE_ROOT:-/var/cache/torchfit/trixie}
packages_file="$here/packages-trixie.txt"
[[ $(id -u) -eq 0 ]] || { echo "libtorch2.sh: debootstrap and chroot need root" >&2; exit 1; }

# The first Debian (not security) archive this machine's apt uses.
debian_mirror() {
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}')
  [[ -n "$uri" ]] || uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}')
  echo "${uri:-http://deb.debian.org/debian}"
}

wanted_packages() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$packages_file" | grep -v '^$'; }

# Runs "$@" inside the root in a private mount namespace: the mounts vanish with the process.
in_root() {
  unshare --mount --propagation private -- bash -euo pipefail -c '
    root=$1; shift
    mount --rbind /dev "$root/dev"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    exec chroot "$root" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin CI="${CI:-}" "$@"
  ' in_root "$root" "$@"
}

setup() {
  mkdir -p "$(dirname "$root")"
  exec 9>"$root.lock"
  flock 9  # a second caller (CI's early start, then README command 3) waits for the first
  if [[ ! -e "$root/.debootstrap-done" ]]; then
    command -v debootstrap >/dev/null || "$here/install.sh"
    echo "libtorch2.sh: making a Debian 13 root in $root (about 3 minutes)"
    rm -rf "$root"
    debootstrap --variant=minbase trixie "$root" "$(debian_mirror)" >"$root.debootstrap.log" 2>&1 ||
      { tail -20 "$root.debootstrap.log" >&2; exit 1; }
    echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/90torchfit"
    touch "$root/.debootstrap-done"
  fi
  mapfile -t wanted < <(wanted_packages)
  local missing
  missing=$(in_root dpkg-query -W -f='${Package} ${Status}\n' "${wanted[@]}" 2>/dev/null |
            awk '$NF == "installed" {print $1}' | sort | comm -13 - <(printf '%s\n' "${wanted[@]}" | sort) || true)
  if [[ -z "$missing" ]]; then
    echo "libtorch2.sh: root $root has all ${#wanted[@]} packages"
    return
  fi
  echo "libtorch2.sh: installing in the root:" $missing
  in_root apt-get update -qq
  in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >"$root.apt.log" 2>&1 ||
    { tail -30 "$root.apt.log" >&2; exit 1; }
  in_root apt-get clean
}

build_and_test() {
  local work="$root/torchfit"
  mkdir -p "$work"
  # A copy of the tree as it is (uncommitted changes included), without builds or git.
  rm -rf "$work/src"
  mkdir -p "$work/src"
  tar -C "$source_dir" --exclude=./.git --exclude='./build*' -cf - . | tar -C "$work/src" -xf -
  in_root env TORCHFIT_NINJA_FLAGS="${TORCHFIT_NINJA_FLAGS:-}" CTEST_ARGS="${CTEST_ARGS:-}" bash -euo pipefail -c '
    export CCACHE_DIR=/torchfit/ccache
    cmake -S /torchfit/src -B /torchfit/build -G Ninja -Wno-dev
    cmake --build /torchfit/build -- ${TORCHFIT_NINJA_FLAGS:-}
    cd /torchfit/build && ctest -j2 --output-on-failure $CTEST_ARGS'
}

case "${1:-test}" in
  setup) setup ;;
  test) setup; build_and_test ;;
  run) shift; setup >/dev/null; in_root "$@" ;;
  *) echo "usage: $0 [setup|test|run CMD...]" >&2; exit 2 ;;
esac
