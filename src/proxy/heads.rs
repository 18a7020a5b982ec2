//! The gateway's side of judging HTTP/1 heads on arrival (see [`crate::connection`]): the
//! limits in force, and refused heads counted like every other answer.

use std::borrow::Cow;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::UNMATCHED;
use crate::metrics::Metrics;
use crate::path;
use crate::routes::Match;
use crate::state::State;

/// Judges HTTP/1 heads for [`crate::connection::Connections`] by the configuration in force,
/// and counts the refused ones like every other answer.
pub struct HeadJudge {
    state: Arc<ArcSwap<State>>,
    metrics: Arc<Metrics>,
}

impl HeadJudge {
    /// A judge reading `state` and counting into `metrics`.
    pub fn new(state: Arc<ArcSwap<State>>, metrics: Arc<Metrics>) -> Self {
        HeadJudge { state, metrics }
    }
}

impl crate::connection::Heads for HeadJudge {
    fn rules(&self, peer: Option<std::net::IpAddr>) -> crate::connection::HeadRules {
        let state = self.state.load();
        let (max_pending, per_client) = state.max_pending_heads;
        // Behind a load balancer every connection has its address: bound it in all only.
        let trusted = peer.is_some_and(|ip| state.trusted_proxies.trusts(ip));
        crate::connection::HeadRules {
            limits: crate::head::Limits {
                max_bytes: state.max_header_bytes,
                max_headers: state.max_headers,
            },
            timeout: state.client_header_timeout,
            max_pending,
            max_pending_per_client: if trusted { usize::MAX } else { per_client },
        }
    }

    fn refused(&self, refusal: crate::head::Refusal, line: Option<(&str, &str)>) {
        let state = self.state.load();
        let method = line
            .and_then(|(m, _)| http::Method::from_bytes(m.as_bytes()).ok())
            .unwrap_or(http::Method::GET);
        // Counted under the route the path matches, as every other answer is.
        let path = line.and_then(|(_, target)| {
            let path = target.split('?').next().unwrap_or_default();
            path::normalise(path).ok().map(Cow::into_owned)
        });
        let route = path
            .as_deref()
            .and_then(|p| match state.routes.find(&method, p) {
                Match::Found(r) | Match::MethodNotAllowed(r, _) => Some(r.clone()),
                Match::NotFound => None,
            });
        let label = route.as_ref().map_or(UNMATCHED, |r| r.name.as_str());
        self.metrics.answered(
            route.as_ref().map(|r| &r.metrics),
            label,
            &method,
            refusal.status(),
            Some(0.0),
        );
        self.metrics
            .heads_refused
            .with_label_values(&[refusal.label()])
            .inc();
        tracing::debug!(
            reason = refusal.label(),
            route = label,
            "request head refused"
        );
    }
}
