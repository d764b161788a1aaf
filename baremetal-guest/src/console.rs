//! Output on COM1 (I/O port 0x3F8): lines for people and `HBMETAL {json}` lines for programs.

use core::fmt::{self, Write};

use hostbind_baremetal::pc::{inb, outb};

const COM1: u16 = 0x3f8;

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // Wait until the transmit holding register is empty (bounded: QEMU is always ready).
            // SAFETY: COM1's line status and data ports.
            unsafe {
                let mut spins = 0u32;
                while inb(COM1 + 5) & 0x20 == 0 && spins < 100_000 {
                    spins += 1;
                }
                outb(COM1, b);
            }
        }
        Ok(())
    }
}

/// Prints one line for people.
pub fn say(args: fmt::Arguments<'_>) {
    let _ = writeln!(Com1, "{args}");
}

/// Prints one `HBMETAL {json}` line.
pub fn emit(v: &serde_json::Value) {
    let _ = writeln!(Com1, "HBMETAL {v}");
}
