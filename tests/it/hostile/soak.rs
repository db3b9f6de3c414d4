//! Soak: many syncs with rotating credentials keep memory flat (see `soak`).
