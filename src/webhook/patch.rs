//! RFC 6902 JSON Patch as the webhook answers it, built one precise
//! operation at a time. The `Editor` keeps a working copy of the pod and
//! applies every operation to it as it is recorded, so each later operation
//! is computed against the document as the API server will see it at that
//! point of the patch: array indices stay right after an insertion, a move
//! or a removal earlier in the same patch. Operations address single
//! fields and single array entries; nothing here replaces an array whole
//! unless asked to, because an array in a pod may hold entries another
//! mutator added, and those must survive. This module knows nothing about
//! pods; what to change is `mod.rs`'s and `owned.rs`'s decision.

use serde::Serialize;
use serde_json::Value;

/// One patch operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Add { path: String, value: Value },
    Remove { path: String },
    Replace { path: String, value: Value },
    Move { from: String, path: String },
}

/// A JSON Patch document.
pub type Patch = Vec<Op>;

/// Why an operation could not be applied to the working copy. The editor
/// is only asked to change paths its caller has just read, so this means
/// the pod had a shape the caller did not check (a list where an object was
/// expected, say): the request is answered as malformed rather than with a
/// patch the API server would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot apply {op} at {path}: {why}")]
pub(crate) struct EditError {
    op: &'static str,
    path: String,
    why: &'static str,
}

/// A JSON Pointer (RFC 6901) kept as its unescaped reference tokens, so
/// that building one never has to parse or escape twice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Pointer(Vec<String>);

impl Pointer {
    /// The document root.
    pub(crate) fn root() -> Self {
        Pointer(Vec::new())
    }

    /// This pointer extended by an object key.
    pub(crate) fn key(&self, key: &str) -> Self {
        let mut tokens = self.0.clone();
        tokens.push(key.to_string());
        Pointer(tokens)
    }

    /// This pointer extended by an array index.
    pub(crate) fn index(&self, index: usize) -> Self {
        self.key(&index.to_string())
    }

    /// This pointer extended by "-", the position after an array's last
    /// entry (valid only as the target of an `add`).
    pub(crate) fn end(&self) -> Self {
        self.key("-")
    }

    /// The pointer in its RFC 6901 string form: '~' becomes "~0" and '/'
    /// becomes "~1", since annotation keys such as `rewind.dev/injected`
    /// contain a '/'.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        for token in &self.0 {
            out.push('/');
            for c in token.chars() {
                match c {
                    '~' => out.push_str("~0"),
                    '/' => out.push_str("~1"),
                    c => out.push(c),
                }
            }
        }
        out
    }

    fn split_last(&self) -> Option<(&str, Pointer)> {
        let (last, parent) = self.0.split_last()?;
        Some((last.as_str(), Pointer(parent.to_vec())))
    }
}

/// A working copy of a document and the operations that made it.
#[derive(Debug, Clone)]
pub(crate) struct Editor {
    doc: Value,
    ops: Patch,
}

impl Editor {
    pub(crate) fn new(doc: &Value) -> Self {
        Editor {
            doc: doc.clone(),
            ops: Vec::new(),
        }
    }

    /// The value at `at` in the working copy, as the operations recorded so
    /// far left it.
    pub(crate) fn get(&self, at: &Pointer) -> Option<&Value> {
        self.doc.pointer(&at.render())
    }

    /// Adds `value` at `at`: a new key, or an insertion before an array
    /// index (or after the last entry, with `Pointer::end`).
    pub(crate) fn add(&mut self, at: &Pointer, value: Value) -> Result<(), EditError> {
        self.insert(at, value.clone(), "add")?;
        self.ops.push(Op::Add {
            path: at.render(),
            value,
        });
        Ok(())
    }

    /// Replaces the existing value at `at`.
    pub(crate) fn replace(&mut self, at: &Pointer, value: Value) -> Result<(), EditError> {
        let slot = self
            .get_mut(at)
            .ok_or_else(|| fail("replace", at, "no value there"))?;
        *slot = value.clone();
        self.ops.push(Op::Replace {
            path: at.render(),
            value,
        });
        Ok(())
    }

    /// Removes the value at `at`.
    pub(crate) fn remove(&mut self, at: &Pointer) -> Result<(), EditError> {
        self.take(at, "remove")?;
        self.ops.push(Op::Remove { path: at.render() });
        Ok(())
    }

    /// Moves the value at `from` to `to`; `to` is read after the removal,
    /// as RFC 6902 specifies, so moving an array entry forward targets the
    /// index it will have once it is out of the way.
    pub(crate) fn move_to(&mut self, from: &Pointer, to: &Pointer) -> Result<(), EditError> {
        if from == to {
            return Ok(());
        }
        let value = self.take(from, "move")?;
        self.insert(to, value, "move")?;
        self.ops.push(Op::Move {
            from: from.render(),
            path: to.render(),
        });
        Ok(())
    }

