//! The external data files an ONNX graph names: its weights kept beside it
//! (`TensorProto.external_data`, key `location`, relative to the graph's
//! folder), as `models/onnx_save.py` writes graphs over protobuf's 2 GB.
//! What makes a model's outputs is the graph file and these files, so a
//! digest of the model must read both.
//!
//! The graph is read as protobuf wire format, descending only into the
//! messages that can hold tensors (the graph, its initializers, its nodes'
//! attributes and their subgraphs) and skipping everything else, weights
//! included, without reading it.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Subgraphs deeper than this are refused (a graph from a file no exporter
/// wrote; ONNX's own checker stops far earlier).
const MAX_DEPTH: usize = 64;

/// One tensor's data kept outside the graph: `length` bytes (the rest of
/// the file where not given) from `offset` of the file `location`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalTensor {
    /// As the graph names it: relative to the graph's folder.
    pub location: String,
    pub offset: u64,
    pub length: Option<u64>,
}

/// Every tensor of the graph at `path` whose data lies outside it, in the
/// order the graph holds them.
pub fn external_tensors(path: &Path) -> io::Result<Vec<ExternalTensor>> {
    let file = File::open(path)?;
    let end = file.metadata()?.len();
    let mut walk = Walk {
        reader: BufReader::new(file),
        entries: Vec::new(),
        tensors: Vec::new(),
    };
    walk.message(end, Message::Model, 0)?;
    Ok(walk.tensors)
}

/// The external data files that the graph at `path` names, as paths (its
/// folder joined with each `location`), sorted, each once.
pub fn external_data_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let folder = path.parent().unwrap_or(Path::new(""));
    let mut files: Vec<PathBuf> = external_tensors(path)?
        .iter()
        .map(|t| folder.join(&t.location))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The messages on the way to a tensor's `external_data`.
#[derive(Clone, Copy)]
enum Message {
    Model,
    Graph,
    Node,
    Attribute,
    SparseTensor,
    Tensor,
    /// `StringStringEntryProto`, in a tensor's `external_data`.
    Entry,
}

impl Message {
    /// The message field `field` holds, if it is one to descend into.
    fn child(self, field: u64) -> Option<Message> {
        use Message::*;
        match (self, field) {
            (Model, 7) => Some(Graph),
            (Graph, 1) => Some(Node),
            (Graph, 5) => Some(Tensor),
            (Graph, 15) => Some(SparseTensor),
            (Node, 5) => Some(Attribute),
            (Attribute, 5 | 10) => Some(Tensor),
            (Attribute, 6 | 11) => Some(Graph),
            (Attribute, 22 | 23) => Some(SparseTensor),
            (SparseTensor, 1 | 2) => Some(Tensor),
            (Tensor, 13) => Some(Entry),
            _ => None,
        }
    }
}

struct Walk<R> {
    reader: R,
    /// (key, value) of the `external_data` entries of the tensor being read.
    entries: Vec<(String, String)>,
    tensors: Vec<ExternalTensor>,
}

