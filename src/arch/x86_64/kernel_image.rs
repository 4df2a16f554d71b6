//! What a kernel image's headers say before it is loaded: that it is not a 32-bit ELF (the ELF
//! loader would read one as 64-bit and the guest would enter it), and how far into guest
//! memory it will reach, so that too little memory is named as such rather than reported by
//! the loader as "Unable to read kernel image".

use std::io::{Read, Seek, SeekFrom};

use super::layout::GUEST_PHYS_END;
use super::{ELF_MAGIC, KERNEL_HDR_MAGIC};

/// ELF identification: the class byte, and its value for 32-bit files.
const EI_CLASS: usize = 4;
const ELFCLASS32: u8 = 1;
/// The ELF64 header fields that locate the program headers.
const ELF64_HEADER_LEN: usize = 64;
const ELF64_PHOFF: usize = 0x20;
const ELF64_PHENTSIZE: usize = 0x36;
const ELF64_PHNUM: usize = 0x38;
/// An ELF64 program header: its length, type, physical address and size in memory.
const ELF64_PHDR_LEN: usize = 56;
const PHDR_TYPE: usize = 0;
const PHDR_PADDR: usize = 0x18;
const PHDR_MEMSZ: usize = 0x28;
const PT_LOAD: u32 = 1;
/// bzImage setup header fields (offsets in the file) that say where the kernel goes.
const BZIMAGE_SETUP_SECTS: usize = 0x1f1;
const BZIMAGE_HDR_MAGIC: usize = 0x202;
const BZIMAGE_CODE32_START: usize = 0x214;
const BZIMAGE_HEADER_END: usize = 0x218;
/// The boot sector and each setup sector.
const SECTOR_SIZE: u64 = 512;
/// Setup sectors of a bzImage whose header says 0 (the boot protocol's old default).
const DEFAULT_SETUP_SECTS: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum KernelImageError {
    #[error("cannot read the kernel image's headers: {0}")]
    Read(std::io::Error),
    #[error("32-bit ELF kernels are not supported: give a 64-bit vmlinux or a bzImage")]
    Elf32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Reads as much of `image` from `offset` as `buf` holds, or less at its end.
fn read_at<R: Read + Seek>(image: &mut R, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    image.seek(SeekFrom::Start(offset))?;
    let mut filled = 0;
    while filled < buf.len() {
        match image.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The end of guest memory the kernel image will occupy (its last byte + 1), when its
/// headers say; None when they cannot be read or are not a kernel's (the loader then reports
/// what is wrong with them). Refuses a 32-bit ELF.
pub fn kernel_extent<R: Read + Seek>(image: &mut R) -> Result<Option<u64>, KernelImageError> {
    let mut header = [0u8; BZIMAGE_HEADER_END];
    let len = read_at(image, 0, &mut header).map_err(KernelImageError::Read)?;
    if len >= ELF_MAGIC.len() && header[..ELF_MAGIC.len()] == ELF_MAGIC[..] {
        if len > EI_CLASS && header[EI_CLASS] == ELFCLASS32 {
            return Err(KernelImageError::Elf32);
        }
        if len < ELF64_HEADER_LEN {
            return Ok(None);
        }
        elf_extent(image, &header)
    } else {
        if len < BZIMAGE_HEADER_END || u32_at(&header, BZIMAGE_HDR_MAGIC) != KERNEL_HDR_MAGIC {
            return Ok(None);
        }
        bzimage_extent(image, &header)
    }
}

/// The ELF loader places each PT_LOAD segment at its physical address.
fn elf_extent<R: Read + Seek>(
    image: &mut R,
    header: &[u8],
) -> Result<Option<u64>, KernelImageError> {
    let phoff = u64_at(header, ELF64_PHOFF);
    let phentsize = usize::from(u16_at(header, ELF64_PHENTSIZE));
    let phnum = usize::from(u16_at(header, ELF64_PHNUM));
    if phentsize < ELF64_PHDR_LEN {
        return Ok(None);
    }
    let mut headers = vec![0u8; phentsize * phnum];
    let read = read_at(image, phoff, &mut headers).map_err(KernelImageError::Read)?;
    if read < headers.len() {
        return Ok(None);
    }
    Ok(headers
        .chunks_exact(phentsize)
        .filter(|ph| u32_at(ph, PHDR_TYPE) == PT_LOAD)
        .filter_map(|ph| u64_at(ph, PHDR_PADDR).checked_add(u64_at(ph, PHDR_MEMSZ)))
        .max())
}

/// The protected-mode kernel, what follows the boot sector and the setup sectors, is loaded
/// at `code32_start`.
fn bzimage_extent<R: Read + Seek>(
    image: &mut R,
    header: &[u8],
) -> Result<Option<u64>, KernelImageError> {
    let file_len = image
        .seek(SeekFrom::End(0))
        .map_err(KernelImageError::Read)?;
    let setup_sects = match header[BZIMAGE_SETUP_SECTS] {
        0 => DEFAULT_SETUP_SECTS,
        n => u64::from(n),
    };
    let start = u64::from(u32_at(header, BZIMAGE_CODE32_START));
    Ok(file_len
        .checked_sub((setup_sects + 1) * SECTOR_SIZE)
        .and_then(|len| start.checked_add(len))
        .filter(|end| *end <= GUEST_PHYS_END))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// A 64-bit ELF header with one PT_LOAD program header right after it.
    fn elf(paddr: u64, memsz: u64) -> Vec<u8> {
        let mut image = vec![0u8; ELF64_HEADER_LEN + ELF64_PHDR_LEN];
        image[..4].copy_from_slice(ELF_MAGIC);
        image[EI_CLASS] = 2;
        image[ELF64_PHOFF..ELF64_PHOFF + 8]
            .copy_from_slice(&(ELF64_HEADER_LEN as u64).to_le_bytes());
        image[ELF64_PHENTSIZE..ELF64_PHENTSIZE + 2]
            .copy_from_slice(&(ELF64_PHDR_LEN as u16).to_le_bytes());
        image[ELF64_PHNUM..ELF64_PHNUM + 2].copy_from_slice(&1u16.to_le_bytes());
        let ph = ELF64_HEADER_LEN;
        image[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        image[ph + PHDR_PADDR..ph + PHDR_PADDR + 8].copy_from_slice(&paddr.to_le_bytes());
        image[ph + PHDR_MEMSZ..ph + PHDR_MEMSZ + 8].copy_from_slice(&memsz.to_le_bytes());
        image
    }

    #[test]
    fn an_elf_reaches_the_end_of_its_last_segment() {
        let extent = kernel_extent(&mut Cursor::new(elf(0x100_0000, 0x2_0000))).unwrap();
        assert_eq!(extent, Some(0x102_0000));
    }

    #[test]
    fn a_32_bit_elf_is_refused() {
        let mut image = elf(0x100_0000, 0x1000);
        image[EI_CLASS] = ELFCLASS32;
        let err = kernel_extent(&mut Cursor::new(image)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "32-bit ELF kernels are not supported: give a 64-bit vmlinux or a bzImage"
        );
    }

    #[test]
    fn a_bzimage_reaches_code32_start_plus_its_kernel() {
        let mut image = vec![0u8; 0x10_0000];
        image[BZIMAGE_SETUP_SECTS] = 3;
        image[BZIMAGE_HDR_MAGIC..BZIMAGE_HDR_MAGIC + 4]
            .copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        image[BZIMAGE_CODE32_START..BZIMAGE_CODE32_START + 4]
            .copy_from_slice(&0x10_0000u32.to_le_bytes());
        let extent = kernel_extent(&mut Cursor::new(image)).unwrap();
        assert_eq!(extent, Some(0x10_0000 + 0x10_0000 - 4 * 512));
    }

    #[test]
    fn what_is_no_kernel_is_left_to_the_loader() {
        for image in [
            Vec::new(),
            b"\x7fEL".to_vec(),
            vec![b'x'; 4096],
            elf(0, 0)[..40].to_vec(),
        ] {
            assert_eq!(kernel_extent(&mut Cursor::new(image)).unwrap(), None);
        }
    }
}
