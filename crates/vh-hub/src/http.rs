//! The HTTP layer shared by downloads and uploads: one `ureq` agent with connect, read and write
//! timeouts, the token sent to the configured endpoint only, bounded retries with backoff for
//! idempotent requests, caps on every body read into memory, and Hub errors mapped to
//! [`HubError`] without the token.

use crate::error::{HubError, Result};
use crate::validate::printable;
use std::io::Read;
use std::time::Duration;

/// The cap on a JSON answer (model info, a tree page, preupload, LFS batch, commit): a real one
/// is kilobytes to a few megabytes; a server that streams without end is cut here.
pub const MAX_JSON_ANSWER: u64 = 32 << 20;
/// The cap on an error body read for its message.
const MAX_ERROR_BODY: u64 = 64 << 10;
/// Tries per idempotent request (the first and three retries).
const ATTEMPTS: u32 = 4;
/// The longest wait between two tries.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(16);
/// Default time to open a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time to wait for each read (or write) on a connection.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default first wait before a retry (then doubled each time).
pub const DEFAULT_RETRY_BASE_DELAY: Duration = Duration::from_millis(500);

/// How one try of a request failed: worth another try (5xx, 429, transport errors, a body cut
/// short) or not (4xx, a hostile answer).
pub(crate) enum Failure {
    Retry(HubError),
    Fatal(HubError),
}

/// A JSON answer: its bytes (at most [`MAX_JSON_ANSWER`]) and the `Link: <...>; rel="next"`
/// of a paginated listing, if any.
pub(crate) struct JsonAnswer {
    pub(crate) body: Vec<u8>,
    pub(crate) next: Option<String>,
}

/// An HTTP client bound to one Hub endpoint.
pub(crate) struct Client {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
    retry_base_delay: Duration,
    /// Whole-request deadline for JSON requests (the read timeout), so that a server trickling
    /// bytes cannot hold a metadata request open for ever (each read alone would stay under the
    /// read timeout). ureq then bounds each read by what is left of it.
    json_deadline: Duration,
}

