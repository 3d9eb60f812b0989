#!/usr/bin/env bash
# Installs everything DWCP needs on Debian 12 and builds it in place. Idempotent and quick when
# nothing changed: apt runs only for missing packages, pip only when requirements changed, and the
# build is incremental. Run as root (apt); everything Python goes into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential pkg-config python3-dev python3-venv   # C/Cython build
  libxxhash-dev                                          # XXH3 payload checksums in the C core
  openssl                                                # TLS tests make throwaway certificates
  iperf3 iperf                                           # peers in bench/throughput
  procps iproute2                                        # ps/ss/ip used by tests that cross-check us
  iputils-ping                                           # netlab tests/bench measure RTT with ping
  globus-gridftp-server-progs globus-gass-copy-progs     # GridFTP, a peer in bench/wan
  libzstd-dev                                            # zstd inside the HDE C core
  libssl-dev                                             # libcrypto's AEAD for sealed frames (C core)
  zstd xdelta3 redis-server redis-tools memcached        # peers and the datasets of bench/hde
  clang llvm bpftool libbpf-dev libelf-dev zlib1g-dev    # eBPF programs (CO-RE) and their loader
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: missing Debian packages: ${missing[*]}; run as root (or apt-get install them)" >&2
    exit 1
  fi
  echo "install.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "install.sh: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi

stamp=.venv/.dwcp-requirements
want=$(cat requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "install.sh: installing Python dependencies"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  # Editable install: console scripts (dwcp, dwcp-bench) on .venv/bin, code served from the tree.
  .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
  echo "$want" > "$stamp"
fi

# Incremental in-place build of the compiled core (a no-op when nothing changed). The tree holds one
# build mode at a time (release, debug, sanitize); switching modes rebuilds everything, since
# setuptools cannot tell that only the flags changed -- and a sanitizer build left in place would
# make every later plain run fail to load the extension.
mode=release
[[ ${DWCP_DEBUG:-} == 1 ]] && mode=debug
[[ ${DWCP_SANITIZE:-} == 1 ]] && mode=sanitize
if [[ $(cat .build-mode 2>/dev/null || echo none) != "$mode" ]]; then
  rm -rf build dwcp/_core*.so dwcp/_core.c dwcp/netlab/dwcp-delayline
fi
.venv/bin/python setup.py -q build_ext --inplace
echo "$mode" > .build-mode
