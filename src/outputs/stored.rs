//! A zstd frame that stores its bytes without compressing them, for outputs that are
//! compressed already (a compressed qcow2): the cache keeps every output blob as zstd, and
//! running the compressor over 300 MB of deflate data costs a second and gains nothing.
//!
//! ```text
//! bytes ──► 128 KiB pieces ──► frame: magic, header (no content size, no checksum,
//!                              128 KiB window) ─► raw blocks (3-byte header + the bytes)
//!                              ─► an empty last raw block
//! ```
//! Any zstd decoder reads it (RFC 8878 section 3.1.1: Raw_Block); the cache hashes the blob's
//! bytes as it does for any other.

use std::io::{self, Write};

/// The largest block a frame with a 128 KiB window may hold (RFC 8878: Block_Maximum_Size).
const BLOCK: usize = 128 << 10;
/// Magic number, then a Frame_Header_Descriptor of 0 (a window descriptor follows, no
/// dictionary, no checksum, no content size), then the window: exponent 7, mantissa 0 =
/// 2^(10+7) bytes.
const HEADER: [u8; 6] = [0x28, 0xB5, 0x2F, 0xFD, 0x00, 7 << 3];

/// Writes one zstd frame of raw blocks into `out`; call [`StoredFrame::finish`] at the end.
pub struct StoredFrame<W: Write> {
    out: W,
    buf: Vec<u8>,
    started: bool,
}

impl<W: Write> StoredFrame<W> {
    pub fn new(out: W) -> Self {
        StoredFrame {
            out,
            buf: Vec::with_capacity(BLOCK),
            started: false,
        }
    }

    fn start(&mut self) -> io::Result<()> {
        if !self.started {
            self.out.write_all(&HEADER)?;
            self.started = true;
        }
        Ok(())
    }

    fn block(&mut self, last: bool) -> io::Result<()> {
        self.start()?;
        let header = ((self.buf.len() as u32) << 3) | u32::from(last);
        self.out.write_all(&header.to_le_bytes()[..3])?;
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered as the last block and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.block(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for StoredFrame<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() == BLOCK {
            self.block(false)?;
        }
        let n = data.len().min(BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn stored(data: &[u8]) -> Vec<u8> {
        let mut w = StoredFrame::new(Vec::new());
        // Written in uneven pieces, as a reader hands them over.
        for piece in data.chunks(70_001) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn zstd_reads_back_every_size_exactly() {
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 1_000_003] {
            let data = crate::testutil::noise(len, len as u64);
            let frame = stored(&data);
            // Header, one 3-byte header per block (an empty last block), no more.
            let blocks = len.div_ceil(BLOCK) + usize::from(len % BLOCK == 0 || len == 0);
            assert!(
                frame.len() <= HEADER.len() + len + 3 * (blocks + 1),
                "{len}"
            );
            let mut back = Vec::new();
            zstd::Decoder::new(&frame[..])
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{len}");
            assert_eq!(zstd::decode_all(&frame[..]).unwrap(), data, "{len}");
        }
    }

    #[test]
    fn a_stored_frame_followed_by_a_compressed_one_is_one_stream() {
        let mut both = stored(b"first ");
        both.extend(zstd::encode_all(&b"second"[..], 3).unwrap());
        assert_eq!(zstd::decode_all(&both[..]).unwrap(), b"first second");
    }

    #[test]
    fn a_stored_output_round_trips_through_the_cache_and_verifies() {
        use crate::cache::{Local, StepCache};
        use crate::outputs::tree::{Packing, keep_as, restore};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("cache")).unwrap();
        let cache = Local::new(store);
        let data: Vec<u8> = (0..400_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let digest = keep_as(&cache, "k", &mut &data[..], None, Packing::Stored).unwrap();
        assert_eq!(digest, blake3::hash(&data).to_hex().to_string());
        let rec = cache.get_output("k").unwrap().unwrap();
        // Stored, not compressed: the blob is the bytes plus a few headers.
        assert!(rec.size > data.len() as u64 && rec.size < data.len() as u64 + 64);
        let back = dir.path().join("back");
        assert_eq!(restore(&cache, &rec.blob_digest, &back).unwrap(), digest);
        assert_eq!(std::fs::read(&back).unwrap(), data);
        drop(cache);
        let verify = crate::store::Store::open(&dir.path().join("cache"))
            .unwrap()
            .verify()
            .unwrap();
        assert!(
            verify.corrupt.is_empty() && verify.outputs_dropped.is_empty(),
            "{verify:?}"
        );
        assert_eq!(verify.blobs_checked, 1);
    }
}
