//! A minimal Hugging Face hub on localhost for tests (model and dataset repositories), shared by
//! the test binaries that fetch from the hub.
#![allow(dead_code)] // each test binary serves a different kind of repository
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// The commit every repository of the fake hub is at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A minimal hub on localhost: the repository info API with `?blobs=true` (sizes, git blob ids,
/// and SHA-256 for `.safetensors` and `.parquet` files, which the real hub stores in LFS) and `resolve/`
/// downloads. Records request paths. `Tamper` makes it lie.
pub struct FakeHub {
    pub endpoint: String,
    pub requests: Arc<Mutex<Vec<String>>>,
}

/// How the fake hub departs from the truth.
#[derive(Clone, Default)]
pub struct Tamper {
    /// The commit the info API names, instead of `COMMIT`.
    pub commit: Option<&'static str>,
    /// Extra headers sent with every file (e.g. a crafted ETag).
    pub headers: &'static str,
    /// Bodies served instead of the listed files' content: (name, body).
    pub bodies: Vec<(&'static str, Vec<u8>)>,
}

impl FakeHub {
    /// A model repository.
    pub fn start(repo: &'static str, files: Vec<(&'static str, Vec<u8>)>) -> Self {
        Self::start_tampered(repo, files, Tamper::default())
    }

    /// A model repository that lies as `tamper` says.
    pub fn start_tampered(
        repo: &'static str,
        files: Vec<(&'static str, Vec<u8>)>,
        tamper: Tamper,
    ) -> Self {
        Self::serve("models", "", repo, files, tamper)
    }

    /// A dataset repository.
    pub fn dataset(repo: &'static str, files: Vec<(&'static str, Vec<u8>)>) -> Self {
        Self::serve("datasets", "/datasets", repo, files, Tamper::default())
    }

    fn serve(
        api: &'static str,
        prefix: &'static str,
        repo: &'static str,
        files: Vec<(&'static str, Vec<u8>)>,
        tamper: Tamper,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let commit = tamper.commit.unwrap_or(COMMIT);
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
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                }
                log.lock().unwrap().push(path.clone());
                let info_path = format!("/api/{api}/{repo}/revision/main?blobs=true");
                let resolve_prefix = format!("{prefix}/{repo}/resolve/{commit}/");
                let (status, headers, body) = if path == info_path {
                    let siblings: Vec<String> = files
                        .iter()
                        .enumerate()
                        .map(|(i, (name, content))| {
                            let lfs = if name.ends_with(".safetensors") || name.ends_with(".parquet") {
                                let sha = Sha256::digest(content);
                                let hex: String =
                                    sha.iter().map(|b| format!("{b:02x}")).collect();
                                format!(
                                    ", \"lfs\": {{\"sha256\": \"{hex}\", \"size\": {}, \"pointerSize\": 134}}",
                                    content.len()
                                )
                            } else {
                                String::new()
                            };
                            format!(
                                "{{\"rfilename\": \"{name}\", \"blobId\": \"{i:040x}\", \"size\": {}{lfs}}}",
                                content.len()
                            )
                        })
                        .collect();
                    let body = format!(
                        "{{\"sha\": \"{commit}\", \"siblings\": [{}]}}",
                        siblings.join(",")
                    );
                    ("200 OK", String::new(), body.into_bytes())
                } else if let Some((i, (name, content))) = path
                    .strip_prefix(&resolve_prefix)
                    .and_then(|name| files.iter().enumerate().find(|(_, f)| f.0 == name))
                {
                    let body = tamper
                        .bodies
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(content, |(_, b)| b);
                    let headers = format!(
                        "etag: \"blob-{i}\"\r\nx-repo-commit: {commit}\r\n{}",
                        tamper.headers
                    );
                    ("200 OK", headers, body.clone())
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
