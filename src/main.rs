//! Command line: `run`, `check-config`, `stand-in`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use get2dial_gateway::config::{Config, LogFormat};
use get2dial_gateway::discovery::Server;
use get2dial_gateway::{build_server, demo};
use pingora::services::listening::Service;

/// Edge gateway on Pingora that answers every error with the Get2Dial envelope.
#[derive(Parser)]
#[command(
    name = "get2dial-gateway",
    version,
    about,
    long_about = "Edge gateway on Pingora in front of the Get2Dial control plane.\n\n\
        Every error that leaves it is {\"status\":\"error\",\"message\":\"...\"} with the right \
        status code; it checks tokens, enforces the login lockout and rate limits, and exports \
        Prometheus metrics on its admin port.\n\n\
        Signals: SIGHUP reloads the configuration (also POST /-/reload on the admin port), \
        SIGTERM shuts down gracefully, SIGQUIT hands the listening sockets to a new process \
        started with --upgrade (zero-downtime upgrade)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with the given configuration file.
    ///
    /// Listens on [server] listen (public) and admin_listen (/metrics, /healthz, /readyz,
    /// POST /-/reload). Exit code 2 when the file is invalid; the error names the file and key.
    Run {
        /// Path of the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Take over the listening sockets of a running gateway that received SIGQUIT.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a configuration file and print its routes, without starting anything.
    ///
    /// Reads the secrets and files it names (JWT secrets, node-key digests, CA files) as `run`
    /// would, prints each route as the gateway understands it, and exits 0, or 2 with
    /// `FILE: KEY: problem`.
    CheckConfig {
        /// Path of the TOML configuration file.
        config: PathBuf,
        /// Check secret sources (`env:NAME`, `file:PATH`) for their form only, without reading
        /// them: for linting a file in CI, where the secrets are not.
        #[arg(long)]
        no_secrets: bool,
    },
    /// Run only the built-in stand-in of the Get2Dial API (what `demo` puts behind the gateway),
    /// for a gateway in another process or container to send to (`deploy/compose`).
    StandIn {
        /// Configuration whose `[jwt]` section signs the stand-in's tokens.
        #[arg(long, short)]
        config: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
    },
    /// Run the gateway in front of a built-in stand-in of the Get2Dial API, which listens on the
    /// first server address of the first upstream.
    Demo {
        /// Path of the TOML configuration file.
        #[arg(long, short, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
}

/// Logs to stderr at `level` (`RUST_LOG` overrides it), as JSON lines or text, with a filter
/// that `PUT /-/log-level` can change while running.
fn init_logging(level: &str, format: LogFormat) -> get2dial_gateway::log_sink::Guard {
    use get2dial_gateway::log_level;
    use tracing_subscriber::EnvFilter;
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let initial = from_env.unwrap_or_else(|| log_level::directive(level));
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = get2dial_gateway::log_sink::stderr(matches!(format, LogFormat::Json));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // The two formats are two subscriber types; each hands its reload handle over the same way.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            log_level::install(&initial, move |directive| {
                let filter = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())?;
                // Lines through `log` (Pingora's) are cut at log's own level, set once at start.
                log::set_max_level(match tracing::level_filters::LevelFilter::current() {
                    tracing::level_filters::LevelFilter::OFF => log::LevelFilter::Off,
                    tracing::level_filters::LevelFilter::ERROR => log::LevelFilter::Error,
                    tracing::level_filters::LevelFilter::WARN => log::LevelFilter::Warn,
                    tracing::level_filters::LevelFilter::INFO => log::LevelFilter::Info,
                    tracing::level_filters::LevelFilter::DEBUG => log::LevelFilter::Debug,
                    _ => log::LevelFilter::Trace,
                });
                Ok(())
            });
            builder.init();
        }};
    }
    match format {
        LogFormat::Json => install!(builder.json().flatten_event(true)),
        LogFormat::Text => install!(builder),
    }
    guard
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config_path, demo, upgrade) = match cli.command {
        Command::Run { config, upgrade } => (config, false, upgrade),
        Command::Demo { config } => (config, true, false),
        Command::CheckConfig { config, no_secrets } => return check_config(&config, no_secrets),
        Command::StandIn { config, listen } => return stand_in(&config, listen),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Held to the end of `main`: dropping it writes out the lines still queued.
    let _log = init_logging(&config.log.level, config.log.format);
    let first = config.upstreams.first().and_then(|u| u.servers.first());
    let stand_in = match (demo, &config.jwt, first) {
        (false, _, _) => None,
        (true, Some(jwt), Some(Server::Addr(addr))) => Some((*addr, demo::StandIn::new(jwt))),
        (true, Some(_), _) => {
            eprintln!(
                "error: {}: upstreams[0].servers[0]: demo serves its stand-in there, so it must \
                 be an ip:port",
                config_path.display()
            );
            return ExitCode::from(2);
        }
        (true, None, _) => {
            eprintln!(
                "error: {}: demo needs a [jwt] section to sign its tokens",
                config_path.display()
            );
            return ExitCode::from(2);
        }
    };
    let stand_in_addr = stand_in.as_ref().map(|(addr, _)| *addr);
    let summary = (
        config.server.listen,
        config.server.admin_listen,
        config.routes.len(),
    );
    let server = build_server(config.clone(), upgrade, |server| {
        if let Some((addr, app)) = stand_in {
            let mut svc = Service::new("demo stand-in".to_string(), app);
            svc.add_tcp(&addr.to_string());
            server.add_service(svc);
        }
    });
    match server {
        Ok(server) => {
            tracing::info!(
                listen = %summary.0,
                admin = %summary.1,
                routes = summary.2,
                "get2dial-gateway starting"
            );
            if let Some(addr) = stand_in_addr {
                print_demo_help(&config, addr);
            }
            // `run` (not `run_forever`, which exits the process) returns after a shutdown, so
            // the log queue is written out before the process ends.
            server.run(pingora::server::RunArgs::default());
            get2dial_gateway::trace::flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn stand_in(path: &std::path::Path, listen: std::net::SocketAddr) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(jwt) = &config.jwt else {
        eprintln!(
            "error: {}: stand-in needs a [jwt] section to sign its tokens",
            path.display()
        );
        return ExitCode::from(2);
    };
    let _log = init_logging(&config.log.level, config.log.format);
    let mut server = match pingora::server::Server::new(None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    server.bootstrap();
    let mut svc = Service::new("stand-in".to_string(), demo::StandIn::new(jwt));
    svc.add_tcp(&listen.to_string());
    server.add_service(svc);
    tracing::info!(%listen, "stand-in of the Get2Dial API listening");
    server.run(pingora::server::RunArgs::default());
    ExitCode::SUCCESS
}

fn check_config(path: &std::path::Path, no_secrets: bool) -> ExitCode {
    let loaded = if no_secrets {
        Config::load_without_secrets(path)
    } else {
        Config::load(path)
    };
    match loaded {
        Ok(c) => {
            print!("{}", describe(&c));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The configuration as the gateway understands it: routes most specific first, as matched.
fn describe(c: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", c.path.display());
    let _ = writeln!(
        out,
        "listen {}  admin {}  threads {}  store {}",
        c.server.listen,
        c.server.admin_listen,
        c.server.threads,
        c.redis.as_ref().map_or("memory", |r| r.topology.kind())
    );
    for u in &c.upstreams {
        let servers: Vec<String> = u.servers.iter().map(|s| s.to_string()).collect();
        let _ = writeln!(
            out,
            "upstream {:<14} {}  connect {:?} read {:?}{}",
            u.name,
            servers.join(","),
            u.connect_timeout,
            u.read_timeout,
            u.health_check
                .as_ref()
                .map(|h| match &h.kind {
                    get2dial_gateway::config::CheckKind::Tcp => {
                        format!("  tcp health check every {:?}", h.interval)
                    }
                    get2dial_gateway::config::CheckKind::Http { path, .. } => {
                        format!("  http health check GET {path} every {:?}", h.interval)
                    }
                })
                .unwrap_or_default()
        );
    }
    let mut routes: Vec<_> = c.routes.iter().collect();
    routes.sort_by_key(|r| (std::cmp::Reverse(r.path_prefix.len()), !r.exact));
    for r in routes {
        let methods = if r.methods.is_empty() {
            "ANY".to_string()
        } else {
            let m: Vec<&str> = r.methods.iter().map(|m| m.as_str()).collect();
            m.join(",")
        };
        let mut extras = vec![format!("auth={}", r.auth.as_str())];
        if let Some(role) = r.min_role {
            extras.push(format!("min_role={}", role.as_str()));
        }
        if let Some(gate) = &r.gate {
            let n: Vec<String> = gate.networks().iter().map(|n| n.to_string()).collect();
            extras.push(format!("networks={}", n.join(",")));
        }
        if let Some(keys) = &r.node_keys {
            extras.push(format!("node_keys={}", keys.len()));
        }
        for p in &r.rate_limits {
            extras.push(format!(
                "limit={}:{}/{:?}x{}",
                p.limit.name,
                p.key.as_str(),
                p.limit.interval,
                p.limit.burst
            ));
        }
        if r.login.is_some() {
            extras.push("login_guard".into());
        }
        extras.push(format!("max_body={}", r.max_body_bytes));
        let _ = writeln!(
            out,
            "route {:<16} {:<28} {:<10} -> {:<10} {}",
            r.name,
            if r.exact {
                format!("={}", r.path_prefix)
            } else {
                r.path_prefix.clone()
            },
            methods,
            c.upstreams[r.upstream].name,
            extras.join(" ")
        );
    }
    out
}

fn print_demo_help(config: &Config, stand_in: std::net::SocketAddr) {
    let port = config.server.listen.port();
    let gw = format!("http://127.0.0.1:{port}");
    println!(
        "\nget2dial-gateway demo: gateway on {gw}, stand-in API on {stand_in}, metrics on http://{}/metrics\n\
         Try:\n  \
         curl -i {gw}/api/v1/demo/html-500        # HTML 500 page -> 500 envelope\n  \
         curl -i {gw}/api/v1/demo/sql-error       # SQL error JSON -> 500 default message\n  \
         curl -i {gw}/api/v1/demo/foreign-json    # {{\"error\":...}} 422 -> envelope keeping the message\n  \
         curl -i {gw}/api/v1/demo/nope            # Go mux plain-text 404 -> 404 envelope\n  \
         curl -i {gw}/api/v1/demo/slow            # upstream too slow -> 504 envelope\n  \
         curl -i {gw}/api/v1/auth/me              # no token -> 401 envelope\n  \
         curl -i {gw}/nowhere                     # no route -> 404 envelope\n  \
         curl -i -X POST {gw}/ws/agent            # wrong method -> 405 + Allow\n  \
         curl -i -X POST {gw}/api/v1/auth/login -d '{{\"email\":\"{}\",\"password\":\"{}\"}}'\n  \
         curl -i {gw}/api/v1/auth/me -H \"Authorization: Bearer <token from the login>\"\n",
        config.server.admin_listen,
        demo::DEMO_EMAIL,
        demo::DEMO_PASSWORD,
    );
}