impl Client {
    /// A client for `endpoint` (an http(s) URL; a trailing `/` is dropped).
    pub(crate) fn new(
        endpoint: &str,
        token: Option<String>,
        connect_timeout: Option<Duration>,
        read_timeout: Option<Duration>,
        retry_base_delay: Option<Duration>,
    ) -> Result<Self> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let Some(rest) = endpoint
            .strip_prefix("https://")
            .or_else(|| endpoint.strip_prefix("http://"))
        else {
            return Err(HubError::Http(format!(
                "the Hub endpoint must be an http:// or https:// URL, got `{}`",
                printable(&endpoint)
            )));
        };
        if rest.is_empty() || rest.contains(['?', '#', '@']) || rest.chars().any(char::is_whitespace) {
            return Err(HubError::Http(format!(
                "the Hub endpoint must be a plain URL without credentials, query or fragment, got `{}`",
                printable(&endpoint)
            )));
        }
        let connect = connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let read = read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT);
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(connect)
            .timeout_read(read)
            .timeout_write(read)
            // The Hub redirects renamed repos on its own host (keep the token) and LFS files to
            // a storage host (never send it the token; ureq drops it for other hosts).
            .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("valuehead/", env!("CARGO_PKG_VERSION")));
        if let Some(proxy) = proxy_for(&endpoint)? {
            builder = builder.proxy(proxy);
        }
        Ok(Self {
            agent: builder.build(),
            endpoint,
            token: token.filter(|t| !t.is_empty()),
            retry_base_delay: retry_base_delay.unwrap_or(DEFAULT_RETRY_BASE_DELAY),
            json_deadline: read,
        })
    }

    /// The endpoint, without a trailing `/`.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether `url` is on the configured endpoint (the only place the token is sent to).
    pub(crate) fn is_on_endpoint(&self, url: &str) -> bool {
        url.strip_prefix(self.endpoint.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self.agent.request(method, url);
        match &self.token {
            Some(token) if self.is_on_endpoint(url) => request.set("Authorization", &format!("Bearer {token}")),
            _ => request,
        }
    }

    /// One try of a request; statuses in `accept` count as success besides 2xx.
    pub(crate) fn send(
        &self,
        method: &str,
        url: &str,
        body: Option<(&[u8], &str)>,
        accept: &[u16],
        deadline: Option<Duration>,
    ) -> std::result::Result<ureq::Response, Failure> {
        let mut request = self.request(method, url);
        if let Some(deadline) = deadline {
            request = request.timeout(deadline);
        }
        let what = format!("{method} {}", printable(url));
        let result = match body {
            Some((bytes, content_type)) => request.set("Content-Type", content_type).send_bytes(bytes),
            None => request.call(),
        };
        match result {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) if accept.contains(&status) => Ok(response),
            Err(ureq::Error::Status(status, response)) => Err(status_failure(&what, status, response)),
            Err(ureq::Error::Transport(transport)) => Err(Failure::Retry(transport_error(&what, &transport))),
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or (when `idempotent`) has failed
    /// [`ATTEMPTS`] times, waiting `retry_base_delay`, then twice as long, ... between tries.
    /// Requests that change state (a commit) run once: a retry could apply them twice.
    pub(crate) fn retrying<T>(
        &self,
        idempotent: bool,
        mut attempt: impl FnMut() -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        let attempts = if idempotent { ATTEMPTS } else { 1 };
        let mut delay = self.retry_base_delay;
        let mut last = None;
        for i in 0..attempts {
            if i > 0 {
                std::thread::sleep(delay);
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
            match attempt() {
                Ok(value) => return Ok(value),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) => last = Some(e),
            }
        }
        Err(match last {
            Some(HubError::Http(m)) if attempts > 1 => HubError::Http(format!("{m} (after {attempts} attempts)")),
            Some(HubError::Timeout(m)) if attempts > 1 => HubError::Timeout(format!("{m} (after {attempts} attempts)")),
            Some(e) => e,
            None => HubError::Http("no attempt was made".into()),
        })
    }

    /// A request whose answer is JSON, read whole (at most [`MAX_JSON_ANSWER`] bytes, within
    /// the JSON deadline), retried when `idempotent`.
    pub(crate) fn json(
        &self,
        method: &str,
        url: &str,
        body: Option<(&[u8], &str)>,
        idempotent: bool,
        accept: &[u16],
    ) -> Result<JsonAnswer> {
        let what = format!("{method} {}", printable(url));
        self.retrying(idempotent, || {
            let response = self.send(method, url, body, accept, Some(self.json_deadline))?;
            let next = response.header("Link").and_then(next_link);
            let body = read_capped(response, MAX_JSON_ANSWER, &what)?;
            Ok(JsonAnswer { body, next })
        })
    }
}

/// Reads a whole answer of at most `cap` bytes; more is a hostile or broken server.
fn read_capped(response: ureq::Response, cap: u64, what: &str) -> std::result::Result<Vec<u8>, Failure> {
    let too_large = || {
        Failure::Fatal(HubError::AnswerTooLarge {
            what: what.to_string(),
            limit: cap,
        })
    };
    if response
        .header("Content-Length")
        .and_then(|l| l.trim().parse::<u64>().ok())
        .is_some_and(|l| l > cap)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    match response.into_reader().take(cap + 1).read_to_end(&mut body) {
        Ok(_) if body.len() as u64 > cap => Err(too_large()),
        Ok(_) => Ok(body),
        Err(e) => Err(Failure::Retry(io_error(what, &e))),
    }
}

/// The error for an I/O failure while reading an answer: a timeout, or a connection cut.
pub(crate) fn io_error(what: &str, e: &std::io::Error) -> HubError {
    if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
        HubError::Timeout(format!("{what}: no data within the read timeout"))
    } else {
        HubError::Http(format!("{what}: {}", printable(&e.to_string())))
    }
}

fn transport_error(what: &str, transport: &ureq::Transport) -> HubError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(transport);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
                return HubError::Timeout(format!("{what}: no answer within the timeouts"));
            }
        }
        source = e.source();
    }
    HubError::Http(format!("{what}: {}", printable(&transport.to_string())))
}

