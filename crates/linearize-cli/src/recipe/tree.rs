//! The recipe as a YAML tree that remembers where every value came from: the files it was read
//! from (the recipe and its `include`s), environment expansion and `--set` overrides, merged in
//! that order, then typed into a [`serde_yaml_ng::Value`] for deserialisation. Errors found
//! later (a wrong type, an unknown key, a bad value) are reported at the file and line of the key.
use anyhow::{anyhow, bail, ensure, Context, Result};
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, MarkedSequenceNode};
use marked_yaml::{LoaderOptions, Marker, Node, Span};
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    /// The `--set` option with this index (0-based) on the command line.
    Set(usize),
}

/// A recipe tree with its sources.
pub struct RecipeTree {
    root: Node,
    /// Indexed by the markers' source ids.
    origins: Vec<Origin>,
}

/// Nested includes deeper than this are refused (a cycle is refused at any depth).
const MAX_INCLUDE_DEPTH: usize = 64;

impl RecipeTree {
    /// Reads `path` and its includes (recursively, paths relative to the including file; every
    /// included file is merged under the one that includes it, in list order, so the including
    /// file wins). See [`RecipeTree::expand_env`] for variables.
    pub fn load(path: &Path) -> Result<Self> {
        let mut tree = Self {
            root: Node::Mapping(MarkedMappingNode::new_empty(Span::new_blank())),
            origins: Vec::new(),
        };
        tree.root = tree.read_with_includes(path, &mut Vec::new())?;
        Ok(tree)
    }

