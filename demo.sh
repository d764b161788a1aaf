#!/usr/bin/env bash
# Sets up this machine (Debian packages) and runs the hostbind demo: a software TPM, a vendor, an
# enrolled host proxy with a 2-seat license, and three guest agents standing for three VMs.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup
cargo build --workspace --bins --quiet
export TSS2_LOG=all+none
exec target/debug/hostbind-demo
