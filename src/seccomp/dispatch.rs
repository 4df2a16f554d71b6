//! A binary search on the system call number in front of a seccompiler program.
//!
//! seccompiler compiles a filter into one chain of `JEQ nr` comparisons, one per system call,
//! each followed by that call's rules. Run as a program that is fine for a call early in the
//! chain, but installing a filter makes the kernel emulate it once for every system call number
//! of each architecture (`seccomp_cache_prepare`, under the process's signal lock, so a second
//! thread's install waits for it): with a chain of about a hundred calls that emulation was two
//! thirds of each install, and an install of the main thread's filter took 0.3 ms, a quarter of
//! mote's time to its first API answer. A search by number ends that emulation, and each
//! filtered call at run time, in a few comparisons instead of up to a hundred.
//!
//! The chain itself is kept, unreachable, behind the search: the search jumps straight to
//! where a matched comparison led, so the rules run exactly as seccompiler wrote them. A
//! program that is not laid out as expected is returned unchanged. Shared with `build.rs`
//! (through `#[path]`), so it depends on nothing but std and seccompiler.

use std::collections::BTreeMap;

use seccompiler::sock_filter;

/// `BPF_LD | BPF_W | BPF_ABS` (the first two are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
/// The kernel's limit on a classic BPF program (`BPF_MAXINSNS`).
const MAX_INSNS: usize = 4096;
/// Below this many calls a search saves too little to be worth its instructions.
const MIN_CALLS: usize = 8;
/// A leaf of the search compares up to this many numbers one by one: each comparison costs two
/// instructions, each level of the search one.
const LEAF_CALLS: usize = 4;

/// One slot of the search: an instruction, or a jump to a place in the original program
/// (resolved once the search's length is known).
enum Slot {
    Insn(sock_filter),
    ToOriginal(usize),
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// `program` with a binary search on the system call number put in front of seccompiler's
/// chain of comparisons; `program` itself when it is not seccompiler's layout (the
/// architecture check, the load of the number, then the chain) or is too short to gain.
pub fn with_search_dispatch(program: &[sock_filter]) -> Vec<sock_filter> {
    match search_dispatch(program) {
        Some(dispatched) => dispatched,
        None => program.to_vec(),
    }
}

fn search_dispatch(program: &[sock_filter]) -> Option<Vec<sock_filter>> {
    // seccompiler's preamble: load arch, compare, kill; load nr.
    let preamble = program.get(..4)?;
    let is_load = |insn: &sock_filter, offset| insn.code == BPF_LD_W_ABS && insn.k == offset;
    if !(is_load(&preamble[0], ARCH_OFFSET)
        && preamble[1].code == BPF_JMP_JEQ_K
        && (preamble[1].jt, preamble[1].jf) == (1, 0)
        && preamble[2].code == BPF_RET_K
        && is_load(&preamble[3], NR_OFFSET))
    {
        return None;
    }
    let (entries, mismatch) = walk_chain(program, preamble.len())?;
    if entries.len() < MIN_CALLS {
        return None;
    }
    let entries: Vec<(u32, usize)> = entries.into_iter().collect();
    let search = search(&entries, &program[mismatch]);
    let body_start = preamble.len() + search.len();
    let mut out = Vec::with_capacity(body_start + program.len() - preamble.len());
    out.extend_from_slice(preamble);
    for slot in search {
        let at = out.len();
        out.push(match slot {
            Slot::Insn(insn) => insn,
            Slot::ToOriginal(target) => {
                let relocated = body_start + (target - preamble.len());
                insn(BPF_JMP_JA, 0, 0, u32::try_from(relocated - at - 1).ok()?)
            }
        });
    }
    out.extend_from_slice(&program[preamble.len()..]);
    (out.len() <= MAX_INSNS).then_some(out)
}

/// Follows the path a system call number that matches nothing takes through the chain, which
/// starts at `start` (after the preamble): every
/// `JEQ nr` on it names a call and where a match leads; the path ends at the mismatch action.
/// Only comparisons and plain jumps may lie on it (the accumulator must still hold the
/// number). Returns the calls (the first comparison of a number wins, as in the chain) and the
/// index of the final `RET`.
fn walk_chain(program: &[sock_filter], start: usize) -> Option<(BTreeMap<u32, usize>, usize)> {
    let mut entries = BTreeMap::new();
    let mut pc = start;
    // BPF jumps only forward, so the walk ends; the bound is a second guard.
    for _ in 0..program.len() {
        let insn = program.get(pc)?;
        match insn.code {
            BPF_JMP_JEQ_K => {
                entries
                    .entry(insn.k)
                    .or_insert(pc + 1 + usize::from(insn.jt));
                pc += 1 + usize::from(insn.jf);
            }
            BPF_JMP_JA => pc += 1 + usize::try_from(insn.k).ok()?,
            BPF_RET_K => return Some((entries, pc)),
            _ => return None,
        }
    }
    None
}

/// The search over `entries` (sorted by number): inner nodes split on `JGE`, leaves compare
/// each number and end in `mismatch`.
fn search(entries: &[(u32, usize)], mismatch: &sock_filter) -> Vec<Slot> {
    let mut slots = Vec::new();
    if entries.len() <= LEAF_CALLS {
        for &(nr, target) in entries {
            slots.push(Slot::Insn(insn(BPF_JMP_JEQ_K, 0, 1, nr)));
            slots.push(Slot::ToOriginal(target));
        }
        slots.push(Slot::Insn(mismatch.clone()));
        return slots;
    }
    let mid = entries.len() / 2;
    let left = search(&entries[..mid], mismatch);
    let right = search(&entries[mid..], mismatch);
    // A number at or above the middle one goes right, over the left half.
    match u8::try_from(left.len()) {
        Ok(skip) => slots.push(Slot::Insn(insn(BPF_JMP_JGE_K, skip, 0, entries[mid].0))),
        Err(_) => {
            slots.push(Slot::Insn(insn(BPF_JMP_JGE_K, 0, 1, entries[mid].0)));
            // Fits: a program is at most 4096 instructions, checked by the caller.
            slots.push(Slot::Insn(insn(BPF_JMP_JA, 0, 0, left.len() as u32)));
        }
    }
    slots.extend(left);
    slots.extend(right);
    slots
}
