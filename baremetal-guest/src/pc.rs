//! What a PC offers a kernel without drivers: PCI configuration space through I/O ports
//! 0xCF8/0xCFC (QEMU's `pc` machine has no ECAM), the CMOS real-time clock (wall time for
//! checking token validity), the HPET (a monotonic clock for timeouts and measurements) and
//! RDRAND (nonces).

use core::arch::asm;
use core::arch::x86_64::{__cpuid, _rdrand64_step};
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port must belong to a device that expects this write.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// The port must belong to a device for which reading has no unwanted side effect.
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller vouches for the port.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack)) };
    value
}

/// Writes 32 bits to an I/O port.
///
/// # Safety
/// As [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller vouches for the port.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) };
}

/// Reads 32 bits from an I/O port.
///
/// # Safety
/// As [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: the caller vouches for the port.
    unsafe { asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack)) };
    value
}

/// PCI configuration mechanism #1: address to 0xCF8, data at 0xCFC (256 bytes per function).
#[derive(Debug)]
pub struct PortCam(());

impl PortCam {
    /// The PC's configuration ports.
    ///
    /// # Safety
    /// Only one `PortCam` may change configuration space at a time (the kernel is single-threaded
    /// and runs with interrupts off).
    pub unsafe fn new() -> PortCam {
        PortCam(())
    }

    fn address(df: DeviceFunction, offset: u8) -> u32 {
        0x8000_0000
            | (u32::from(df.bus) << 16)
            | (u32::from(df.device & 0x1f) << 11)
            | (u32::from(df.function & 0x7) << 8)
            | u32::from(offset & 0xfc)
    }
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        // SAFETY: 0xCF8/0xCFC are the PC's PCI configuration ports; reads have no side effects.
        unsafe {
            outl(0xcf8, Self::address(df, offset));
            inl(0xcfc)
        }
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        // SAFETY: as above; virtio-drivers writes only the command register and BARs it sizes.
        unsafe {
            outl(0xcf8, Self::address(df, offset));
            outl(0xcfc, data);
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam(())
    }
}

/// Reads a CMOS register (NMI stays enabled: bit 7 clear).
fn cmos(reg: u8) -> u8 {
    // SAFETY: 0x70/0x71 are the CMOS index/data ports; reading a clock register is harmless.
    unsafe {
        outb(0x70, reg & 0x7f);
        inb(0x71)
    }
}

/// The CMOS real-time clock as Unix seconds (UTC, as QEMU's `-rtc base=utc` default sets it);
/// `None` if the clock holds an impossible date.
pub fn rtc_unix_time() -> Option<u64> {
    fn read() -> [u8; 7] {
        // Wait for the end of an update cycle, so the fields belong to one second.
        let mut spins = 0u32;
        while cmos(0x0a) & 0x80 != 0 && spins < 10_000_000 {
            spins += 1;
            core::hint::spin_loop();
        }
        [
            cmos(0x00),
            cmos(0x02),
            cmos(0x04),
            cmos(0x07),
            cmos(0x08),
            cmos(0x09),
            cmos(0x32),
        ]
    }
    // Two equal reads in a row: no field rolled over in between.
    let mut t = read();
    for _ in 0..8 {
        let again = read();
        if again == t {
            break;
        }
        t = again;
    }
    let status_b = cmos(0x0b);
    let bcd = status_b & 0x04 == 0;
    let dec = |v: u8| if bcd { (v & 0x0f) + (v >> 4) * 10 } else { v };
    let [sec, min, hour_raw, day, month, year, century] = t;
    let pm = hour_raw & 0x80 != 0;
    let mut hour = dec(hour_raw & 0x7f);
    if status_b & 0x02 == 0 {
        // 12-hour mode: 12 AM is 0, 12 PM is 12.
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let century = match dec(century) {
        c @ 19..=99 => u64::from(c),
        _ => 20,
    };
    let year = century * 100 + u64::from(dec(year));
    let (month, day) = (u64::from(dec(month)), u64::from(dec(day)));
    let (sec, min, hour) = (u64::from(dec(sec)), u64::from(dec(min)), u64::from(hour));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day)? * 86_400 + hour * 3600 + min * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> Option<u64> {
    let y = if m <= 2 { y.checked_sub(1)? } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

/// The HPET's main counter as a monotonic clock.
#[derive(Debug)]
pub struct Hpet {
    base: *mut u64,
    femtos_per_tick: u64,
}

/// Where the firmware (and QEMU's `pc` machine) puts the HPET.
pub const HPET_BASE: usize = 0xfed0_0000;

impl Hpet {
    /// Starts the HPET at `base` counting; `None` if there is none (all ones, or period 0).
    ///
    /// # Safety
    /// `base` must be identity-mapped MMIO of an HPET or unassigned address space.
    pub unsafe fn start(base: usize) -> Option<Hpet> {
        let base = base as *mut u64;
        // SAFETY: the caller vouches for the mapping; reads of unassigned space return ones.
        let caps = unsafe { base.read_volatile() };
        let femtos_per_tick = caps >> 32;
        if caps == u64::MAX || femtos_per_tick == 0 || femtos_per_tick > 100_000_000 {
            return None;
        }
        // General configuration (offset 0x10): ENABLE_CNF.
        // SAFETY: as above.
        unsafe {
            let conf = base.add(2);
            conf.write_volatile(conf.read_volatile() | 1);
        }
        Some(Hpet {
            base,
            femtos_per_tick,
        })
    }

    /// Microseconds since some fixed point in the past.
    pub fn micros(&self) -> u64 {
        // Main counter at offset 0xF0.
        // SAFETY: `start` checked that this is an HPET.
        let ticks = unsafe { self.base.add(0xf0 / 8).read_volatile() };
        // At most 100 ns per tick, so u128 keeps the product exact.
        u64::try_from(u128::from(ticks) * u128::from(self.femtos_per_tick) / 1_000_000_000)
            .unwrap_or(u64::MAX)
    }
}

/// Whether the CPU has RDRAND.
pub fn has_rdrand() -> bool {
    // CPUID leaf 1 exists on every x86_64 CPU.
    __cpuid(1).ecx & (1 << 30) != 0
}

/// Fills `out` from RDRAND; `false` if the CPU has none or it keeps failing.
pub fn rdrand_fill(out: &mut [u8]) -> bool {
    if !has_rdrand() {
        return false;
    }
    for chunk in out.chunks_mut(8) {
        let mut v = 0u64;
        // SAFETY: RDRAND is present (checked above).
        let ok = (0..32).any(|_| unsafe { rdrand64(&mut v) });
        if !ok {
            return false;
        }
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
    true
}

#[target_feature(enable = "rdrand")]
unsafe fn rdrand64(v: &mut u64) -> bool {
    _rdrand64_step(v) == 1
}

/// Writes `code` to QEMU's `isa-debug-exit` device at `port` (`-device
/// isa-debug-exit,iobase=0xf4,iosize=0x04`): QEMU exits with status `(code << 1) | 1`. Returns
/// only if there is no such device.
pub fn debug_exit(port: u16, code: u32) {
    // SAFETY: the port is the debug-exit device, or unassigned (the write is ignored).
    unsafe { outl(port, code) };
}
