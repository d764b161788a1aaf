//! hostbind for guests without an OS: a `no_std` + `alloc` token client over virtio-vsock.
//!
//! - [`client`]: connects to the host proxy (CID 2) over the [`vsock`] device, says Hello, asks
//!   for one token and verifies it offline with the embedded vendor key: the wire protocol and
//!   the verifier are `hostbind-attest` itself, built without `std`.
//! - [`vsock`]: a virtio-vsock stream driver on [`virtio_drivers`]' queues and transports in
//!   which every wait on the device has a deadline and notifies the device again.
//! - [`hal`]: the virtio-drivers HAL for an identity-mapped kernel (physical == virtual).
//! - [`pc`]: what a PC (QEMU `pc` machine) offers without drivers: PCI configuration through
//!   I/O ports 0xCF8/0xCFC, the CMOS real-time clock, the HPET as a monotonic clock, RDRAND.
//!
//! The binary (`src/main.rs`) is a freestanding x86_64 kernel built from these pieces; another
//! unikernel or boot loader embeds the client by depending on this library and supplying its
//! own [`virtio_drivers::Hal`] and [`vsock::Clock`] if its memory is not identity-mapped.
#![no_std]

extern crate alloc;

pub mod client;
pub mod hal;
pub mod pc;
pub mod vsock;
