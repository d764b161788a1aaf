#!/usr/bin/env bash
# Sets up this machine (Debian packages) and runs a hostbind demo:
#   ./demo.sh        a software TPM, a vendor, an enrolled host proxy with a 2-seat license, and
#                    three guest agents standing for three VMs
#   ./demo.sh pool   a seat pool across three nodes (three enrolled proxies with their software
#                    TPMs, a three-member etcd cluster over TLS, one pool license, guest agents),
#                    through a full pool, an etcd member killed, quorum lost and back
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup
cargo build --workspace --bins --quiet
export TSS2_LOG=all+none
exec target/debug/hostbind-demo "$@"