impl<R: Read + Seek> Walk<R> {
    /// Reads the fields of a `kind` message up to byte `end` of the file.
    fn message(&mut self, end: u64, kind: Message, depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(invalid("subgraphs nested too deep"));
        }
        let (mut key, mut value) = (None, None);
        if let Message::Tensor = kind {
            self.entries.clear();
        }
        while self.reader.stream_position()? < end {
            let tag = self.varint()?;
            let (field, wire) = (tag >> 3, tag & 7);
            match wire {
                0 => {
                    self.varint()?;
                }
                1 => self.skip(8)?,
                5 => self.skip(4)?,
                2 => {
                    let len = self.varint()?;
                    let start = self.reader.stream_position()?;
                    let stop = start
                        .checked_add(len)
                        .filter(|&stop| stop <= end)
                        .ok_or_else(|| invalid("a field runs past its message"))?;
                    match (kind, kind.child(field)) {
                        (Message::Entry, _) if field == 1 || field == 2 => {
                            let text = self.string(len)?;
                            if field == 1 {
                                key = Some(text);
                            } else {
                                value = Some(text);
                            }
                        }
                        (_, Some(child)) => self.message(stop, child, depth + 1)?,
                        (_, None) => self.skip(len)?,
                    }
                    if self.reader.stream_position()? != stop {
                        return Err(invalid("a field's length does not match its content"));
                    }
                }
                _ => return Err(invalid("an unknown wire type")),
            }
        }
        match kind {
            Message::Entry => {
                if let (Some(key), Some(value)) = (key, value) {
                    self.entries.push((key, value));
                }
            }
            Message::Tensor => {
                let entry =
                    |name: &str| self.entries.iter().find(|(k, _)| k == name).map(|(_, v)| v);
                if let Some(location) = entry("location") {
                    let number = |name: &str| match entry(name) {
                        None => Ok(None),
                        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
                            invalid(&format!(
                                "external data `{name}` is `{v}`, not a byte count"
                            ))
                        }),
                    };
                    self.tensors.push(ExternalTensor {
                        location: location.clone(),
                        offset: number("offset")?.unwrap_or(0),
                        length: number("length")?,
                    });
                }
                self.entries.clear();
            }
            _ => {}
        }
        Ok(())
    }

    fn varint(&mut self) -> io::Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let mut byte = [0u8];
            self.reader.read_exact(&mut byte)?;
            value |= u64::from(byte[0] & 0x7f) << shift;
            if byte[0] & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(invalid("a varint longer than 10 bytes"))
    }

    fn skip(&mut self, bytes: u64) -> io::Result<()> {
        let bytes = i64::try_from(bytes).map_err(|_| invalid("a field too long"))?;
        self.reader.seek(SeekFrom::Current(bytes)).map(|_| ())
    }

    fn string(&mut self, len: u64) -> io::Result<String> {
        if len > 4096 {
            return Err(invalid("an external data entry over 4096 bytes"));
        }
        let mut bytes = vec![0u8; len as usize];
        self.reader.read_exact(&mut bytes)?;
        String::from_utf8(bytes).map_err(|_| invalid("an external data entry that is not UTF-8"))
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not an ONNX graph as protobuf reads it: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::external_data_files;

    fn root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn graphs_with_their_weights_inside_name_no_file() {
        for graph in [
            "models/fixtures/tiny/decoder.onnx",
            "models/fixtures/tiny-sampler/sampler.onnx",
            "models/mar-tiny/tick.onnx",
        ] {
            assert_eq!(
                external_data_files(&root().join(graph)).unwrap(),
                Vec::<std::path::PathBuf>::new(),
                "{graph}"
            );
        }
    }

    /// A length-delimited protobuf field.
    fn field(number: u64, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for mut v in [number << 3 | 2, content.len() as u64] {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        out.extend_from_slice(content);
        out
    }

    /// A TensorProto named `name` whose data lies in `location`, with a
    /// varint field (data_type) and inline bytes (raw_data) to skip.
    fn tensor(name: &str, location: &str) -> Vec<u8> {
        let entry = |k: &str, v: &str| {
            field(
                13,
                &[field(1, k.as_bytes()), field(2, v.as_bytes())].concat(),
            )
        };
        [
            vec![0x10, 0x01], // data_type = 1, a varint
            field(8, name.as_bytes()),
            field(9, &[0u8; 300]), // raw_data, skipped
            entry("location", location),
            entry("offset", "0"),
        ]
        .concat()
    }

    #[test]
    fn external_data_is_found_in_initializers_attributes_and_subgraphs() {
        let body = field(5, &tensor("w_body", "body.data"));
        let attribute_graph = field(5, &[field(1, b"body"), field(6, &body)].concat());
        let attribute_tensor = field(
            5,
            &[field(1, b"value"), field(5, &tensor("c", "const.data"))].concat(),
        );
        let node = field(
            1,
            &[field(4, b"Loop"), attribute_graph, attribute_tensor].concat(),
        );
        let graph = [
            node,
            field(5, &tensor("w1", "weights.data")),
            field(5, &tensor("w2", "weights.data")),
            field(2, b"main"),
        ]
        .concat();
        let model = [vec![0x08, 0x08], field(7, &graph), field(2, b"producer")].concat();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("graph.onnx");
        std::fs::write(&path, model).unwrap();
        let names: Vec<String> = external_data_files(&path)
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["body.data", "const.data", "weights.data"]);
    }

    #[test]
    fn a_file_that_is_not_protobuf_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("text.onnx");
        std::fs::write(&path, b"\x0a\xff\xff\xff\xff\x0f not protobuf").unwrap();
        assert!(external_data_files(&path).is_err());
    }
}
