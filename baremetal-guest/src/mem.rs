//! What the toolchain's objects expect from a libc that is not there: the memory functions the
//! compiler and the C parts of ring call (`memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`), and
//! the unwinder entry `_Unwind_Resume`.

core::arch::global_asm!(
    r#"
    .text
    .global memcpy
memcpy:
    movq %rdi, %rax
    movq %rdx, %rcx
    rep movsb
    ret

    .global memset
memset:
    movq %rdi, %r9
    movl %esi, %eax
    movq %rdx, %rcx
    rep stosb
    movq %r9, %rax
    ret

    .global memmove
memmove:
    movq %rdi, %rax
    movq %rdx, %rcx
    cmpq %rsi, %rdi
    jbe 1f
    leaq -1(%rsi,%rdx), %rsi
    leaq -1(%rdi,%rdx), %rdi
    std
    rep movsb
    cld
    ret
1:  rep movsb
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:
    xorl %eax, %eax
1:  testq %rdx, %rdx
    jz 2f
    movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    subl %ecx, %eax
    jnz 2f
    incq %rdi
    incq %rsi
    decq %rdx
    jmp 1b
2:  ret
    "#,
    options(att_syntax)
);

/// The precompiled `core`/`alloc` of the x86_64-unknown-linux-gnu target were built to unwind,
/// so their cleanup paths call `_Unwind_Resume`. This kernel never unwinds (`panic = "abort"`:
/// the panic handler exits QEMU), so this is unreachable; it stops the CPU should it ever run.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    loop {
        // SAFETY: halting with interrupts off just stops this CPU.
        unsafe { core::arch::asm!("cli; hlt") };
    }
}
