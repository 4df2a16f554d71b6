//! Moving frames between descriptor chains and the device's buffers, checking everything the
//! guest wrote: directions, addresses, lengths and the virtio-net header.

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::VNET_HDR_LEN;

/// Why a transmit chain was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDrop {
    /// A buffer the device may write, or one outside guest memory.
    BadChain,
    /// Shorter than the virtio-net header.
    TruncatedHeader,
    /// An offload the driver did not negotiate, or checksum fields beyond the frame.
    BadHeader,
    /// More than a header and a 64 KiB frame.
    Oversized,
}

/// Why a receive chain could not take the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxRefusal {
    /// A buffer the device may not write, or one outside guest memory: the chain is unusable.
    BadChain,
    /// Fine, but too short for this frame.
    TooSmall,
}

/// Copies the readable buffers of a transmit chain into `buf` (header first); returns the
/// length. Nothing is read beyond `buf`, however long the guest says its buffers are.
pub fn gather(
    mem: &GuestMemoryMmap,
    descriptors: impl Iterator<Item = Descriptor>,
    buf: &mut [u8],
) -> Result<usize, TxDrop> {
    let mut len = 0usize;
    for desc in descriptors {
        if desc.is_write_only() {
            return Err(TxDrop::BadChain);
        }
        let end = len
            .checked_add(desc.len() as usize)
            .filter(|end| *end <= buf.len())
            .ok_or(TxDrop::Oversized)?;
        mem.read_slice(&mut buf[len..end], desc.addr())
            .map_err(|_| TxDrop::BadChain)?;
        len = end;
    }
    if len < VNET_HDR_LEN {
        return Err(TxDrop::TruncatedHeader);
    }
    Ok(len)
}

/// Checks a transmit frame's header (`frame` starts with it) against what the driver
/// negotiated (`acked` features).
pub fn check_tx_header(frame: &[u8], acked: u64) -> Result<(), TxDrop> {
    let Some(header) = frame.get(..VNET_HDR_LEN) else {
        return Err(TxDrop::TruncatedHeader);
    };
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([header[at], header[at + 1]]));
    let flags = u32::from(header[0]);
    let gso_type = u32::from(header[1]);
    let hdr_len = u16_at(2);
    let csum_start = u16_at(6);
    let csum_offset = u16_at(8);
    let has = |bit: u32| acked & (1 << bit) != 0;
    let data_len = frame.len() - VNET_HDR_LEN;

    let gso_allowed = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => gso_type == VIRTIO_NET_HDR_GSO_NONE,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        // UDP fragmentation and anything newer are not offered.
        _ => false,
    };
    if !gso_allowed || hdr_len > data_len {
        return Err(TxDrop::BadHeader);
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        let csum_end = csum_start + csum_offset + 2;
        if !has(VIRTIO_NET_F_CSUM) || csum_end > data_len {
            return Err(TxDrop::BadHeader);
        }
    } else if gso_type != VIRTIO_NET_HDR_GSO_NONE {
        // A segmented frame needs its checksum completed per segment.
        return Err(TxDrop::BadHeader);
    }
    Ok(())
}

