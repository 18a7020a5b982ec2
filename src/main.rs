//! Command line: `run`, `check-config`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use get2dial_gateway::config::Config;
use get2dial_gateway::{build_server, demo};
use pingora::services::listening::Service;

/// Edge gateway on Pingora that answers every error with the Get2Dial envelope.
#[derive(Parser)]
#[command(name = "get2dial-gateway", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with the given configuration file.
    Run {
        /// Path of the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and print its routes, without starting anything.
    CheckConfig {
        /// Path of the TOML configuration file.
        config: PathBuf,
    },
    /// Run the gateway in front of a built-in stand-in of the Get2Dial API, which listens on the
    /// first server address of the first upstream.
    Demo {
        /// Path of the TOML configuration file.
        #[arg(long, short, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    let (config_path, demo) = match cli.command {
        Command::Run { config } => (config, false),
        Command::Demo { config } => (config, true),
        Command::CheckConfig { config } => return check_config(&config),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let stand_in = match (demo, &config.jwt) {
        (false, _) => None,
        (true, Some(jwt)) => Some((config.upstreams[0].servers[0], demo::StandIn::new(jwt))),
        (true, None) => {
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
    let server = build_server(config.clone(), |server| {
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
            server.run_forever()
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            println!("{}: ok", path.display());
            println!(
                "listen {}  admin {}",
                c.server.listen, c.server.admin_listen
            );
            for r in &c.routes {
                let methods = if r.methods.is_empty() {
                    "ANY".to_string()
                } else {
                    r.methods
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                println!(
                    "route {:<16} {:<28} {:<16} -> {}",
                    r.name, r.path_prefix, methods, c.upstreams[r.upstream].name
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
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
         curl -i -X DELETE {gw}/api/v1/auth/login # wrong method -> 405 + Allow\n  \
         curl -i -X POST {gw}/api/v1/auth/login -d '{{\"email\":\"{}\",\"password\":\"{}\"}}'\n  \
         curl -i {gw}/api/v1/auth/me -H \"Authorization: Bearer <token from the login>\"\n",
        config.server.admin_listen,
        demo::DEMO_EMAIL,
        demo::DEMO_PASSWORD,
    );
}
