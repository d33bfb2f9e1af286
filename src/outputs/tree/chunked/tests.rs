use super::*;
use crate::cache::{Local, StepCache};
use crate::store::Store;
use std::io::Read;

/// A tar of `n` files of 64 KiB (compressible, each different), file `edit` changed when given.
fn tar_bytes(n: usize, edit: Option<usize>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..n {
        let mut data = Vec::with_capacity(64 << 10);
        let mut x = i as u64 * 0x9e37_79b9 + 1;
        while data.len() < 64 << 10 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(
                format!("line {} of file {i}: {}\n", data.len(), x % 1000).as_bytes(),
            );
        }
        data.truncate(64 << 10);
        if edit == Some(i) {
            data[100..110].copy_from_slice(b"EDITED....");
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let name = if i % 7 == 0 {
            // Some long names (GNU L records before the header).
            format!("d{:02}/{}/f{i:05}", i / 50, "x".repeat(120))
        } else {
            format!("d{:02}/f{i:05}", i / 50)
        };
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

struct Out {
    blob: Vec<u8>,
    index: ChunkIndex,
    stats: Stats,
}

/// Writes `tar` in pieces of `piece` bytes through a chunked blob into `cache`.
fn write(cache: &Local, tar: &[u8], previous: Option<Previous>, piece: usize) -> Out {
    let sink = cache.blob_sink().unwrap().unwrap();
    let mut cb = ChunkedBlob::new(sink, previous, 3, 2);
    for p in tar.chunks(piece.max(1)) {
        cb.write_all(p).unwrap();
    }
    let (sink, chunks, stats) = cb.finish().unwrap();
    let (digest, size) = sink.finish().unwrap();
    let blob = fs::read(cache.store().blob_path(&digest)).unwrap();
    assert_eq!(blob.len() as u64, size);
    let index = ChunkIndex {
        zstd: zstd_version(),
        level: 3,
        blob: digest,
        blob_size: size,
        chunks,
    };
    Out { blob, index, stats }
}

fn previous(cache: &Local, out: &Out) -> Previous {
    let f = File::open(cache.store().blob_path(&out.index.blob)).unwrap();
    Previous::new(f, &out.index)
}

fn unzstd(blob: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    zstd::Decoder::new(blob)
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

use std::fs;

fn new_cache() -> (tempfile::TempDir, Local) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Local::new(Store::open(&dir.path().join("cache")).unwrap());
    (dir, cache)
}

#[test]
fn an_empty_stream_is_one_empty_frame() {
    let (_d, cache) = new_cache();
    let out = write(&cache, &[], None, 1);
    assert_eq!(out.index.chunks.len(), 1);
    assert_eq!(out.index.chunks[0].raw, 0);
    assert!(unzstd(&out.blob).is_empty());
}

#[test]
fn one_entry_is_one_chunk_and_decodes_to_the_tar() {
    let (_d, cache) = new_cache();
    let tar = tar_bytes(1, None);
    let out = write(&cache, &tar, None, 4096);
    assert_eq!(out.stats.chunks, 1);
    assert_eq!(out.stats.reused, 0);
    assert_eq!(unzstd(&out.blob), tar);
}

#[test]
fn cuts_fall_at_entry_starts_within_bounds_whatever_the_write_sizes() {
    let tar = tar_bytes(300, None);
    let cut = |piece: usize| {
        let mut c = Chunker::default();
        let mut out = Vec::new();
        for p in tar.chunks(piece) {
            c.push(p, &mut out);
        }
        out.extend(c.finish());
        out
    };
    let chunks = cut(1 << 20);
    assert!(chunks.len() > 3, "{} chunks", chunks.len());
    assert_eq!(chunks.concat(), tar);
    for c in &chunks[..chunks.len() - 1] {
        assert!(c.len() >= MIN_CHUNK && c.len() <= MAX_CHUNK, "{}", c.len());
        // Every chunk but the first starts with a header (or a long-name record) block.
    }
    for c in &chunks[1..] {
        let h = tar::Header::from_byte_slice(&c[..512]);
        assert!(h.as_gnu().is_some(), "a chunk does not start at an entry");
        assert!(
            matches!(c[156], b'0' | b'L'),
            "type {} len {} name {:?}",
            c[156],
            c.len(),
            String::from_utf8_lossy(&c[..100])
        );
    }
    // The cut points depend on the bytes only, not on how they arrive.
    assert_eq!(cut(511), chunks);
    assert_eq!(cut(1), chunks);
}

#[test]
fn an_edit_in_the_middle_reuses_every_other_chunk_and_gives_the_same_blob_as_from_scratch() {
    let (_d, cache) = new_cache();
    let before = tar_bytes(300, None);
    let first = write(&cache, &before, None, 1 << 20);
    assert_eq!(unzstd(&first.blob), before);
    let n = first.index.chunks.len() as u64;

    let after = tar_bytes(300, Some(150));
    let incremental = write(&cache, &after, Some(previous(&cache, &first)), 1 << 20);
    assert_eq!(incremental.stats.chunks, n);
    assert_eq!(incremental.stats.reused, n - 1, "{:?}", incremental.stats);
    assert!(incremental.stats.compressed_bytes <= MAX_CHUNK as u64);
    assert_eq!(unzstd(&incremental.blob), after);

    let (_d2, other) = new_cache();
    let scratch = write(&other, &after, None, 333);
    assert_eq!(scratch.blob, incremental.blob);
    assert_eq!(scratch.index, incremental.index);

    // The same tar again: everything is reused.
    let again = write(
        &cache,
        &after,
        Some(previous(&cache, &incremental)),
        1 << 20,
    );
    assert_eq!(again.stats.reused, n);
    assert_eq!(again.stats.compressed_bytes, 0);
    assert_eq!(again.blob, scratch.blob);
}

#[test]
fn a_damaged_previous_blob_is_not_used() {
    let (dir, cache) = new_cache();
    let tar = tar_bytes(200, None);
    let first = write(&cache, &tar, None, 1 << 20);
    // A copy of the blob with one byte flipped, in place of the real one.
    let mut bad = first.blob.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    let bad_path = dir.path().join("bad");
    fs::write(&bad_path, &bad).unwrap();
    let prev = Previous::new(File::open(&bad_path).unwrap(), &first.index);
    let out = write(&cache, &tar, Some(prev), 1 << 20);
    assert_eq!(out.stats.reused, 0);
    assert_eq!(out.blob, first.blob);
    // A truncated one too.
    fs::write(&bad_path, &first.blob[..first.blob.len() - 1]).unwrap();
    let prev = Previous::new(File::open(&bad_path).unwrap(), &first.index);
    let out = write(&cache, &tar, Some(prev), 1 << 20);
    assert_eq!(out.stats.reused, 0);
    assert_eq!(out.blob, first.blob);
}

#[test]
fn an_index_that_points_at_the_wrong_frames_costs_reuse_never_correctness() {
    let (_d, cache) = new_cache();
    let tar = tar_bytes(200, None);
    let first = write(&cache, &tar, None, 1 << 20);
    // Swap the frames of two chunks of different sizes; the blob itself is sound.
    let mut index = first.index.clone();
    let last = index.chunks.len() - 1;
    let (a, b) = (index.chunks[0], index.chunks[last]);
    index.chunks[0] = Chunk {
        hash: a.hash,
        raw: a.raw,
        offset: b.offset,
        len: b.len,
    };
    index.chunks[last] = Chunk {
        hash: b.hash,
        raw: b.raw,
        offset: a.offset,
        len: a.len,
    };
    // And one outside the blob.
    index.chunks[1].offset = first.index.blob_size + 10;
    let prev = Previous::new(
        File::open(cache.store().blob_path(&first.index.blob)).unwrap(),
        &index,
    );
    let out = write(&cache, &tar, Some(prev), 1 << 20);
    assert_eq!(out.blob, first.blob);
    assert_eq!(out.stats.reused, first.index.chunks.len() as u64 - 3);
}

#[test]
fn the_index_round_trips_and_refuses_damage() {
    let idx = ChunkIndex {
        zstd: zstd_version(),
        level: 3,
        blob: "ab".repeat(32),
        blob_size: 1234,
        chunks: vec![Chunk {
            hash: [7; 32],
            raw: 10,
            offset: 0,
            len: 20,
        }],
    };
    let bytes = idx.to_bytes();
    assert_eq!(ChunkIndex::from_bytes(&bytes).unwrap(), idx);
    for i in [0, INDEX_MAGIC.len() + 3, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[i] ^= 1;
        assert!(ChunkIndex::from_bytes(&bad).is_err(), "byte {i}");
    }
    assert!(ChunkIndex::from_bytes(&bytes[..bytes.len() - 5]).is_err());
    assert!(ChunkIndex::from_bytes(b"").is_err());
}
