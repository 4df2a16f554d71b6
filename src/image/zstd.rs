//! zstd-compressed layers (`application/vnd.oci.image.layer.v1.tar+zstd`): a reader that
//! decodes every frame of a stream, as the `zstd` tool does. ruzstd's own streaming decoder
//! stops after the first frame, but a layer may hold several (`zstd:chunked` layers, as podman
//! writes them, are many frames with skippable frames of metadata between them).

use std::io::{self, BufRead, Read};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

/// Where the decoder is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Before the first frame: the stream must have one.
    Start,
    /// Inside a frame, whose decoded bytes are being handed out.
    InFrame,
    /// After a frame (or a skippable frame): the end of the stream may come.
    BetweenFrames,
}

/// Decodes the zstd stream `source` (all its frames; skippable frames are skipped).
pub struct ZstdDecoder<R: BufRead> {
    source: R,
    frame: FrameDecoder,
    position: Position,
}

impl<R: BufRead> ZstdDecoder<R> {
    pub fn new(source: R) -> Self {
        ZstdDecoder {
            source,
            frame: FrameDecoder::new(),
            position: Position::Start,
        }
    }

    /// Reads the next frame's header; false when the stream ends between frames.
    fn next_frame(&mut self) -> io::Result<bool> {
        if self.position == Position::BetweenFrames && self.source.fill_buf()?.is_empty() {
            return Ok(false);
        }
        match self.frame.reset(&mut self.source) {
            Ok(()) => self.position = Position::InFrame,
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                let skipped = io::copy(
                    &mut (&mut self.source).take(u64::from(length)),
                    &mut io::sink(),
                )?;
                if skipped != u64::from(length) {
                    return Err(invalid(format!(
                        "the stream ends inside a skippable frame of {length} bytes"
                    )));
                }
                self.position = Position::BetweenFrames;
            }
            Err(err) => return Err(invalid(format!("bad zstd frame header: {err}"))),
        }
        Ok(true)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<R: BufRead> Read for ZstdDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.position != Position::InFrame {
                if !self.next_frame()? {
                    return Ok(0);
                }
                continue;
            }
            // Decoding a block may give fewer bytes than it could (the window is kept back):
            // decode until enough can be handed out or the frame is done.
            while self.frame.can_collect() < buf.len() && !self.frame.is_finished() {
                let wanted = buf.len() - self.frame.can_collect();
                self.frame
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(wanted))
                    .map_err(|err| invalid(format!("bad zstd data: {err}")))?;
            }
            let read = self.frame.read(buf)?;
            if read > 0 {
                return Ok(read);
            }
            self.position = Position::BetweenFrames;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `data` stored raw (one raw block, no checksum): the format by hand, so the
    /// tests need no encoder.
    fn raw_frame(data: &[u8]) -> Vec<u8> {
        let mut frame = 0xFD2F_B528u32.to_le_bytes().to_vec();
        // Single segment, 4-byte content size.
        frame.push(0b1010_0000);
        frame.extend((data.len() as u32).to_le_bytes());
        // Last block, raw, its size.
        let header = 1 | ((data.len() as u32) << 3);
        frame.extend(&header.to_le_bytes()[..3]);
        frame.extend(data);
        frame
    }

    fn skippable(payload: &[u8]) -> Vec<u8> {
        let mut frame = 0x184D_2A5Au32.to_le_bytes().to_vec();
        frame.extend((payload.len() as u32).to_le_bytes());
        frame.extend(payload);
        frame
    }

    fn decode(stream: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ZstdDecoder::new(stream).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn one_frame_decodes() {
        assert_eq!(decode(&raw_frame(b"hello")).unwrap(), b"hello");
    }

    #[test]
    fn every_frame_decodes_and_skippable_frames_are_skipped() {
        let mut stream = raw_frame(b"first ");
        stream.extend(skippable(b"metadata the layer does not hold"));
        stream.extend(raw_frame(b"second"));
        stream.extend(skippable(b""));
        assert_eq!(decode(&stream).unwrap(), b"first second");
    }

    #[test]
    fn a_stream_cut_short_or_not_zstd_is_an_error() {
        let frame = raw_frame(b"hello world");
        assert!(decode(&frame[..frame.len() - 3]).is_err());
        let mut truncated_skip = raw_frame(b"x");
        truncated_skip.extend(&skippable(b"12345678")[..10]);
        assert!(decode(&truncated_skip).is_err());
        assert!(decode(b"not zstd at all").is_err());
        assert!(decode(b"").is_err());
    }
}
