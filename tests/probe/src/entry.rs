//! The probe's only kernel-mode code, in assembly: load our GDT and page tables, enable SSE,
//! and `iretq` to CPL 3 with IOPL 3. Kernel-mode guest code is emulated instruction by
//! instruction on some hosts, so this is a handful of instructions and no loops; the page
//! tables are built by the assembler, not at run time.

core::arch::global_asm!(
    r#"
    .section .text._start, "ax"
    .global _start
    .code64
_start:
    lgdt [rip + probe_gdt_ptr]
    lea rax, [rip + probe_pml4]
    mov cr3, rax
    mov rax, cr4
    or rax, 0x600
    mov cr4, rax
    lea rcx, [rip + probe_stack_top - 8]
    push 0x1b
    push rcx
    push 0x3002
    push 0x23
    lea rax, [rip + probe_main]
    push rax
    mov rdi, rsi
    iretq

    .section .rodata.probe_gdt, "a"
    .balign 16
probe_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
probe_gdt_end:
    .balign 16
probe_gdt_ptr:
    .word probe_gdt_end - probe_gdt - 1
    .quad probe_gdt

    .section .data.probe_page_tables, "aw"
    .balign 4096
probe_pml4:
    .quad probe_pdpt + 0x7
    .fill 511, 8, 0
probe_pdpt:
    .quad probe_pd + 0x7
    .quad probe_pd + 0x1007
    .quad probe_pd + 0x2007
    .quad probe_pd + 0x3007
    .fill 508, 8, 0
probe_pd:
    .set probe_page, 0
    .rept 1536
    .quad (probe_page << 21) | 0x87
    .set probe_page, probe_page + 1
    .endr
    .rept 512
    .quad (probe_page << 21) | 0x9f
    .set probe_page, probe_page + 1
    .endr

    .section .bss.probe_stack, "aw", @nobits
    .balign 16
probe_stack:
    .skip 65536
probe_stack_top:
"#
);

// The memory functions the compiler may call; there is no libc to provide them. In assembly
// so that the compiler cannot turn them back into calls to themselves.
core::arch::global_asm!(
    r#"
    .section .text.probe_mem, "ax"
    .global memcpy
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret

    .global memmove
memmove:
    mov rax, rdi
    mov rcx, rdx
    cmp rdi, rsi
    jbe 1f
    lea rsi, [rsi + rdx - 1]
    lea rdi, [rdi + rdx - 1]
    std
    rep movsb
    cld
    ret
1:
    rep movsb
    ret

    .global memset
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:
    xor eax, eax
    mov rcx, rdx
    test rcx, rcx
    jz 2f
    repe cmpsb
    je 2f
    movzx eax, byte ptr [rdi - 1]
    movzx ecx, byte ptr [rsi - 1]
    sub eax, ecx
2:
    ret
"#
);
