//! The virtio-drivers HAL for a kernel whose memory is identity-mapped (physical address ==
//! virtual address), with DMA buffers taken from the global allocator. Nothing is bounced or
//! encrypted: the host sees all guest memory (no confidential-computing guest).

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The HAL: DMA memory from the heap, addresses used as they are.
#[derive(Debug, Clone, Copy)]
pub struct IdentityHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: allocations are zeroed, page-aligned and not used elsewhere until freed; the
// identity mapping makes every virtual address the physical address the device needs.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // The trait has no error path: running out of DMA memory is a fatal setup error.
        let Some(layout) = dma_layout(pages.max(1)) else {
            alloc::alloc::handle_alloc_error(Layout::new::<[u8; PAGE_SIZE]>())
        };
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (ptr as PhysAddr, p),
            None => alloc::alloc::handle_alloc_error(layout),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        match dma_layout(pages.max(1)) {
            Some(layout) => {
                // SAFETY: the caller passes back what `dma_alloc` returned for `pages`.
                unsafe { dealloc(vaddr.as_ptr(), layout) };
                0
            }
            None => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // The boot code maps the first 64 GiB, which holds the PCI BARs the firmware assigns.
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