/// Copies `frame` (header first) into the writable buffers of a receive chain; returns the
/// length written. `scratch` holds the chain's buffers between the check and the copy.
pub fn scatter(
    mem: &GuestMemoryMmap,
    descriptors: impl Iterator<Item = Descriptor>,
    frame: &[u8],
    scratch: &mut Vec<(GuestAddress, usize)>,
) -> Result<u32, RxRefusal> {
    scratch.clear();
    let mut capacity = 0usize;
    for desc in descriptors {
        let len = desc.len() as usize;
        if !desc.is_write_only() || !mem.check_range(desc.addr(), len, Permissions::Write) {
            return Err(RxRefusal::BadChain);
        }
        scratch.push((desc.addr(), len));
        capacity = capacity.saturating_add(len);
    }
    if capacity < frame.len() {
        return Err(RxRefusal::TooSmall);
    }
    let mut done = 0usize;
    for &(addr, len) in scratch.iter() {
        if done == frame.len() {
            break;
        }
        let end = (done + len).min(frame.len());
        mem.write_slice(&frame[done..end], addr)
            .map_err(|_| RxRefusal::BadChain)?;
        done = end;
    }
    Ok(done as u32)
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    use super::*;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn header(flags: u8, gso: u8, hdr_len: u16, csum_start: u16, csum_offset: u16) -> Vec<u8> {
        let mut h = vec![flags, gso];
        h.extend_from_slice(&hdr_len.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&csum_start.to_le_bytes());
        h.extend_from_slice(&csum_offset.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h
    }

    #[test]
    fn gather_joins_buffers_and_refuses_bad_ones() {
        let mem = mem();
        mem.write_slice(&[1; 12], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[2; 60], GuestAddress(0x2000)).unwrap();
        let mut buf = vec![0u8; 100];
        let len = gather(
            &mem,
            [desc(0x1000, 12, 0), desc(0x2000, 60, 0)].into_iter(),
            &mut buf,
        )
        .unwrap();
        assert_eq!(len, 72);
        assert_eq!(&buf[..12], &[1; 12]);
        assert_eq!(&buf[12..72], &[2; 60]);
        let bad = |descs: &[Descriptor], buf: &mut [u8]| gather(&mem, descs.iter().copied(), buf);
        assert_eq!(bad(&[desc(0x1000, 12, W)], &mut buf), Err(TxDrop::BadChain));
        assert_eq!(
            bad(&[desc(0xdead_0000, 64, 0)], &mut buf),
            Err(TxDrop::BadChain)
        );
        assert_eq!(
            bad(&[desc(0x1000, 101, 0)], &mut buf),
            Err(TxDrop::Oversized)
        );
        assert_eq!(
            bad(&[desc(0x1000, 8, 0), desc(0x1000, u32::MAX, 0)], &mut buf),
            Err(TxDrop::Oversized)
        );
        assert_eq!(
            bad(&[desc(0x1000, 11, 0)], &mut buf),
            Err(TxDrop::TruncatedHeader)
        );
    }

    #[test]
    fn headers_may_only_ask_for_negotiated_offloads() {
        let frame = |h: Vec<u8>, data: usize| [h, vec![0u8; data]].concat();
        let csum = 1 << VIRTIO_NET_F_CSUM;
        let tso4 = csum | 1 << VIRTIO_NET_F_HOST_TSO4;
        assert_eq!(
            check_tx_header(&frame(header(0, 0, 0, 0, 0), 60), 0),
            Ok(())
        );
        // A checksum offload needs CSUM and must lie inside the frame.
        let partial = frame(header(1, 0, 0, 34, 16), 60);
        assert_eq!(check_tx_header(&partial, 0), Err(TxDrop::BadHeader));
        assert_eq!(check_tx_header(&partial, csum), Ok(()));
        let beyond = frame(header(1, 0, 0, 50, 16), 60);
        assert_eq!(check_tx_header(&beyond, csum), Err(TxDrop::BadHeader));
        // TSO needs HOST_TSO4 and a checksum to complete.
        let tso = frame(header(1, 1, 54, 34, 16), 9000);
        assert_eq!(check_tx_header(&tso, csum), Err(TxDrop::BadHeader));
        assert_eq!(check_tx_header(&tso, tso4), Ok(()));
        let tso_no_csum = frame(header(0, 1, 54, 0, 0), 9000);
        assert_eq!(check_tx_header(&tso_no_csum, tso4), Err(TxDrop::BadHeader));
        // Header length beyond the frame, UDP fragmentation, unknown types.
        let long_hdr = frame(header(1, 1, 9001, 34, 16), 9000);
        assert_eq!(check_tx_header(&long_hdr, tso4), Err(TxDrop::BadHeader));
        for gso in [3u8, 5, 0x7f, 0x80] {
            let f = frame(header(1, gso, 54, 34, 16), 9000);
            assert_eq!(
                check_tx_header(&f, u64::MAX),
                Err(TxDrop::BadHeader),
                "{gso}"
            );
        }
        assert_eq!(
            check_tx_header(&[0; 11], u64::MAX),
            Err(TxDrop::TruncatedHeader)
        );
    }

    #[test]
    fn scatter_fills_buffers_in_order_and_refuses_bad_chains() {
        let mem = mem();
        let frame: Vec<u8> = (0..100u8).collect();
        let mut scratch = Vec::new();
        let written = scatter(
            &mem,
            [desc(0x1000, 40, W), desc(0x2000, 100, W)].into_iter(),
            &frame,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(written, 100);
        let mut back = vec![0u8; 100];
        mem.read_slice(&mut back[..40], GuestAddress(0x1000))
            .unwrap();
        mem.read_slice(&mut back[40..], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(back, frame);
        let mut try_chain =
            |descs: &[Descriptor]| scatter(&mem, descs.iter().copied(), &frame, &mut scratch);
        assert_eq!(try_chain(&[desc(0x1000, 99, W)]), Err(RxRefusal::TooSmall));
        assert_eq!(try_chain(&[desc(0x1000, 200, 0)]), Err(RxRefusal::BadChain));
        assert_eq!(
            try_chain(&[desc(0xf_ff80, 0x100, W)]),
            Err(RxRefusal::BadChain)
        );
    }
}
