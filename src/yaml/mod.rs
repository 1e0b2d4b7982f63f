//! A YAML tree that remembers where each node stood ([`parse`]), and a serde
//! deserializer over it ([`from_node`]) that records *every* problem it
//! meets instead of stopping at the first one.
//!
//! Why not `serde_yaml`: it reports one error per file and keeps no positions
//! once a value is parsed, while `kawka validate` promises every problem with
//! its file and line. The tree is built from `yaml-rust2`'s marked events.
//!
//! A leaf: the configuration files and `schemas/upcasters.yaml` are both
//! read with it.
//!
//! * `de.rs`: the recording deserializer and [`Spanned`] values.
//! * `ordered_map.rs`: [`OrderedMap`], a mapping that keeps file order.

mod de;
mod ordered_map;

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

pub use de::{from_node, NodeProblem, Spanned};
pub use ordered_map::OrderedMap;

/// Where a node starts in its file, both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl Mark {
    fn from_marker(marker: Marker) -> Mark {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Mark { line: marker.line(), column: marker.col() + 1 }
    }
}

/// One node of a parsed YAML document.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub mark: Mark,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// `plain` is true for unquoted scalars: only those are resolved to null,
    /// booleans and numbers; a quoted scalar is always a string.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    pub fn null(mark: Mark) -> Node {
        Node { kind: NodeKind::Scalar { text: String::new(), plain: true }, mark }
    }

    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { text, plain: true } if is_null_text(text))
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The value of `key` in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            NodeKind::Map(entries) => entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match &self.kind {
            NodeKind::Scalar { .. } if self.is_null() => "null".to_string(),
            NodeKind::Scalar { text, .. } => format!("`{}`", truncate(text, 40)),
            NodeKind::Seq(_) => "a list".to_string(),
            NodeKind::Map(_) => "a mapping".to_string(),
        }
    }

    /// Applies `f` to every scalar that is a value (mapping keys are left alone).
    pub fn visit_scalars_mut(&mut self, f: &mut dyn FnMut(&mut String, Mark)) {
        let mark = self.mark;
        match &mut self.kind {
            NodeKind::Scalar { text, .. } => f(text, mark),
            NodeKind::Seq(items) => items.iter_mut().for_each(|item| item.visit_scalars_mut(f)),
            NodeKind::Map(entries) => entries.iter_mut().for_each(|(_, value)| value.visit_scalars_mut(f)),
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn is_null_text(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// A syntax error: the file is not YAML at all.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

/// Parses one YAML document. An empty file is a null node.
pub fn parse(source: &str) -> Result<Node, SyntaxError> {
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(source);
    parser
        .load(&mut builder, false)
        .map_err(|error| SyntaxError { mark: Mark::from_marker(*error.marker()), message: error.info().to_string() })?;
    if let Some(problem) = builder.problem {
        return Err(problem);
    }
    Ok(builder.root.unwrap_or_else(|| Node::null(Mark { line: 1, column: 1 })))
}

/// The most nodes a document may hold once its aliases are expanded: far
/// above any configuration, far below what an alias bomb (anchors
/// nesting aliases of aliases, the "billion laughs") would build.
const MOST_NODES: usize = 100_000;

#[derive(Default)]
struct TreeBuilder {
    /// Open sequences and mappings; a mapping keeps its pending key.
    stack: Vec<(Node, Option<Node>, usize)>,
    /// Anchored nodes, with how many nodes each holds.
    anchors: HashMap<usize, (Node, usize)>,
    root: Option<Node>,
    problem: Option<SyntaxError>,
    /// Nodes built so far, aliases counted as what they expand to.
    nodes: usize,
}

impl Node {
    /// This node and every node inside it.
    fn count(&self) -> usize {
        1 + match &self.kind {
            NodeKind::Scalar { .. } => 0,
            NodeKind::Seq(items) => items.iter().map(Node::count).sum(),
            NodeKind::Map(entries) => entries.iter().map(|(k, v)| k.count() + v.count()).sum(),
        }
    }
}

impl TreeBuilder {
    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            let count = node.count();
            self.anchors.insert(anchor, (node.clone(), count));
        }
        let Some((parent, pending_key, _)) = self.stack.last_mut() else {
            self.root = Some(node);
            return;
        };
        match &mut parent.kind {
            NodeKind::Seq(items) => items.push(node),
            NodeKind::Map(entries) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => {
                    if let Some(text) = key.as_str() {
                        if entries.iter().any(|(k, _)| k.as_str() == Some(text)) && self.problem.is_none() {
                            self.problem =
                                Some(SyntaxError { mark: key.mark, message: format!("duplicate key `{text}`") });
                        }
                    }
                    entries.push((key, node));
                }
            },
            NodeKind::Scalar { .. } => unreachable!("only collections are pushed on the stack"),
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, marker: Marker) {
        let mark = Mark::from_marker(marker);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                self.nodes += 1;
                let plain = style == TScalarStyle::Plain;
                self.push_value(Node { kind: NodeKind::Scalar { text, plain }, mark }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                self.nodes += 1;
                self.stack.push((Node { kind: NodeKind::Seq(Vec::new()), mark }, None, anchor))
            }
            Event::MappingStart(anchor, _) => {
                self.nodes += 1;
                self.stack.push((Node { kind: NodeKind::Map(Vec::new()), mark }, None, anchor))
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((mut node, _, anchor)) = self.stack.pop() {
                    // A block mapping's start event points past its first
                    // key; the first key is where a reader looks.
                    if let NodeKind::Map(entries) = &node.kind {
                        if let Some((first, _)) = entries.first() {
                            node.mark = first.mark;
                        }
                    }
                    self.push_value(node, anchor);
                }
            }
            Event::Alias(anchor) => {
                let (node, count) = self.anchors.get(&anchor).cloned().unwrap_or_else(|| (Node::null(mark), 1));
                self.nodes = self.nodes.saturating_add(count);
                if self.nodes > MOST_NODES {
                    // Not expanded: the document is refused, cheaply.
                    if self.problem.is_none() {
                        let message = format!("aliases expand to more than {MOST_NODES} nodes (an alias bomb?)");
                        self.problem = Some(SyntaxError { mark, message });
                    }
                    self.push_value(Node::null(mark), 0);
                } else {
                    self.push_value(node, 0);
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn syntax_errors_and_duplicate_keys_have_positions() {
        let error = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(error.mark.line >= 1, "{error:?}");
        let error = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(error.mark.line, 3);
        assert_eq!(error.message, "duplicate key `a`");
    }

    #[test]
    fn an_alias_bomb_is_refused_without_being_built() {
        // Nine levels of ten aliases each: 10^9 scalars if expanded.
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let aliases = vec![format!("*a{}", level - 1); 10].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{aliases}]\n"));
        }
        let error = parse(&text).expect_err("refused");
        assert!(error.message.contains("alias bomb"), "{}", error.message);
        assert!(error.mark.line >= 4, "the line where it goes over: {error:?}");
        // Aliases in ordinary use still resolve.
        assert!(parse("a: &x [1, 2]\nb: [*x, *x]\n").is_ok());
    }

    #[test]
    fn quoted_scalars_stay_strings_and_anchors_resolve() {
        let node = parse("a: &x { count: 1 }\nb: *x\nc: '1'\n").unwrap();
        assert_eq!(node.get("b").unwrap().get("count").unwrap().as_str(), Some("1"));
        let value: BTreeMap<String, serde_json::Value> = from_node(&node).unwrap();
        assert_eq!(value["c"], serde_json::json!("1"));
        assert_eq!(value["b"], serde_json::json!({"count": 1}));
    }
}
