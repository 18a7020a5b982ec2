//! W3C Trace Context and OpenTelemetry spans, end to end: the gateway exports its span over
//! OTLP/HTTP to a receiver started by the test, which decodes it with the official
//! OpenTelemetry protobuf definitions (`opentelemetry-proto`); the span's ids match the
//! `traceparent` the upstream saw and the access line's `trace_id`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::Gateway;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// Reads one HTTP/1.1 request (head and Content-Length body) from `reader`.
fn read_request(reader: &mut impl BufRead) -> Option<(Vec<String>, Vec<u8>)> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_string());
    }
    let length = head
        .iter()
        .find_map(|h| {
            h.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// An OTLP/HTTP receiver: every span posted to it, decoded, with its resource's service name.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let store = spans.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let store = store.clone();
                thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut w = conn;
                    while let Some((head, body)) = read_request(&mut reader) {
                        assert!(head[0].starts_with("POST /v1/traces "), "{head:?}");
                        assert!(
                            head.iter()
                                .any(|h| h
                                    .eq_ignore_ascii_case("content-type: application/x-protobuf")),
                            "{head:?}"
                        );
                        let request = ExportTraceServiceRequest::decode(body.as_slice())
                            .expect("an OTLP protobuf export");
                        for resource in request.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|a| a.key == "service.name")
                                .and_then(|a| a.value.as_ref()?.value.clone())
                                .map(|v| match v {
                                    Value::StringValue(s) => s,
                                    other => format!("{other:?}"),
                                })
                                .unwrap_or_default();
                            for scope in resource.scope_spans {
                                for span in scope.spans {
                                    store.lock().unwrap().push((service.clone(), span));
                                }
                            }
                        }
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                        if w.write_all(ok).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Receiver { addr, spans }
    }

    /// The span of trace `trace_id` (hex), waiting up to 10 s for it.
    fn span(&self, trace_id: &str) -> (String, Span) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(found) = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|(_, s)| hex::encode(&s.trace_id) == trace_id)
            {
                return found.clone();
            }
            assert!(Instant::now() < deadline, "no span for trace {trace_id}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An upstream that answers every request with the `traceparent` it got (or `none`).
fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                while let Some((head, _)) = read_request(&mut reader) {
                    let seen = |name: &str| {
                        head.iter()
                            .find_map(|h| {
                                let (k, v) = h.split_once(':')?;
                                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                            })
                            .unwrap_or_else(|| "none".into())
                    };
                    let body = format!("{} {}", seen("traceparent"), seen("tracestate"));
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn gateway(endpoint: &str, upstream: SocketAddr) -> Gateway {
    Gateway::start_with(
        &format!(
            r#"
[log]
format = "json"
access_log = true

[tracing]
otlp_endpoint = "{endpoint}"
sample_ratio = 1.0
service_name = "edge-test"

[[upstreams]]
name = "up"
servers = ["{upstream}"]

[[routes]]
name = "app"
path_prefix = "/"
upstream = "up"
auth = "public"
"#
        ),
        &[("RUST_LOG", "error,access=info")],
        &[],
    )
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.clone())
}

#[test]
fn the_gateway_is_a_span_of_the_clients_trace_and_the_upstreams_parent() {
    let receiver = Receiver::start();
    let upstream = echo_upstream();
    let gw = gateway(&format!("http://{}/v1/traces", receiver.addr), upstream);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let r = gw.send(
        format!(
            "GET /calls?x=1 HTTP/1.1\r\nHost: t\r\ntraceparent: 00-{trace}-{client_span}-01\r\n\
             tracestate: vendor=abc\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    // The upstream's parent is the gateway's span, in the client's trace, state passed on.
    let text = r.text();
    let (seen, state) = text.split_once(' ').unwrap();
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", trace, "01"));
    let gateway_span = parts[2];
    assert_ne!(gateway_span, client_span);
    assert_eq!(state, "vendor=abc");

    let (service, span) = receiver.span(trace);
    assert_eq!(service, "edge-test");
    assert_eq!(hex::encode(&span.span_id), gateway_span);
    assert_eq!(hex::encode(&span.parent_span_id), client_span);
    assert_eq!(span.kind, 2, "server span");
    assert_eq!(
        attribute(&span, "http.route"),
        Some(Value::StringValue("app".into()))
    );
    assert_eq!(
        attribute(&span, "http.response.status_code"),
        Some(Value::IntValue(200))
    );
    assert_eq!(
        attribute(&span, "gateway.upstream"),
        Some(Value::StringValue("up".into()))
    );
    assert_eq!(
        attribute(&span, "server.port"),
        Some(Value::IntValue(i64::from(upstream.port())))
    );
    assert_eq!(
        attribute(&span, "url.path"),
        Some(Value::StringValue("/calls".into())),
        "never the query"
    );
    // The access line names the same trace.
    let log = gw.log_when(|l| l.contains(trace));
    assert!(
        log.lines().any(|l| l.contains("\"target\":\"access\"")
            && l.contains(&format!("\"trace_id\":\"{trace}\""))),
        "{log}"
    );

    // Without a traceparent the gateway starts the trace: a root span.
    let r = gw.get("/fresh");
    let seen = r.text();
    let fresh: Vec<&str> = seen.split(' ').next().unwrap().split('-').collect();
    assert_eq!(fresh.len(), 4, "{seen}");
    let (_, root) = receiver.span(fresh[1]);
    assert!(root.parent_span_id.is_empty());
    assert_eq!(hex::encode(&root.span_id), fresh[2]);

    // A client that did not sample: followed (parent-based), nothing recorded.
    let unsampled = "11111111111111111111111111111111";
    let r = gw.send(
        format!("GET /quiet HTTP/1.1\r\nHost: t\r\ntraceparent: 00-{unsampled}-2222222222222222-00\r\n\r\n")
            .as_bytes(),
    );
    assert!(
        r.text().starts_with(&format!("00-{unsampled}-")),
        "{}",
        r.text()
    );
    assert!(r.text().split(' ').next().unwrap().ends_with("-00"));
    let r = gw.get("/after");
    let after = r.text().split('-').nth(1).unwrap().to_string();
    receiver.span(&after);
    assert!(
        !receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .any(|(_, s)| hex::encode(&s.trace_id) == unsampled),
        "an unsampled trace was exported"
    );
}

#[test]
fn a_missing_collector_never_holds_a_request() {
    let upstream = echo_upstream();
    let dead = common::closed_port();
    let gw = gateway(&format!("http://127.0.0.1:{dead}/v1/traces"), upstream);
    for i in 0..50 {
        let r = gw.get(&format!("/n/{i}"));
        assert_eq!(r.status, 200);
        assert!(r.text().starts_with("00-"));
    }
}
