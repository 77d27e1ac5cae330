//! A store in memory: the stand-in for S3, GCS or a directory in unit tests of leases and sharing. Versions are
//! a counter, so a rewrite with the same bytes is a new version (as an S3 ETag with a new upload time is not,
//! but as a GCS generation is): compare-and-swap is exact either way.

use super::{Listed, ObjectStore, Result, Version};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Memory {
    objects: Mutex<BTreeMap<String, (Vec<u8>, u64)>>,
    next: Mutex<u64>,
}

impl Memory {
    fn version(n: u64) -> Version {
        Version::tag(n.to_string())
    }

    /// Write an object whatever is there (someone with write access to the bucket, or a dead runner's leftover).
    pub fn plant(&self, name: &str, bytes: &[u8]) {
        let n = self.bump();
        self.objects.lock().expect("memory store").insert(name.to_string(), (bytes.to_vec(), n));
    }

    fn bump(&self) -> u64 {
        let mut n = self.next.lock().expect("memory store");
        *n += 1;
        *n
    }
}

impl ObjectStore for Memory {
    fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let objects = self.objects.lock().expect("memory store");
        Ok(objects.get(name).map(|(b, n)| (b.clone(), Memory::version(*n))))
    }

    fn put_if(&self, name: &str, bytes: Vec<u8>, expected: Option<&Version>) -> Result<Option<Version>> {
        let n = self.bump();
        let mut objects = self.objects.lock().expect("memory store");
        let now = objects.get(name).map(|(_, v)| Memory::version(*v));
        if now.as_ref() != expected {
            return Ok(None);
        }
        objects.insert(name.to_string(), (bytes, n));
        Ok(Some(Memory::version(n)))
    }

    fn list(&self, under: &str) -> Result<Vec<Listed>> {
        let objects = self.objects.lock().expect("memory store");
        let under = under.trim_end_matches('/');
        Ok(objects
            .iter()
            .filter(|(k, _)| under.is_empty() || k.starts_with(&format!("{under}/")))
            .map(|(k, (b, _))| Listed { name: k.clone(), modified_ms: 0, size: b.len() as u64 })
            .collect())
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.objects.lock().expect("memory store").remove(name);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What every backend must do: a miss is `None`, create-only refuses an existing name, compare-and-swap
    /// refuses a stale version, list names what is below a prefix.
    pub(crate) fn behaves_as_a_store(s: &dyn ObjectStore) {
        assert!(s.get("ledger/prod/apply").unwrap().is_none());
        let v1 = s.put_if("ledger/prod/apply", b"one".to_vec(), None).unwrap().expect("created");
        assert!(s.put_if("ledger/prod/apply", b"two".to_vec(), None).unwrap().is_none(), "create-only");
        let (bytes, now) = s.get("ledger/prod/apply").unwrap().unwrap();
        assert_eq!((bytes.as_slice(), &now), (&b"one"[..], &v1));
        let v2 = s.put_if("ledger/prod/apply", b"two".to_vec(), Some(&v1)).unwrap().expect("swapped");
        assert!(s.put_if("ledger/prod/apply", b"three".to_vec(), Some(&v1)).unwrap().is_none(), "stale version");
        assert_eq!(s.get("ledger/prod/apply").unwrap().unwrap(), (b"two".to_vec(), v2));
        s.put_if("blobs/ab", b"x".to_vec(), None).unwrap().unwrap();
        s.put_if("ledger/prod-eu/apply", b"x".to_vec(), None).unwrap().unwrap();
        let mut names: Vec<String> = s.list("ledger").unwrap().into_iter().map(|l| l.name).collect();
        names.sort();
        assert_eq!(names, ["ledger/prod-eu/apply", "ledger/prod/apply"]);
        // Below a name as a directory: not whatever starts with the same text.
        let names: Vec<String> = s.list("ledger/prod").unwrap().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["ledger/prod/apply"]);
        assert!(s.exists("blobs/ab").unwrap());
        s.delete("blobs/ab").unwrap();
        s.delete("blobs/ab").unwrap();
        assert!(!s.exists("blobs/ab").unwrap());
    }

    #[test]
    fn memory_behaves_as_a_store() {
        behaves_as_a_store(&Memory::default());
    }
}
