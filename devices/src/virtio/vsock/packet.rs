//! The virtio-vsock packet header (virtio 1.2, section 5.10.6) and the checks a packet from the
//! guest must pass before the muxer sees it.

use std::io::Read;

/// The host's CID: every packet from the guest must be addressed to it.
pub const HOST_CID: u64 = 2;
/// The lowest CID a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

/// Bytes in a header on the wire.
pub const HDR_LEN: usize = 44;
/// The largest payload a packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The only socket type: a stream.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header, in host order; `to_bytes`/`from_bytes` give the little-endian wire form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u64_at(bytes: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn u32_at(bytes: &[u8; HDR_LEN], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u16_at(bytes: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

impl Header {
    pub fn from_bytes(bytes: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: u64_at(bytes, 0),
            dst_cid: u64_at(bytes, 8),
            src_port: u32_at(bytes, 16),
            dst_port: u32_at(bytes, 20),
            len: u32_at(bytes, 24),
            kind: u16_at(bytes, 28),
            op: u16_at(bytes, 30),
            flags: u32_at(bytes, 32),
            buf_alloc: u32_at(bytes, 36),
            fwd_cnt: u32_at(bytes, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut bytes = [0u8; HDR_LEN];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.kind.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }

    /// A reset answering `packet` (ports swapped): what a peer gets for a packet nobody takes.
    pub fn rst_reply(packet: &Header) -> Self {
        Self {
            src_cid: packet.dst_cid,
            dst_cid: packet.src_cid,
            src_port: packet.dst_port,
            dst_port: packet.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }
    }
}

/// Why a packet from the guest was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("the chain is {0} readable bytes, shorter than a header")]
    Short(usize),
    #[error("the header says {len} payload bytes but the chain holds {available}")]
    LengthMismatch { len: u32, available: usize },
    #[error("a payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("from CID {src} to CID {dst}: not from the guest's CID to the host's")]
    WrongAddress { src: u64, dst: u64 },
    #[error("cannot read the packet from guest memory: {0}")]
    Read(std::io::ErrorKind),
}

/// Reads a packet from a TX chain's readable bytes: the header, checked, and its payload into
/// the start of `payload` (at least `MAX_PAYLOAD` long, so that no packet needs it resized).
/// The CIDs must be the guest's and the host's.
pub fn read_packet(
    reader: &mut impl Read,
    available: usize,
    guest_cid: u64,
    payload: &mut [u8],
) -> Result<Header, PacketError> {
    if available < HDR_LEN {
        return Err(PacketError::Short(available));
    }
    let mut bytes = [0u8; HDR_LEN];
    reader
        .read_exact(&mut bytes)
        .map_err(|err| PacketError::Read(err.kind()))?;
    let header = Header::from_bytes(&bytes);
    let len = header.len as usize;
    if len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(header.len));
    }
    if len > available - HDR_LEN {
        return Err(PacketError::LengthMismatch {
            len: header.len,
            available: available - HDR_LEN,
        });
    }
    if header.src_cid != guest_cid || header.dst_cid != HOST_CID {
        return Err(PacketError::WrongAddress {
            src: header.src_cid,
            dst: header.dst_cid,
        });
    }
    let payload = payload
        .get_mut(..len)
        .ok_or(PacketError::TooLong(header.len))?;
    reader
        .read_exact(payload)
        .map_err(|err| PacketError::Read(err.kind()))?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    fn wire(header: &Header, payload: &[u8]) -> Vec<u8> {
        [header.to_bytes().as_slice(), payload].concat()
    }

    #[test]
    fn a_header_round_trips_in_little_endian() {
        let h = header(5);
        let bytes = h.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), h);
    }

    #[test]
    fn a_good_packet_is_read_with_its_payload() {
        let bytes = wire(&header(3), b"abcdef");
        let mut payload = vec![0u8; MAX_PAYLOAD];
        let h = read_packet(&mut bytes.as_slice(), bytes.len(), 3, &mut payload).unwrap();
        assert_eq!(h.len, 3);
        assert_eq!(&payload[..3], b"abc");
    }

    #[test]
    fn bad_packets_are_refused() {
        let mut payload = vec![0u8; MAX_PAYLOAD];
        let short = [0u8; 10];
        assert_eq!(
            read_packet(&mut short.as_slice(), 10, 3, &mut payload),
            Err(PacketError::Short(10))
        );
        let lying = wire(&header(100), b"abc");
        assert_eq!(
            read_packet(&mut lying.as_slice(), lying.len(), 3, &mut payload),
            Err(PacketError::LengthMismatch {
                len: 100,
                available: 3
            })
        );
        let huge = wire(&header(u32::MAX), b"");
        assert_eq!(
            read_packet(&mut huge.as_slice(), usize::MAX, 3, &mut payload),
            Err(PacketError::TooLong(u32::MAX))
        );
        let bytes = wire(&header(0), b"");
        assert_eq!(
            read_packet(&mut bytes.as_slice(), bytes.len(), 4, &mut payload),
            Err(PacketError::WrongAddress { src: 3, dst: 2 })
        );
    }

    #[test]
    fn a_reset_reply_swaps_the_addresses() {
        let rst = Header::rst_reply(&header(9));
        assert_eq!((rst.src_cid, rst.dst_cid), (HOST_CID, 3));
        assert_eq!((rst.src_port, rst.dst_port), (52, 1000));
        assert_eq!((rst.op, rst.len), (OP_RST, 0));
    }
}