    /// The operations recorded, in order.
    pub(crate) fn finish(self) -> Patch {
        self.ops
    }

    fn get_mut(&mut self, at: &Pointer) -> Option<&mut Value> {
        self.doc.pointer_mut(&at.render())
    }

    fn insert(&mut self, at: &Pointer, value: Value, op: &'static str) -> Result<(), EditError> {
        let (last, parent) = at.split_last().ok_or_else(|| fail(op, at, "the root"))?;
        match self.get_mut(&parent) {
            Some(Value::Object(m)) => {
                m.insert(last.to_string(), value);
                Ok(())
            }
            Some(Value::Array(a)) => {
                let index = if last == "-" {
                    a.len()
                } else {
                    last.parse::<usize>()
                        .ok()
                        .filter(|i| *i <= a.len())
                        .ok_or_else(|| fail(op, at, "index out of range"))?
                };
                a.insert(index, value);
                Ok(())
            }
            _ => Err(fail(op, at, "the parent is neither an object nor a list")),
        }
    }

    fn take(&mut self, at: &Pointer, op: &'static str) -> Result<Value, EditError> {
        let (last, parent) = at.split_last().ok_or_else(|| fail(op, at, "the root"))?;
        let taken = match self.get_mut(&parent) {
            Some(Value::Object(m)) => m.remove(last),
            Some(Value::Array(a)) => match last.parse::<usize>() {
                Ok(i) if i < a.len() => Some(a.remove(i)),
                _ => None,
            },
            _ => None,
        };
        taken.ok_or_else(|| fail(op, at, "no value there"))
    }
}

fn fail(op: &'static str, at: &Pointer, why: &'static str) -> EditError {
    EditError {
        op,
        path: at.render(),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ops(ed: Editor) -> Value {
        serde_json::to_value(ed.finish()).unwrap()
    }

    #[test]
    fn keys_are_escaped() {
        let mut ed = Editor::new(&json!({"metadata": {"annotations": {}}}));
        let at = Pointer::root()
            .key("metadata")
            .key("annotations")
            .key("rewind.dev/a~b");
        ed.add(&at, json!("2")).unwrap();
        assert_eq!(
            ops(ed),
            json!([{"op": "add", "path": "/metadata/annotations/rewind.dev~1a~0b", "value": "2"}])
        );
    }

    #[test]
    fn later_operations_see_the_earlier_ones() {
        // An insertion at the front shifts what follows: the replace must
        // address the entry where it now is, as the API server applies the
        // operations in order.
        let doc = json!({"list": [{"n": "a"}, {"n": "b"}]});
        let mut ed = Editor::new(&doc);
        let list = Pointer::root().key("list");
        ed.add(&list.index(0), json!({"n": "new"})).unwrap();
        assert_eq!(ed.get(&list.index(2).key("n")), Some(&json!("b")));
        ed.replace(&list.index(2).key("n"), json!("B")).unwrap();
        ed.move_to(&list.index(2), &list.index(0)).unwrap();
        ed.remove(&list.index(1)).unwrap();
        let expected = json!({"list": [{"n": "B"}, {"n": "a"}]});
        assert_eq!(ed.get(&Pointer::root()), Some(&expected));
        let patch: json_patch::Patch = serde_json::from_value(ops(ed)).unwrap();
        let mut applied = doc;
        json_patch::patch(&mut applied, &patch).unwrap();
        assert_eq!(
            applied, expected,
            "an independent RFC 6902 implementation agrees"
        );
    }

    #[test]
    fn appending_uses_the_end_token() {
        let mut ed = Editor::new(&json!({"list": [1]}));
        ed.add(&Pointer::root().key("list").end(), json!(2))
            .unwrap();
        assert_eq!(
            ops(ed),
            json!([{"op": "add", "path": "/list/-", "value": 2}])
        );
    }

    #[test]
    fn a_path_that_does_not_exist_is_an_error_not_a_bad_patch() {
        let mut ed = Editor::new(&json!({"list": [1]}));
        assert!(ed.replace(&Pointer::root().key("nope"), json!(1)).is_err());
        assert!(ed
            .add(&Pointer::root().key("list").index(5), json!(1))
            .is_err());
        assert!(ed.remove(&Pointer::root().key("list").key("x")).is_err());
        assert!(ed.finish().is_empty());
    }
}
