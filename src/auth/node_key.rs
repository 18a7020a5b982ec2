//! Edge-node keys: `Authorization: Bearer <raw key>` checked against a file of SHA-256 digests,
//! re-read when it changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Rejection;

/// Longest raw node key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// The digests of the node keys in one file.
pub struct NodeKeys {
    path: PathBuf,
    digests: ArcSwap<Vec<[u8; 32]>>,
    modified: Mutex<Option<SystemTime>>,
}

impl NodeKeys {
    /// Loads `path`: one SHA-256 digest in hex per line; blank lines and `#` comments allowed.
    pub fn load(path: &Path) -> Result<NodeKeys, String> {
        let (digests, modified) = read(path)?;
        Ok(NodeKeys {
            path: path.to_owned(),
            digests: ArcSwap::from_pointee(digests),
            modified: Mutex::new(modified),
        })
    }

    /// The file the digests come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of known digests.
    pub fn len(&self) -> usize {
        self.digests.load().len()
    }

    /// True when the file lists no digest.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a raw key. Every digest is compared in constant time, without early exit.
    pub fn check(&self, key: &str) -> Result<(), Rejection> {
        well_formed(key)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let known = self.digests.load();
        let mut found = subtle::Choice::from(0);
        for d in known.iter() {
            found |= d.ct_eq(&digest);
        }
        if bool::from(found) {
            Ok(())
        } else {
            Err(Rejection::UnknownKey)
        }
    }

    /// Re-reads the file when its modification time changed. A bad new file keeps the old set.
    pub fn reload_if_changed(&self) {
        let now = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let Ok(mut modified) = self.modified.lock() else {
            return;
        };
        if now == *modified {
            return;
        }
        match read(&self.path) {
            Ok((digests, m)) => {
                tracing::info!(file = %self.path.display(), keys = digests.len(), "node keys reloaded");
                self.digests.store(Arc::new(digests));
                *modified = m;
            }
            Err(e) => {
                tracing::error!(error = %e, "node keys not reloaded, keeping the previous set");
                *modified = now;
            }
        }
    }
}

/// A key is well-formed when it is 1..=512 visible ASCII characters.
pub fn well_formed(key: &str) -> Result<(), Rejection> {
    if key.len() > MAX_KEY_BYTES {
        return Err(Rejection::TooLong);
    }
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Rejection::Malformed);
    }
    Ok(())
}

type Loaded = (Vec<[u8; 32]>, Option<SystemTime>);

fn read(path: &Path) -> Result<Loaded, String> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read node key digests: {e}", path.display()))?;
    let mut digests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut d = [0u8; 32];
        hex::decode_to_slice(line, &mut d).map_err(|_| {
            format!(
                "{}:{}: expected a SHA-256 digest as 64 hex digits",
                path.display(),
                i + 1
            )
        })?;
        digests.push(d);
    }
    Ok((digests, modified))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn checks_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let digest = hex::encode(Sha256::digest(b"node-key-1"));
        std::fs::write(&path, format!("# edge nodes\n{digest}  # node 1\n\n")).unwrap();
        let keys = NodeKeys::load(&path).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.check("node-key-1"), Ok(()));
        assert_eq!(keys.check("node-key-2"), Err(Rejection::UnknownKey));
        assert_eq!(keys.check(""), Err(Rejection::Malformed));

        let digest2 = hex::encode(Sha256::digest(b"node-key-2"));
        std::fs::write(&path, format!("{digest2}\n")).unwrap();
        // Make the change visible even on coarse mtime clocks.
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        keys.reload_if_changed();
        assert_eq!(keys.check("node-key-2"), Ok(()));
        assert_eq!(keys.check("node-key-1"), Err(Rejection::UnknownKey));

        std::fs::write(&path, "not hex\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + Duration::from_secs(5))
            .unwrap();
        keys.reload_if_changed();
        assert_eq!(
            keys.check("node-key-2"),
            Ok(()),
            "a bad file keeps the old set"
        );
    }

    #[test]
    fn bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# x\nabc\n").unwrap();
        let e = NodeKeys::load(&path).err().unwrap();
        assert!(
            e.ends_with("keys:2: expected a SHA-256 digest as 64 hex digits"),
            "{e}"
        );
    }
}