    fn read_with_includes(&mut self, path: &Path, stack: &mut Vec<PathBuf>) -> Result<Node> {
        let canonical = path
            .canonicalize()
            .with_context(|| format!("recipe file {}: cannot read it", path.display()))?;
        let chain = || {
            stack
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" -> ")
        };
        ensure!(
            !stack.contains(&canonical),
            "{}: includes itself (include chain: {})",
            path.display(),
            chain()
        );
        ensure!(
            stack.len() < MAX_INCLUDE_DEPTH,
            "{}: includes are nested more than {MAX_INCLUDE_DEPTH} deep (include chain: {})",
            path.display(),
            chain()
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("recipe file {}: cannot read it", path.display()))?;
        let source = self.origins.len();
        self.origins.push(Origin::File(path.to_path_buf()));
        let options = LoaderOptions::default()
            .error_on_duplicate_keys(true)
            .prevent_coercion(true)
            .toplevel_mapping();
        let mut node = marked_yaml::parse_yaml_with_options(source, &text, options)
            .map_err(|e| anyhow!("{}: not a valid recipe: {e}", path.display()))?;
        let Node::Mapping(map) = &mut node else {
            bail!("{}: a recipe must be a YAML mapping", path.display());
        };
        let includes = match map.remove("include") {
            None => Vec::new(),
            Some(Node::Scalar(s)) => vec![s],
            Some(Node::Sequence(seq)) => seq
                .iter()
                .map(|item| {
                    item.as_scalar().cloned().ok_or_else(|| {
                        anyhow!("{}: `include` takes file paths", self.locate(item.span()))
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!(
                "{}: `include` takes a file path or a list of them",
                self.locate(other.span())
            ),
        };
        stack.push(canonical);
        let base = path.parent().unwrap_or(Path::new("."));
        let mut merged = Node::Mapping(MarkedMappingNode::new_empty(*map.span()));
        for include in includes {
            let included = base.join(include.as_str());
            ensure!(
                included.is_file(),
                "{}: include `{}`: no such file ({})",
                self.locate(include.span()),
                include.as_str(),
                included.display()
            );
            let part = self.read_with_includes(&included, stack)?;
            merge(&mut merged, part);
        }
        stack.pop();
        merge(&mut merged, node);
        Ok(merged)
    }

    /// Replaces `${NAME}` and `${NAME:-default}` in every string value (from the files and from
    /// `--set`) with the variable of the environment, through `var`; `$$` is a literal `$`.
    pub fn expand_env(&mut self, var: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        let mut failure = None;
        visit_scalars_mut(&mut self.root, &mut |scalar| {
            if failure.is_some() || !scalar.as_str().contains('$') {
                return;
            }
            match expand(scalar.as_str(), var) {
                Ok(expanded) => {
                    let mut replaced = MarkedScalarNode::new(*scalar.span(), expanded);
                    replaced.set_coerce(scalar.may_coerce());
                    *scalar = replaced;
                }
                Err(e) => failure = Some((*scalar.span(), e)),
            }
        });
        match failure {
            Some((span, e)) => Err(anyhow!("{}: {e}", self.locate(&span))),
            None => Ok(()),
        }
    }

    /// Applies a `--set key.path=value` override (the value is YAML: `0.01`, `[1, 2]`, `{a: 1}`,
    /// `"text"`); `index` is its position on the command line, for error messages.
    pub fn set(&mut self, index: usize, assignment: &str) -> Result<()> {
        let (key, value) = assignment.split_once('=').with_context(|| {
            format!("--set {assignment:?}: expected key.path=value, e.g. attention_transfer.max_steps=50")
        })?;
        let keys: Vec<&str> = key.split('.').collect();
        ensure!(
            keys.iter().all(|k| !k.is_empty()),
            "--set {assignment:?}: empty key segment in `{key}`"
        );
        let source = self.origins.len();
        self.origins.push(Origin::Set(index));
        let span = Span::new_start(Marker::new(source, 0, 1, 1));
        let parsed = marked_yaml::parse_yaml_with_options(
            source,
            format!("v: {value}"),
            LoaderOptions::default().prevent_coercion(true),
        )
        .map_err(|e| anyhow!("--set {assignment:?}: the value is not valid YAML: {e}"))?;
        let mut value = parsed
            .as_mapping()
            .and_then(|m| m.get_node("v"))
            .cloned()
            .unwrap_or_else(|| Node::Scalar(MarkedScalarNode::new_empty(span)));
        for key in keys.iter().rev() {
            let mut map = MarkedMappingNode::new_empty(span);
            map.insert(MarkedScalarNode::new(span, *key), value);
            value = Node::Mapping(map);
        }
        merge(&mut self.root, value);
        Ok(())
    }

    /// The merged tree as plain YAML values: unquoted scalars are typed as YAML types them
    /// (numbers, booleans, null), quoted ones stay strings.
    pub fn to_value(&self) -> Value {
        to_value(&self.root)
    }

    /// `file:line` of the value at a serde path such as `attention_transfer.optimizer.lr` or
    /// `conversion.softmax_layers[2]`; the deepest existing prefix when the path runs past the
    /// tree (an unknown or missing key is reported at its parent).
    pub fn locate_path(&self, path: &str) -> String {
        let mut node = &self.root;
        for segment in path_segments(path) {
            let next = match (&segment, node) {
                (Segment::Key(k), Node::Mapping(m)) => m.get_node(k),
                (Segment::Index(i), Node::Sequence(s)) => s.get_node(*i),
                _ => None,
            };
            match next {
                Some(next) => node = next,
                None => break,
            }
        }
        let at = self.locate(node.span());
        // A section from a file with values under it from the command line: the error may be
        // about either, so both are named (a bad `--set` is not blamed on a file alone).
        let mut sets = Vec::new();
        self.sets_under(node, &mut sets);
        sets.sort_unstable();
        sets.dedup();
        match sets.as_slice() {
            [] => at,
            _ if at.starts_with("--set") => at,
            sets => {
                let names: Vec<String> = sets.iter().map(|i| format!("--set #{}", i + 1)).collect();
                format!("{at} (with {})", names.join(", "))
            }
        }
    }

    /// The indices of the `--set`s that gave values at or under `node`.
    fn sets_under(&self, node: &Node, out: &mut Vec<usize>) {
        if let Some(Origin::Set(i)) = node
            .span()
            .start()
            .and_then(|mark| self.origins.get(mark.source()))
        {
            out.push(*i);
        }
        match node {
            Node::Mapping(m) => m.iter().for_each(|(_, v)| self.sets_under(v, out)),
            Node::Sequence(s) => s.iter().for_each(|v| self.sets_under(v, out)),
            Node::Scalar(_) => {}
        }
    }

    /// Where in the files a span is, e.g. `recipes/quickstart.yaml:12` or `--set #2`.
    fn locate(&self, span: &Span) -> String {
        let Some(mark) = span.start() else {
            return "recipe".into();
        };
        match self.origins.get(mark.source()) {
            Some(Origin::File(path)) => format!("{}:{}", path.display(), mark.line()),
            Some(Origin::Set(i)) => format!("--set #{}", i + 1),
            None => "recipe".into(),
        }
    }
}

/// Merges `over` into `base`: mappings merge key by key (recursively), anything else replaces.
fn merge(base: &mut Node, over: Node) {
    match (base, over) {
        (Node::Mapping(base), Node::Mapping(over)) => {
            for (key, value) in over.iter() {
                match base.get_mut(key.as_str()) {
                    Some(existing) => merge(existing, value.clone()),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

fn visit_scalars_mut(node: &mut Node, f: &mut dyn FnMut(&mut MarkedScalarNode)) {
    match node {
        Node::Scalar(s) => f(s),
        Node::Sequence(seq) => seq.iter_mut().for_each(|n| visit_scalars_mut(n, f)),
        Node::Mapping(map) => map.values_mut().for_each(|n| visit_scalars_mut(n, f)),
    }
}

fn to_value(node: &Node) -> Value {
    match node {
        Node::Scalar(s) if s.may_coerce() => {
            serde_yaml_ng::from_str(s.as_str()).unwrap_or_else(|_| Value::String(s.to_string()))
        }
        Node::Scalar(s) => Value::String(s.to_string()),
        Node::Sequence(seq) => Value::Sequence(seq_values(seq)),
        Node::Mapping(map) => Value::Mapping(
            map.iter()
                .map(|(k, v)| (Value::String(k.to_string()), to_value(v)))
                .collect(),
        ),
    }
}

fn seq_values(seq: &MarkedSequenceNode) -> Vec<Value> {
    seq.iter().map(to_value).collect()
}

/// Expands `${NAME}`, `${NAME:-default}` and `$$`.
fn expand(text: &str, var: &dyn Fn(&str) -> Option<String>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(body) = rest.strip_prefix("${") {
            let end = body
                .find('}')
                .with_context(|| format!("unclosed `${{` in {text:?}"))?;
            let (name, default) = match body[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&body[..end], None),
            };
            ensure!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "`${{{}}}` in {text:?}: not an environment variable name",
                &body[..end]
            );
            match (var(name).filter(|v| !v.is_empty()), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => bail!(
                    "environment variable {name} is not set (write ${{{name}:-default}} for a \
                     default)"
                ),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

enum Segment {
    Key(String),
    Index(usize),
}

/// Splits serde_path_to_error's paths: `a.b[3].c`, map keys with dots kept whole when quoted.
fn path_segments(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let mut part = part;
        let key_end = part.find('[').unwrap_or(part.len());
        if key_end > 0 {
            segments.push(Segment::Key(part[..key_end].to_string()));
        }
        part = &part[key_end..];
        while let Some(inner) = part.strip_prefix('[') {
            let Some(close) = inner.find(']') else { break };
            if let Ok(i) = inner[..close].parse() {
                segments.push(Segment::Index(i));
            }
            part = &inner[close + 1..];
        }
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOME_DIR").then(|| "/home/u".to_string())
    }

    #[test]
    fn expands_variables_defaults_and_dollars() {
        assert_eq!(expand("${HOME_DIR}/x", &env).unwrap(), "/home/u/x");
        assert_eq!(expand("${NOPE:-d}/x", &env).unwrap(), "d/x");
        assert_eq!(expand("a$$b $c", &env).unwrap(), "a$b $c");
        let e = expand("${NOPE}", &env).unwrap_err().to_string();
        assert!(e.contains("NOPE is not set"), "{e}");
        assert!(expand("${A", &env).is_err());
    }

    #[test]
    fn paths_split_into_keys_and_indices() {
        let segments = path_segments("a.b[3].c");
        let rendered: Vec<String> = segments
            .iter()
            .map(|s| match s {
                Segment::Key(k) => k.clone(),
                Segment::Index(i) => format!("#{i}"),
            })
            .collect();
        assert_eq!(rendered, ["a", "b", "#3", "c"]);
    }
}
