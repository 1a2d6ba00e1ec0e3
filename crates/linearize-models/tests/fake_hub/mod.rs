//! A minimal Hugging Face hub on localhost for tests (model and dataset repositories), shared by
//! the test binaries that fetch from the hub.
#![allow(dead_code)] // each test binary serves a different kind of repository
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// The commit every repository of the fake hub is at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A minimal hub on localhost: the repository info API and `resolve/` downloads (with the
/// headers hf-hub reads: etag, x-repo-commit, content-range). Records request paths.
pub struct FakeHub {
    pub endpoint: String,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    /// A model repository.
    pub fn start(repo: &'static str, files: Vec<(&'static str, Vec<u8>)>) -> Self {
        Self::serve("models", "", repo, files)
    }

    /// A dataset repository.
    pub fn dataset(repo: &'static str, files: Vec<(&'static str, Vec<u8>)>) -> Self {
        Self::serve("datasets", "/datasets", repo, files)
    }

    fn serve(
        api: &'static str,
        prefix: &'static str,
        repo: &'static str,
        files: Vec<(&'static str, Vec<u8>)>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let mut range: Option<(usize, Option<usize>)> = None;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some((from, to)) = lower
                        .strip_prefix("range: bytes=")
                        .and_then(|r| r.trim().split_once('-'))
                    {
                        range = Some((from.parse().unwrap(), to.parse().ok()));
                    }
                }
                log.lock().unwrap().push(path.clone());
                let info_path = format!("/api/{api}/{repo}/revision/main");
                let resolve_prefix = format!("{prefix}/{repo}/resolve/{COMMIT}/");
                let (status, headers, body) = if path == info_path {
                    let siblings: Vec<String> = files
                        .iter()
                        .map(|(name, _)| format!("{{\"rfilename\": \"{name}\"}}"))
                        .collect();
                    let body = format!(
                        "{{\"sha\": \"{COMMIT}\", \"siblings\": [{}]}}",
                        siblings.join(",")
                    );
                    ("200 OK", String::new(), body.into_bytes())
                } else if let Some((i, (_, content))) = path
                    .strip_prefix(&resolve_prefix)
                    .and_then(|name| files.iter().enumerate().find(|(_, f)| f.0 == name))
                {
                    // hf-hub asks for bytes=0-0 first (metadata), then bytes=N- (the data).
                    let (start, last) = match range {
                        Some((from, to)) => (from, to.unwrap_or(content.len() - 1)),
                        None => (0, content.len() - 1),
                    };
                    let headers = format!(
                        "etag: \"blob-{i}\"\r\nx-repo-commit: {COMMIT}\r\ncontent-range: bytes {start}-{last}/{}\r\n",
                        content.len()
                    );
                    (
                        "206 Partial Content",
                        headers,
                        content[start..=last].to_vec(),
                    )
                } else {
                    ("404 Not Found", String::new(), b"not found".to_vec())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream
                    .write_all(head.as_bytes())
                    .and_then(|_| stream.write_all(&body));
            }
        });
        Self { endpoint, requests }
    }
}
