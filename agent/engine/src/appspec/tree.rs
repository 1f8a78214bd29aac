//! A YAML document as a small tree whose every node knows where it starts in the text.
//!
//! serde_yaml gives typed values but forgets positions once deserialized, and AppSpec
//! messages must point at the line and column of the key or value concerned. So the
//! validator walks this tree instead, built from yaml-rust2's marked events. Scalars keep
//! their raw text and whether they were quoted, because AppSpec values such as `version: 0.0`
//! and `mode: 0644` mean what was written, not what a YAML number resolver would make of them.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::Span;

/// How many nodes aliases may expand to in total: an "billion laughs" document must end in
/// an error, not in an exhausted host.
const ALIAS_BUDGET: usize = 100_000;

/// One YAML node and where it starts.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) value: Value,
    pub(crate) span: Span,
}

/// The three YAML node kinds, scalars kept as written.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// `plain` is false for quoted and block scalars, whose text is never null or a number.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order; duplicates are kept so the validator can report them.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// True for an empty value, `~` or `null` written plain.
    pub(crate) fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The scalar's text, None for a sequence or a mapping.
    pub(crate) fn text(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// What kind of node this is, for messages ("expected a list, found a mapping").
    pub(crate) fn kind(&self) -> &'static str {
        match &self.value {
            _ if self.is_null() => "nothing",
            Value::Scalar { .. } => "a single value",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A YAML syntax problem, located.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub(crate) span: Span,
    pub(crate) message: String,
}

/// The first document of a YAML text, and where a second one starts (it is ignored).
pub(crate) struct Document {
    /// None when the text holds no document at all (empty, or only comments).
    pub(crate) root: Option<Node>,
    pub(crate) second_document: Option<Span>,
}

/// Parses `text`, keeping its first document.
pub(crate) fn parse(text: &str) -> Result<Document, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    match parser.load(&mut builder, true) {
        Ok(()) => {}
        Err(e) => {
            let m = e.marker();
            return Err(SyntaxError {
                span: span_of(m),
                message: e.info().to_string(),
            });
        }
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(Document {
        root: builder.root,
        second_document: builder.second_document,
    })
}

fn span_of(m: &Marker) -> Span {
    // yaml-rust2 counts lines from 1 and columns from 0.
    Span {
        line: m.line().max(1),
        col: m.col() + 1,
    }
}

/// A collection being filled while its events arrive.
enum Frame {
    Seq {
        items: Vec<Node>,
        span: Span,
        anchor: usize,
    },
    Map {
        items: Vec<Node>,
        span: Span,
        anchor: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    /// Set once; later events are ignored so one bad alias gives one message.
    error: Option<SyntaxError>,
    expanded: usize,
    /// True once the first document is complete; a second one is ignored.
    done: bool,
    /// Where a second document starts, if there is one.
    second_document: Option<Span>,
}

impl Builder {
    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            Some(Frame::Seq { items, .. }) | Some(Frame::Map { items, .. }) => items.push(node),
            None => {
                self.root = Some(node);
                self.done = true;
            }
        }
    }
}

/// Resolves YAML merge keys (`<<: *base`, `<<: [*a, *b]`), which CodeDeploy's YAML reader
/// honours: the merged mappings' entries are added unless the mapping sets them itself.
fn merge_keys(pairs: Vec<(Node, Node)>) -> Vec<(Node, Node)> {
    let is_merge =
        |k: &Node| matches!(&k.value, Value::Scalar { text, plain: true } if text == "<<");
    if !pairs.iter().any(|(k, _)| is_merge(k)) {
        return pairs;
    }
    let (merges, mut out): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| is_merge(k));
    let mut sources = Vec::new();
    for (k, v) in merges {
        match v.value {
            Value::Map(m) => sources.push(m),
            Value::Seq(items) => {
                for item in items {
                    if let Value::Map(m) = item.value {
                        sources.push(m);
                    }
                }
            }
            // Not a mapping: keep it as an ordinary key so the validator reports it.
            other => out.push((
                k,
                Node {
                    value: other,
                    span: v.span,
                },
            )),
        }
    }
    for m in sources {
        for (k, v) in m {
            let present = out.iter().any(|(ok, _)| match (ok.text(), k.text()) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            });
            if !present {
                out.push((k, v));
            }
        }
    }
    out
}

fn count_nodes(n: &Node) -> usize {
    match &n.value {
        Value::Scalar { .. } => 1,
        Value::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Value::Map(items) => {
            1 + items
                .iter()
                .map(|(k, v)| count_nodes(k) + count_nodes(v))
                .sum::<usize>()
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let span = span_of(&mark);
        if self.done && ev == Event::DocumentStart && self.second_document.is_none() {
            self.second_document = Some(span);
        }
        if self.error.is_some() || self.done {
            return;
        }
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = matches!(style, TScalarStyle::Plain);
                self.finish(
                    Node {
                        value: Value::Scalar { text, plain },
                        span,
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq {
                items: Vec::new(),
                span,
                anchor,
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map {
                items: Vec::new(),
                span,
                anchor,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq {
                        items,
                        span,
                        anchor,
                    }) => (
                        Node {
                            value: Value::Seq(items),
                            span,
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        items,
                        span,
                        anchor,
                    }) => {
                        let mut pairs = Vec::with_capacity(items.len() / 2);
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            pairs.push((k, v));
                        }
                        let pairs = merge_keys(pairs);
                        // yaml-rust2 marks a block mapping where its first value starts;
                        // readers expect its first key.
                        let span = pairs.first().map_or(span, |(k, _)| k.span);
                        (
                            Node {
                                value: Value::Map(pairs),
                                span,
                            },
                            anchor,
                        )
                    }
                    None => return,
                };
                self.finish(node, anchor);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut node) => {
                    self.expanded += count_nodes(&node);
                    if self.expanded > ALIAS_BUDGET {
                        self.error = Some(SyntaxError {
                            span,
                            message: format!(
                                "aliases expand to more than {ALIAS_BUDGET} nodes; \
                                 write the values out instead"
                            ),
                        });
                        return;
                    }
                    // Messages about the copied value point at the alias, where the reader is.
                    node.span = span;
                    self.finish(node, 0);
                }
                None => {
                    self.error = Some(SyntaxError {
                        span,
                        message: "alias refers to an unknown anchor".to_string(),
                    })
                }
            },
            Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd
            | Event::Nothing => {}
        }
    }
}
