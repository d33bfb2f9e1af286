//! Reading a tar stream entry by entry, with PAX records parsed by their length prefix (so binary
//! xattr values containing newlines survive), GNU long names, and GNU sparse maps.
//!
//! The tar crate's reader splits PAX records at `\n`, which breaks on a `security.capability`
//! value containing byte 0x0a, so the unpacker reads the format itself; `tar::Header` is used
//! for field decoding only.

use std::io::{self, BufRead, Read};

use tar::{EntryType, GnuExtSparseHeader, Header};

/// One member of the archive, its extension records already folded in.
pub struct RawEntry {
    pub header: Header,
    pub kind: EntryType,
    pub path: Vec<u8>,
    pub link: Option<Vec<u8>>,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// GNU sparse: data segments (offset, length) in archive order, and the real file size.
    pub sparse: Option<(Vec<(u64, u64)>, u64)>,
}

/// A sequential tar reader.
pub struct TarReader<R> {
    inner: R,
    /// Data bytes of the current entry not yet read, then its padding.
    remaining: u64,
    pad: u64,
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn checksum_ok(block: &[u8; 512]) -> bool {
    let stored = {
        let field = &block[148..156];
        let s: Vec<u8> = field
            .iter()
            .copied()
            .skip_while(|&c| c == b' ')
            .take_while(|&c| (b'0'..=b'7').contains(&c))
            .collect();
        match std::str::from_utf8(&s)
            .ok()
            .and_then(|s| u32::from_str_radix(s, 8).ok())
        {
            Some(v) => v,
            None => return false,
        }
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u32
            }
        })
        .sum();
    sum == stored
}

