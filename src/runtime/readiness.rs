//! Readiness of the service's components, as reported on `/readyz`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;

/// A component's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentState {
    /// Serving.
    Ready,
    /// Not serving, and why.
    NotReady(String),
    /// Serving, with something an operator must fix (shown on `/readyz`, which stays 200).
    Degraded(String),
}

/// One component that is not ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotReady {
    /// Component name.
    pub component: String,
    /// Why it is not ready.
    pub reason: String,
}

/// Registered components and their states. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<RwLock<BTreeMap<&'static str, ComponentState>>>);

impl Readiness {
    /// Sets a component's state (registering it on first use).
    pub fn set(&self, component: &'static str, state: ComponentState) {
        // A poisoned lock only means a writer panicked mid-insert of a plain value; the map is intact.
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        map.insert(component, state);
    }

    /// Registers a component as not ready until it says otherwise.
    pub fn register(&self, component: &'static str) {
        self.set(component, ComponentState::NotReady("starting".into()));
    }

    /// Every component that is not ready.
    pub fn not_ready(&self) -> Vec<NotReady> {
        self.listed(|s| match s {
            ComponentState::NotReady(r) => Some(r),
            _ => None,
        })
    }

    /// Every component that serves but is degraded.
    pub fn degraded(&self) -> Vec<NotReady> {
        self.listed(|s| match s {
            ComponentState::Degraded(r) => Some(r),
            _ => None,
        })
    }

    fn listed(&self, pick: impl Fn(&ComponentState) -> Option<&String>) -> Vec<NotReady> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter_map(|(name, state)| {
                pick(state).map(|reason| NotReady {
                    component: (*name).to_owned(),
                    reason: reason.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_component_is_not_ready_until_it_says_so() {
        let r = Readiness::default();
        r.register("chain");
        assert_eq!(r.not_ready().len(), 1);
        r.set("chain", ComponentState::Ready);
        assert!(r.not_ready().is_empty());
        r.set("chain", ComponentState::NotReady("stale".into()));
        assert_eq!(r.not_ready()[0].reason, "stale");
        r.set(
            "chain",
            ComponentState::Degraded("endpoint 1 on chain 1".into()),
        );
        assert!(r.not_ready().is_empty());
        assert_eq!(r.degraded()[0].reason, "endpoint 1 on chain 1");
    }
}