/// Maps an error status to a failure: 401/403 are authentication errors (unless the Hub says
/// the repo, revision or file does not exist: it answers 401 for missing and private repos
/// alike), 404 is not found, 429 and 5xx are retried, other statuses are final.
fn status_failure(what: &str, status: u16, response: ureq::Response) -> Failure {
    let code = response.header("X-Error-Code").map(str::to_string);
    let message = error_message(response);
    let text = format!("{what} answered {status}: {message}");
    let missing = matches!(
        code.as_deref(),
        Some("RepoNotFound" | "RevisionNotFound" | "EntryNotFound")
    );
    match status {
        401 | 403 | 404 if missing => Failure::Fatal(HubError::NotFound {
            what: format!(
                "{} (Hub; a private repo also needs a token that may read it)",
                code.unwrap_or_default()
            ),
            path: text.into(),
        }),
        401 | 403 => Failure::Fatal(HubError::Auth(text)),
        404 => Failure::Fatal(HubError::NotFound {
            what: "Hub repo, revision or file".into(),
            path: text.into(),
        }),
        429 | 500..=599 => Failure::Retry(HubError::Http(text)),
        _ => Failure::Fatal(HubError::Http(text)),
    }
}

/// The Hub's message for an error: the `X-Error-Message` header, else the body's `error`
/// field, else the body (capped and made printable: a server chooses it).
fn error_message(response: ureq::Response) -> String {
    if let Some(message) = response.header("X-Error-Message") {
        return printable(message);
    }
    let mut body = Vec::new();
    let _ = response.into_reader().take(MAX_ERROR_BODY).read_to_end(&mut body);
    let text = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    printable(text.trim())
}

/// The URL of `rel="next"` in a `Link` header (`<url>; rel="next", <url>; rel="prev"`).
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"));
        let url = url.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| url.to_string())
    })
}

/// The proxy for `endpoint` from the environment, as the Python client (requests) picks it:
/// HTTPS_PROXY for https, HTTP_PROXY for http, else ALL_PROXY (lower case too), none when the
/// host is listed in NO_PROXY. ureq's own detection ignores NO_PROXY, so it is done here.
fn proxy_for(endpoint: &str) -> Result<Option<ureq::Proxy>> {
    let var = |name: &str| {
        std::env::var(name)
            .or_else(|_| std::env::var(name.to_ascii_lowercase()))
            .ok()
            .filter(|v| !v.trim().is_empty())
    };
    let https = endpoint.starts_with("https://");
    let Some(proxy) = var(if https { "HTTPS_PROXY" } else { "HTTP_PROXY" }).or_else(|| var("ALL_PROXY")) else {
        return Ok(None);
    };
    let host = endpoint
        .split_once("://")
        .map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if let Some(no_proxy) = var("NO_PROXY") {
        let bypass = no_proxy
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .any(|entry| {
                let entry = entry.trim_start_matches('.').to_ascii_lowercase();
                entry == "*" || host == entry || host.ends_with(&format!(".{entry}"))
            });
        if bypass {
            return Ok(None);
        }
    }
    ureq::Proxy::new(&proxy)
        .map(Some)
        .map_err(|e| HubError::Http(format!("invalid proxy setting `{}`: {e}", printable(&proxy))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_give_the_next_page() {
        assert_eq!(
            next_link("<https://h/api/x?cursor=a>; rel=\"next\"").as_deref(),
            Some("https://h/api/x?cursor=a")
        );
        assert_eq!(
            next_link("<https://h/p>; rel=\"prev\", <https://h/n>; rel=\"next\"").as_deref(),
            Some("https://h/n")
        );
        assert_eq!(next_link("<https://h/p>; rel=\"prev\""), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn endpoints_must_be_plain_http_urls() {
        let make = |e: &str| Client::new(e, None, None, None, None).map(|c| c.endpoint().to_string());
        assert_eq!(make("https://huggingface.co/").unwrap(), "https://huggingface.co");
        for bad in [
            "ftp://x",
            "huggingface.co",
            "https://",
            "https://u:p@h",
            "https://h?x=1",
            "file:///etc",
        ] {
            assert!(make(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_token_goes_to_the_endpoint_only() {
        let client = Client::new("https://hub.example", Some("t".into()), None, None, None).unwrap();
        assert!(client.is_on_endpoint("https://hub.example/api/models/a/b"));
        assert!(!client.is_on_endpoint("https://hub.example.evil/api"));
        assert!(!client.is_on_endpoint("https://hub.example@evil/api"));
        assert!(!client.is_on_endpoint("http://hub.example/api"));
        assert!(!client.is_on_endpoint("https://storage.example/x"));
    }
}