/// Parses PAX records (`<len> <key>=<value>\n`) by their lengths.
pub fn parse_pax(mut data: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&c| c == 0) {
            break;
        }
        let sp = data
            .iter()
            .position(|&c| c == b' ')
            .ok_or_else(|| corrupt("PAX record without a length"))?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("PAX record length is not a number"))?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(corrupt("PAX record length is out of range"));
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&c| c == b'=')
            .ok_or_else(|| corrupt("PAX record without `=`"))?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn parse_dec(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Upper bound for extension records held in memory (long names, PAX headers).
const MAX_META: u64 = 16 << 20;

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            remaining: 0,
            pad: 0,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = (n as usize).min(buf.len());
            self.inner.read_exact(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Skips what is left of the current entry's data and padding.
    fn finish_entry(&mut self) -> io::Result<()> {
        let n = self.remaining + self.pad;
        self.remaining = 0;
        self.pad = 0;
        self.skip(n)
    }

    fn read_block(&mut self, b: &mut [u8; 512]) -> io::Result<bool> {
        let mut got = 0;
        while got < 512 {
            match self.inner.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(corrupt("truncated tar header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn read_meta(&mut self, size: u64) -> io::Result<Vec<u8>> {
        if size > MAX_META {
            return Err(corrupt("extension record too large"));
        }
        let mut v = vec![0u8; size as usize];
        self.inner.read_exact(&mut v)?;
        self.skip((512 - size % 512) % 512)?;
        Ok(v)
    }

    /// The next member, or None at the end-of-archive block (or end of stream).
    pub fn next_entry(&mut self) -> io::Result<Option<RawEntry>> {
        self.finish_entry()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut block = [0u8; 512];
        loop {
            if !self.read_block(&mut block)? {
                return Ok(None);
            }
            if block.iter().all(|&c| c == 0) {
                return Ok(None);
            }
            if !checksum_ok(&block) {
                return Err(corrupt("tar header checksum mismatch"));
            }
            let header = Header::from_byte_slice(&block).clone();
            let kind = header.entry_type();
            let size = header.entry_size()?;
            match kind {
                EntryType::XHeader => {
                    let data = self.read_meta(size)?;
                    pax.extend(parse_pax(&data)?);
                    continue;
                }
                EntryType::XGlobalHeader => {
                    self.read_meta(size)?;
                    continue;
                }
                EntryType::GNULongName => {
                    long_name = Some(trim_nul(self.read_meta(size)?));
                    continue;
                }
                EntryType::GNULongLink => {
                    long_link = Some(trim_nul(self.read_meta(size)?));
                    continue;
                }
                _ => {}
            }
            let mut path = long_name
                .take()
                .unwrap_or_else(|| header.path_bytes().into_owned());
            let mut link = long_link
                .take()
                .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
            let mut data_size = size;
            let mut uid = header.uid()?;
            let mut gid = header.gid()?;
            let mut mtime = header.mtime()? as i64;
            let mut xattrs = Vec::new();
            for (k, v) in pax.drain(..) {
                match k.as_slice() {
                    b"path" => path = v,
                    b"linkpath" => link = Some(v),
                    b"size" => data_size = parse_dec(&v).ok_or_else(|| corrupt("bad PAX size"))?,
                    b"uid" => uid = parse_dec(&v).ok_or_else(|| corrupt("bad PAX uid"))?,
                    b"gid" => gid = parse_dec(&v).ok_or_else(|| corrupt("bad PAX gid"))?,
                    b"mtime" => {
                        let int = v.split(|&c| c == b'.').next().unwrap_or_default();
                        mtime = std::str::from_utf8(int)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| corrupt("bad PAX mtime"))?;
                    }
                    _ => {
                        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                            xattrs.push((name.to_vec(), v));
                        }
                    }
                }
            }
            let sparse = if kind == EntryType::GNUSparse {
                Some(self.sparse_map(&header, data_size)?)
            } else {
                None
            };
            // Only regular files carry data that we read; other types' sizes are skipped.
            self.remaining = data_size;
            self.pad = (512 - data_size % 512) % 512;
            return Ok(Some(RawEntry {
                header,
                kind,
                path,
                link,
                uid,
                gid,
                mtime,
                xattrs,
                sparse,
            }));
        }
    }

    fn sparse_map(
        &mut self,
        header: &Header,
        data_size: u64,
    ) -> io::Result<(Vec<(u64, u64)>, u64)> {
        let gnu = header
            .as_gnu()
            .ok_or_else(|| corrupt("sparse entry without a GNU header"))?;
        let mut segs = Vec::new();
        let mut push = |s: &tar::GnuSparseHeader| -> io::Result<()> {
            if !s.is_empty() {
                segs.push((s.offset()?, s.length()?));
            }
            Ok(())
        };
        for s in &gnu.sparse {
            push(s)?;
        }
        let mut extended = gnu.is_extended();
        while extended {
            let mut ext = GnuExtSparseHeader::new();
            let mut b = [0u8; 512];
            if !self.read_block(&mut b)? {
                return Err(corrupt("truncated sparse header"));
            }
            ext.as_mut_bytes().copy_from_slice(&b);
            for s in &ext.sparse {
                push(s)?;
            }
            extended = ext.is_extended();
        }
        let real = gnu.real_size()?;
        let mut end = 0u64;
        let mut total = 0u64;
        for &(off, len) in &segs {
            let e = off
                .checked_add(len)
                .ok_or_else(|| corrupt("sparse map overflows"))?;
            if off < end || e > real {
                return Err(corrupt("sparse map out of order or past the file size"));
            }
            end = e;
            total += len;
        }
        if total != data_size {
            return Err(corrupt("sparse map does not match the entry size"));
        }
        Ok((segs, real))
    }

    /// Reads data of the current entry.
    pub fn read_data(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = (self.remaining as usize).min(out.len());
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            return Err(corrupt("truncated entry data"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

impl<R: BufRead> TarReader<R> {
    /// The next bytes of the current entry's data, borrowed from the reader's buffer (no copy);
    /// empty once the data is all read. Pass how many were used to [`Self::consume_data`].
    pub fn data_buf(&mut self) -> io::Result<&[u8]> {
        if self.remaining == 0 {
            return Ok(&[]);
        }
        let remaining = self.remaining;
        let buf = self.inner.fill_buf()?;
        if buf.is_empty() {
            return Err(corrupt("truncated entry data"));
        }
        let n = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        Ok(&buf[..n])
    }

    /// Marks `n` bytes of what [`Self::data_buf`] returned as used.
    pub fn consume_data(&mut self, n: usize) {
        debug_assert!(n as u64 <= self.remaining);
        self.inner.consume(n);
        self.remaining -= n as u64;
    }
}
