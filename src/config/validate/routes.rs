//! `[[routes]]`: paths, methods, credentials, rate-limit policies and the login guard's rules.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use super::Validator;
use crate::auth::network::Gate;
use crate::auth::node_key::NodeKeys;
use crate::auth::Mode;
use crate::config::file::{FileRateLimit, FileRoute};
use crate::config::{ConfigError, Lockout, Upstream, LOGIN_BODY_CAP};
use crate::limits::lockout::Guard;
use crate::limits::ratelimit::{KeyKind, Policy};
use crate::metrics::Handles;
use crate::routes::Route;
use crate::store::{Limit, LockPolicy};

/// What every route is checked against: the upstreams, and what login routes' lockouts are
/// made of.
pub(in crate::config) struct RouteContext<'a> {
    /// The validated upstreams.
    pub upstreams: &'a [Upstream],
    /// The validated lockout settings.
    pub lockout: &'a Lockout,
    /// `[server] client_body_timeout_ms`.
    pub body_timeout: Duration,
}

impl Validator<'_> {
    /// `[[routes]]`, each checked against the upstreams and the policies of the routes before.
    pub(super) fn routes(
        &self,
        files: &[FileRoute],
        context: &RouteContext<'_>,
    ) -> Result<Vec<Route>, ConfigError> {
        if files.is_empty() {
            return Err(self.err("routes", "at least one [[routes]] entry is required"));
        }
        let mut routes = Vec::with_capacity(files.len());
        let mut seen = HashSet::new();
        // A policy name is one bucket everywhere (memory and Redis alike): every route that
        // names it must mean the same policy.
        let mut policy_names: HashMap<String, (String, Policy)> = HashMap::new();
        for (i, r) in files.iter().enumerate() {
            self.name(&format!("routes[{i}].name"), &r.name)?;
            if !seen.insert(r.name.as_str()) {
                return Err(self.err(
                    format!("routes[{i}].name"),
                    format!("duplicate route `{}`", r.name),
                ));
            }
            routes.push(self.route(i, r, context, &mut policy_names)?);
        }

        Ok(routes)
    }

    /// One `[[routes]]` entry; `policy_names` holds the policies of the routes before it.
    fn route(
        &self,
        i: usize,
        r: &FileRoute,
        context: &RouteContext<'_>,
        policy_names: &mut HashMap<String, (String, Policy)>,
    ) -> Result<Route, ConfigError> {
        let key = |k: &str| format!("routes[{i}].{k}");
        let upstreams = context.upstreams;
        let (path_prefix, exact) = self.route_path(i, r)?;
        let methods = self.methods(i, &r.methods)?;
        let upstream = upstreams
            .iter()
            .position(|u| u.name == r.upstream)
            .ok_or_else(|| {
                self.err(
                    key("upstream"),
                    format!("no [[upstreams]] entry is named `{}`", r.upstream),
                )
            })?;
        if r.min_role.is_some() && !matches!(r.auth, Mode::Jwt | Mode::JwtQuery) {
            return Err(self.err(
                key("min_role"),
                format!(
                    "needs auth = \"jwt\" or \"jwt_query\", not \"{}\"",
                    r.auth.as_str()
                ),
            ));
        }
        let allow_networks = r
            .allow_networks
            .iter()
            .enumerate()
            .map(|(j, n)| self.network(&format!("routes[{i}].allow_networks[{j}]"), n))
            .collect::<Result<Vec<_>, _>>()?;
        let login = match r.login_guard {
            true => {
                self.login_route(i, r, &methods)?;
                Some(guard(context, &upstreams[upstream]))
            }
            false => None,
        };
        Ok(Route {
            name: r.name.clone(),
            path_prefix,
            exact,
            methods,
            upstream,
            max_body_bytes: r.max_body_bytes,
            auth: r.auth,
            min_role: r.min_role,
            gate: (!allow_networks.is_empty()).then(|| Gate::new(allow_networks)),
            node_keys: self.node_keys(i, r)?,
            rate_limits: self.route_policies(i, r, policy_names)?,
            login,
            websocket: r.websocket.unwrap_or(r.auth == Mode::JwtQuery),
            metrics: Handles::default(),
        })
    }

    /// A route's `path` or `path_prefix` (exactly one), and whether it is exact.
    fn route_path(&self, i: usize, r: &FileRoute) -> Result<(String, bool), ConfigError> {
        let key = |k: &str| format!("routes[{i}].{k}");
        let (path_key, path, exact) = match (&r.path_prefix, &r.path) {
            (Some(p), None) => ("path_prefix", p, false),
            (None, Some(p)) => ("path", p, true),
            _ => return Err(self.err(key("path"), "give exactly one of path, path_prefix")),
        };
        if !crate::path::is_route_prefix(path) {
            return Err(self.err(
                key(path_key),
                format!(
                    "`{path}` must be `/` followed by letters, digits, `-`, `_`, `~`, `.` and \
                     `/`, with no empty or `.`/`..` segments (requests are matched after \
                     decoding escaped unreserved characters)"
                ),
            ));
        }
        Ok((path.clone(), exact))
    }

    /// A route's `methods`, uppercased and deduplicated; GET brings HEAD.
    fn methods(&self, i: usize, names: &[String]) -> Result<Vec<Method>, ConfigError> {
        let mut methods = Vec::with_capacity(names.len());
        for (j, m) in names.iter().enumerate() {
            let upper = m.to_ascii_uppercase();
            let method = Method::from_bytes(upper.as_bytes())
                .ok()
                .filter(|m| m.as_str().bytes().all(|b| b.is_ascii_uppercase()))
                .ok_or_else(|| {
                    self.err(
                        format!("routes[{i}].methods[{j}]"),
                        format!("`{m}` is not an HTTP method"),
                    )
                })?;
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
            methods.push(Method::HEAD);
        }
        Ok(methods)
    }

    /// A `node_key` route's digest file, loaded.
    fn node_keys(&self, i: usize, r: &FileRoute) -> Result<Option<Arc<NodeKeys>>, ConfigError> {
        let key = format!("routes[{i}].node_key_digests_file");
        match (&r.node_key_digests_file, r.auth) {
            (None, _) => Ok(None),
            (Some(file), Mode::NodeKey) => {
                let keys = NodeKeys::load(&self.relative(file)).map_err(|e| self.err(&key, e))?;
                Ok(Some(Arc::new(keys)))
            }
            (Some(_), other) => Err(self.err(
                key,
                format!("needs auth = \"node_key\", not \"{}\"", other.as_str()),
            )),
        }
    }

    /// A route's rate-limit policies. A policy name is one bucket everywhere (memory and
    /// Redis alike), so every route that names it must mean the same policy.
    fn route_policies(
        &self,
        i: usize,
        r: &FileRoute,
        policy_names: &mut HashMap<String, (String, Policy)>,
    ) -> Result<Vec<Policy>, ConfigError> {
        let mut rate_limits: Vec<Policy> = Vec::new();
        let one = r
            .rate_limit
            .iter()
            .map(|p| (format!("routes[{i}].rate_limit"), p));
        let many = r
            .rate_limits
            .iter()
            .enumerate()
            .map(|(j, p)| (format!("routes[{i}].rate_limits[{j}]"), p));
        for (pkey, p) in one.chain(many) {
            let policy = self.policy(&pkey, p, &r.name, r.auth)?;
            let name = &policy.limit.name;
            if rate_limits.iter().any(|q| &q.limit.name == name) {
                return Err(self.err(
                    format!("{pkey}.name"),
                    format!("duplicate policy name `{name}` on this route"),
                ));
            }
            match policy_names.get(name) {
                Some((other, q))
                    if q.key != policy.key
                        || q.limit.interval != policy.limit.interval
                        || q.limit.burst != policy.limit.burst =>
                {
                    return Err(self.err(
                        format!("{pkey}.name"),
                        format!(
                            "policy `{name}` is also on route `{other}` with another key, rate or \
                             burst; routes that name one policy share its buckets, so give this \
                             one its own name"
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    policy_names.insert(name.clone(), (r.name.clone(), policy.clone()));
                }
            }
            rate_limits.push(policy);
        }
        Ok(rate_limits)
    }

    /// What a `login_guard` route must be: POST only (the guard reads POST bodies; any other
    /// method would reach the login handler unguarded), no tunnel, a body the edge can hold.
    fn login_route(&self, i: usize, r: &FileRoute, methods: &[Method]) -> Result<(), ConfigError> {
        let key = |k: &str| format!("routes[{i}].{k}");
        if methods != [Method::POST] {
            return Err(self.err(
                key("methods"),
                "a login_guard route must allow exactly [\"POST\"]",
            ));
        }
        if r.websocket == Some(true) {
            return Err(self.err(key("websocket"), "not on a login_guard route"));
        }
        if r.max_body_bytes > LOGIN_BODY_CAP {
            return Err(self.err(
                key("max_body_bytes"),
                format!("login_guard reads the body at the edge: keep it at most {LOGIN_BODY_CAP}"),
            ));
        }
        Ok(())
    }

    fn policy(
        &self,
        key: &str,
        p: &FileRateLimit,
        route: &str,
        auth: Mode,
    ) -> Result<Policy, ConfigError> {
        let rates = [
            (p.per_second, Duration::from_secs(1)),
            (p.per_minute, Duration::from_secs(60)),
            (p.per_hour, Duration::from_secs(3600)),
        ];
        let mut given = rates.iter().filter_map(|(n, d)| n.map(|n| (n, *d)));
        let (Some((count, period)), None) = (given.next(), given.next()) else {
            return Err(self.err(key, "give exactly one of per_second, per_minute, per_hour"));
        };
        if count == 0 {
            return Err(self.err(key, "the rate must be at least 1"));
        }
        let burst = p.burst.unwrap_or(count);
        if burst == 0 {
            return Err(self.err(format!("{key}.burst"), "must be at least 1"));
        }
        if matches!(p.key, KeyKind::User | KeyKind::Tenant)
            && !matches!(auth, Mode::Jwt | Mode::JwtQuery)
        {
            return Err(self.err(
                format!("{key}.key"),
                format!(
                    "`{}` needs a verified caller (auth = \"jwt\" or \"jwt_query\"); this route can only key by ip",
                    p.key.as_str()
                ),
            ));
        }
        let name = p
            .name
            .clone()
            .unwrap_or_else(|| format!("{route}-{}", p.key.as_str()));
        self.name(&format!("{key}.name"), &name)?;
        Ok(Policy {
            key: p.key,
            limit: Limit {
                // Set by the store when it registers the policy.
                id: 0,
                name,
                interval: period / count,
                burst,
            },
        })
    }
}

/// A login route's lockout. A reserved guess is given back by itself once its request cannot
/// be running any more: every timeout of one attempt, plus margin.
fn guard(context: &RouteContext<'_>, upstream: &Upstream) -> Guard {
    let lockout = context.lockout;
    let policy = |max_failures| LockPolicy {
        max_failures,
        lock: lockout.lock,
        reservation_ttl: upstream.connect_timeout
            + upstream.write_timeout
            + upstream.read_timeout
            + context.body_timeout
            + Duration::from_secs(5),
        max_entries: lockout.max_entries,
    };
    Guard {
        account: policy(lockout.max_failures),
        email: policy(lockout.max_failures_per_email),
        failure_statuses: lockout.failure_statuses.clone(),
    }
}
