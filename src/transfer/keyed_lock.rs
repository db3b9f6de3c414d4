//! Per-key mutual exclusion, for writes that must not run concurrently for the same key.
//!
//! Distribution rewrites a manifest's link files in place when it is pushed again, so two
//! concurrent PUTs of one manifest (two tags sharing an index, say) can make a third request
//! that reads the link meanwhile fail with MANIFEST_BLOB_UNKNOWN. Pushes of one manifest to one
//! repository therefore take turns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Locks by string key; entries disappear when nobody holds or waits for them.
#[derive(Default)]
pub struct KeyedLocks {
    map: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
}

/// Holds one key's lock; releasing it forgets the key when nobody else wants it.
pub struct KeyedGuard {
    key: String,
    map: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    lock: Arc<AsyncMutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Waits for `key`'s turn.
    pub async fn lock(&self, key: String) -> KeyedGuard {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        KeyedGuard {
            key,
            map: self.map.clone(),
            lock,
            guard: Some(guard),
        }
    }

    /// Keys currently held or waited for.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no key is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyedGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Under the map lock no one can pick up a new handle, so the count is exact: the
        // map's and ours mean nobody else holds or waits.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_key_and_keys_are_forgotten() {
        let locks = Arc::new(KeyedLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside, max) = (locks.clone(), inside.clone(), max.clone());
                tokio::spawn(async move {
                    let _g = locks.lock("a".into()).await;
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max.load(Ordering::SeqCst), 1);
        assert!(locks.is_empty());
        // Different keys do not wait for each other.
        let _a = locks.lock("a".into()).await;
        let _b = tokio::time::timeout(Duration::from_secs(1), locks.lock("b".into()))
            .await
            .expect("b is free");
        assert_eq!(locks.len(), 2);
    }
}
