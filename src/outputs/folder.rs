//! An output that is a folder (the OCI image layout `NAME.oci/`) kept in the cache as one
//! blob: a plain, deterministic tar of its regular files, zstd-compressed; and written back.
//!
//! ```text
//! keep(cache, key, dir):   files in name order ─► tar (mode 0644, dirs 0755, owner 0, mtime 0)
//!                          ─► zstd ─► cache blob under `key`
//! restore(cache, digest, dest):  blob ─► entries checked (relative, no `..`, files and
//!                          folders only) ─► a temp folder beside dest ─► digest checked ─►
//!                          the old folder (if any) removed, the temp folder renamed into place
//! ```
//!
//! The blob is untrusted input on the way back (a shared cache may be poisoned): nothing is
//! written outside the temp folder, and only once the whole blob checked out does the folder
//! replace the output.

use crate::cache::{BlobSink, StepCache};
use crate::fsutil::now;
use anyhow::{Context, Result, bail};
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path};

/// Keeps the folder `dir` as one blob under `key` (when the cache keeps outputs).
pub fn keep(cache: &dyn StepCache, key: &str, dir: &Path) -> Result<()> {
    let Some(sink) = cache.blob_sink()? else {
        return Ok(());
    };
    let mut enc = zstd::Encoder::new(sink, 3)?;
    enc.multithread(2)?;
    {
        let mut tar = tar::Builder::new(&mut enc);
        tar.mode(tar::HeaderMode::Deterministic);
        for entry in walkdir::WalkDir::new(dir)
            .follow_links(false)
            .sort_by_file_name()
            .min_depth(1)
        {
            crate::cancel::check()?;
            let entry = entry?;
            let rel = entry.path().strip_prefix(dir)?;
            let ft = entry.file_type();
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            if ft.is_dir() {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                tar.append_data(&mut header, rel, io::empty())?;
            } else if ft.is_file() {
                let mut f = fs::File::open(entry.path())
                    .with_context(|| format!("cannot read {}", entry.path().display()))?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(f.metadata()?.len());
                tar.append_data(&mut header, rel, &mut f)?;
            } else {
                bail!(
                    "{} is neither a file nor a folder; an image layout holds only those",
                    entry.path().display()
                );
            }
        }
        tar.finish()?;
    }
    let sink: Box<dyn BlobSink> = enc.finish()?;
    let (digest, size) = sink.finish()?;
    cache.put_output(key, &digest, size, now())?;
    Ok(())
}

/// Writes the folder kept as blob `digest` to `dest` (replacing what is there), checked.
pub fn restore(cache: &dyn StepCache, digest: &str, dest: &Path) -> Result<()> {
    let parent = crate::fsutil::parent_or_dot(dest);
    // Locked while written, so a later build's sweep tells it from a leftover.
    let (tmp, _lock) = crate::fsutil::locked_temp_dir_in(parent, crate::fsutil::OUTPUT_TEMP_PREFIX)
        .with_context(|| format!("cannot create a folder in {}", parent.display()))?;
    let mut blob = cache.open_blob(digest)?;
    let unpacked = (|| -> Result<()> {
        let dec = zstd::Decoder::new(&mut blob)?;
        let mut archive = tar::Archive::new(dec);
        for entry in archive.entries()? {
            crate::cancel::check()?;
            let mut entry = entry?;
            let rel = entry.path()?.into_owned();
            if rel.as_os_str().is_empty()
                || !rel.components().all(|c| matches!(c, Component::Normal(_)))
            {
                bail!("refusing entry {} of a cached folder", rel.display());
            }
            let target = tmp.path().join(&rel);
            match entry.header().entry_type() {
                tar::EntryType::Directory => fs::create_dir_all(&target)?,
                tar::EntryType::Regular => {
                    if let Some(p) = target.parent() {
                        fs::create_dir_all(p)?;
                    }
                    let mut out = fs::File::create(&target)?;
                    io::copy(&mut entry, &mut out)?;
                }
                other => bail!("refusing entry type {other:?} in a cached folder"),
            }
        }
        // The rest of the stream (end blocks), for the digest check.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink())?;
        Ok(())
    })();
    let mut rest = Vec::new();
    let _ = blob.read_to_end(&mut rest);
    let checked = blob.finish();
    unpacked?;
    checked.with_context(|| format!("the cached copy of {} is damaged", dest.display()))?;
    crate::fsutil::set_mode(tmp.path(), 0o755)?;
    if fs::symlink_metadata(dest).is_ok() {
        if dest.is_dir() && !dest.is_symlink() {
            fs::remove_dir_all(dest)
                .with_context(|| format!("cannot replace {}", dest.display()))?;
        } else {
            fs::remove_file(dest).with_context(|| format!("cannot replace {}", dest.display()))?;
        }
    }
    let kept = tmp.keep();
    fs::rename(&kept, dest).with_context(|| format!("cannot write {}", dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Local, StepCache};
    use crate::store::Store;

    #[test]
    fn a_folder_round_trips_through_the_cache_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Local::new(Store::open(&dir.path().join("cache")).unwrap());
        let src = dir.path().join("img.oci");
        fs::create_dir_all(src.join("blobs/sha256")).unwrap();
        fs::write(src.join("index.json"), "{}").unwrap();
        fs::write(src.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}").unwrap();
        fs::write(src.join("blobs/sha256/abc"), vec![7u8; 100_000]).unwrap();
        keep(&cache, "k", &src).unwrap();
        let rec = cache.get_output("k").unwrap().unwrap();
        let dest = dir.path().join("back.oci");
        fs::create_dir_all(dest.join("stale")).unwrap();
        restore(&cache, &rec.blob_digest, &dest).unwrap();
        assert!(!dest.join("stale").exists());
        assert_eq!(fs::read(dest.join("index.json")).unwrap(), b"{}");
        assert_eq!(
            fs::read(dest.join("blobs/sha256/abc")).unwrap().len(),
            100_000
        );
        // Kept twice, the same blob (deterministic).
        keep(&cache, "k2", &src).unwrap();
        assert_eq!(
            cache.get_output("k2").unwrap().unwrap().blob_digest,
            rec.blob_digest
        );
    }
}
