//! Boot: the PVH ELF note and the 32-bit entry QEMU's `-kernel` jumps to.
//!
//! QEMU loads an ELF kernel given with `-kernel` at its physical addresses when it carries a
//! `XEN_ELFNOTE_PHYS32_ENTRY` note, and its firmware (SeaBIOS, which also assigns the PCI BARs)
//! jumps there in 32-bit protected mode, paging off, interrupts off, `%ebx` = the physical
//! address of the `hvm_start_info` (command line, memory map). The entry code:
//! 1. builds page tables that identity-map the first 64 GiB with 2 MiB pages (RAM, and the PCI
//!    BARs wherever the firmware put them; phys == virt is what the virtio HAL relies on);
//! 2. enables PAE, long mode (EFER.LME), paging, and SSE (CR0.EM off, CR0.MP, CR4.OSFXSR,
//!    CR4.OSXMMEXCPT): Rust's precompiled `core` for x86_64-unknown-linux-gnu uses SSE;
//! 3. loads a GDT with a 64-bit code segment, far-jumps into it, sets a 256 KiB stack and calls
//!    `kernel_main(start_info)`. Interrupts stay off for the kernel's whole life (it polls).
//!
//! The note's descriptor is 8 bytes (`.quad`): QEMU reads a 64-bit entry address from 64-bit
//! ELF files. The note section is 4-byte aligned, which is how QEMU walks notes.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4              /* namesz: "Xen\0" */
    .long 8              /* descsz: a 64-bit address */
    .long 18             /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32

    .section .text.boot32, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, pvh_start_info
    /* identity map 0..64 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..64] -> PD0..PD63 */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl $64, %ecx
    jne 1b
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax          /* present, writable, 2 MiB */
    movl %eax, boot_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax           /* high 32 bits of (index << 21) */
    movl %eax, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl $(64 * 512), %ecx
    jne 2b
    /* PAE + SSE (OSFXSR, OSXMMEXCPT) */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    /* EFER.LME */
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    /* paging + protection; clear EM, set MP for SSE */
    movl %cr0, %eax
    andl $~(1 << 2), %eax
    orl $((1 << 31) | (1 << 1) | 1), %eax
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $boot_start64

    .code64
boot_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movabsq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl pvh_start_info, %edi
    call kernel_main
3:  hlt
    jmp 3b

    .section .rodata.boot
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff /* 0x10: data */
boot_gdt_ptr:
    .word boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd: .skip 4096 * 64
boot_stack: .skip 256 * 1024
boot_stack_top:
    .balign 8
    .global pvh_start_info
pvh_start_info: .skip 8
    "#,
    options(att_syntax)
);
