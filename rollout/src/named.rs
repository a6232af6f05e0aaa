//! A process-wide table of shared objects by name: what recipes' `registered` rewards and
//! environments are looked up in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub(crate) struct Named<T: ?Sized> {
    table: Mutex<BTreeMap<String, Arc<T>>>,
}

impl<T: ?Sized> Named<T> {
    pub(crate) const fn new() -> Self {
        Named {
            table: Mutex::new(BTreeMap::new()),
        }
    }

    /// Registers (or replaces) `item` under `name`.
    pub(crate) fn register(&self, name: &str, item: Arc<T>) {
        if let Ok(mut t) = self.table.lock() {
            t.insert(name.to_string(), item);
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<T>> {
        self.table.lock().ok()?.get(name).cloned()
    }

    /// Registered names, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        self.table
            .lock()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }
}
