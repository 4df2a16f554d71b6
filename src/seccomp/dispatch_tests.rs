//! The search dispatch decides every system call as seccompiler's chain does, and ends the
//! kernel's per-number emulation in a few steps.

use seccompiler::sock_filter;

use super::dispatch::with_search_dispatch;
use super::tests::json_compiled as compiled;
use super::*;

/// `struct seccomp_data`: nr, arch, instruction pointer, six arguments.
fn seccomp_data(nr: u32, arch: u32, args: [u64; 6]) -> [u8; 64] {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, arg) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_le_bytes());
    }
    data
}

/// Runs a classic BPF program the way the kernel does, over the instructions seccompiler
/// emits; returns the action and the number of instructions run.
fn run(program: &[sock_filter], data: &[u8; 64]) -> (u32, usize) {
    let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
    loop {
        let insn = &program[pc];
        steps += 1;
        pc += 1;
        let k = insn.k;
        let jump = |taken: bool| usize::from(if taken { insn.jt } else { insn.jf });
        match insn.code {
            0x20 => {
                let at = k as usize;
                a = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
            }
            0x54 => a &= k,
            0x05 => pc += k as usize,
            0x15 => pc += jump(a == k),
            0x25 => pc += jump(a > k),
            0x35 => pc += jump(a >= k),
            0x45 => pc += jump(a & k != 0),
            0x06 => return (k, steps),
            code => panic!("instruction {code:#x} at {} not modelled", pc - 1),
        }
    }
}

/// The kernel's `seccomp_is_const_allow`: how many instructions it runs for `nr` before it
/// knows the answer or gives up (at a load of an argument).
fn emulation_steps(program: &[sock_filter], nr: u32, arch: u32) -> usize {
    let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
    loop {
        let insn = &program[pc];
        steps += 1;
        pc += 1;
        let jump = |taken: bool| usize::from(if taken { insn.jt } else { insn.jf });
        match insn.code {
            0x20 if insn.k == 0 => a = nr,
            0x20 if insn.k == 4 => a = arch,
            0x20 => return steps,
            0x54 => a &= insn.k,
            0x05 => pc += insn.k as usize,
            0x15 => pc += jump(a == insn.k),
            0x25 => pc += jump(a > insn.k),
            0x35 => pc += jump(a >= insn.k),
            0x45 => pc += jump(a & insn.k != 0),
            0x06 => return steps,
            code => panic!("instruction {code:#x} not modelled"),
        }
    }
}

fn native_arch(program: &[sock_filter]) -> u32 {
    program[1].k
}

/// Argument sets that reach both sides of seccompiler's comparisons: zeros, all ones, small
/// values, and pseudo-random ones.
fn argument_sets() -> Vec<[u64; 6]> {
    let mut sets = vec![[0; 6], [u64::MAX; 6], [1, 2, 3, 4, 5, 6]];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..40 {
        let mut args = [0u64; 6];
        for arg in &mut args {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Half small values (flags, fds, ioctl numbers' low bits), half anything.
            *arg = if x & 1 == 0 { x >> 52 } else { x };
        }
        sets.push(args);
    }
    // The requests and flags the JSON names, so that the allowing side of each rule is taken.
    let constants: std::collections::BTreeSet<u64> = compiled()
        .values()
        .flatten()
        .filter(|insn| insn.code & 0x07 == 0x05)
        .map(|insn| u64::from(insn.k))
        .collect();
    for k in constants {
        sets.push([k; 6]);
        sets.push([k << 32 | k; 6]);
    }
    sets
}

#[test]
fn the_dispatch_decides_every_call_as_the_chain_does() {
    let sets = argument_sets();
    for (name, chain) in compiled() {
        let dispatched = with_search_dispatch(&chain);
        assert!(
            dispatched.len() > chain.len(),
            "{name}: no search was put in"
        );
        let native = native_arch(&chain);
        for nr in 0..600 {
            // A number the chain names is tried with every argument set, any other (decided
            // by its number alone) with a few.
            let named = chain.iter().any(|insn| insn.code == 0x15 && insn.k == nr);
            let tried = if named { &sets[..] } else { &sets[..3] };
            for arch in [native, 0x4000_0003] {
                for args in tried {
                    let data = seccomp_data(nr, arch, *args);
                    assert_eq!(
                        run(&dispatched, &data).0,
                        run(&chain, &data).0,
                        "{name}: call {nr}, arch {arch:#x}, args {args:x?}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_kernels_emulation_of_each_number_ends_in_a_few_steps() {
    for (name, chain) in compiled() {
        let dispatched = with_search_dispatch(&chain);
        let native = native_arch(&chain);
        let calls = chain.iter().filter(|insn| insn.code == 0x15).count();
        let worst = |program: &[sock_filter]| {
            (0..600)
                .map(|nr| emulation_steps(program, nr, native))
                .max()
                .unwrap()
        };
        let (before, after) = (worst(&chain), worst(&dispatched));
        // Four levels of the preamble, log2(calls) levels of search, a leaf of four
        // comparisons and the jump into the rules and their first steps.
        let bound = 4 + (usize::BITS - calls.leading_zeros()) as usize + 8 + 4;
        assert!(
            after <= bound,
            "{name}: {after} steps at worst (bound {bound}, the chain took {before})"
        );
    }
}

#[test]
fn the_dispatch_leaves_other_programs_alone() {
    let allow = sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0x7fff_0000,
    };
    assert_eq!(
        with_search_dispatch(std::slice::from_ref(&allow)),
        vec![allow]
    );
    // A chain too short to gain.
    let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH).unwrap();
    let short: FilterMap = seccompiler::compile_from_json(
        br#"{"t": {"default_action": "trap", "filter_action": "allow",
                  "filter": [{"syscall": "read"}, {"syscall": "write"}]}}"#
            .as_slice(),
        arch,
    )
    .unwrap()
    .into_iter()
    .collect();
    let short = &short["t"];
    assert_eq!(&with_search_dispatch(short), short);
    // A load of something other than the number where the chain starts.
    let mut odd = compiled()["build"].clone();
    odd[3].k = 16;
    assert_eq!(with_search_dispatch(&odd), odd);
}
