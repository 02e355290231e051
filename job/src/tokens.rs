//! Token shards: a tokenized corpus on disk, written once by `worker preprocess`, then memory-
//! mapped and read in place (never loaded whole) by whoever serves or trains on it.
//!
//! A shard holds whole documents, in corpus order. Its layout (little-endian):
//!
//! ```text
//!  0  magic       8 bytes   "TANDEMTK"
//!  8  version     u32       1
//! 12  id bytes    u32       2 (every id below 65,536) or 4
//! 16  tokenizer   32 bytes  SHA-256 of the tokenizer's content (vocabulary and normalisation)
//! 48  documents   u64
//! 56  tokens      u64
//! 64  ids         tokens x id bytes, zero-padded to a multiple of 8
//!     starts      (documents + 1) x u64: document d is tokens starts[d] .. starts[d + 1]
//!     words       ceil(tokens / 8) bytes: bit t % 8 of byte t / 8 set where token t starts a
//!                 word (what whole-word masking groups by)
//! ```
//!
//! The file's length follows from the counts, so a truncated shard is caught when it is opened,
//! as are a wrong magic number or version and document starts out of order. A writer fills
//! `<name>.partial` and renames it into place when it is complete: a shard that exists is whole.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The manifest of a preprocessed corpus, beside its shards; written last.
pub const MANIFEST: &str = "corpus.json";

/// One shard as the manifest lists it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ShardEntry {
    pub file: String,
    pub documents: u64,
    pub tokens: u64,
}

/// What `corpus.json` says.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Corpus {
    pub format: u32,
    pub tokenizer_sha256: String,
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<ShardEntry>,
}

/// A preprocessed corpus opened for reading: its shards mapped, checked against the manifest and
/// the tokenizer; documents numbered across the shards in order.
pub struct CorpusReader {
    shards: Vec<TokenShard>,
    /// The first document of each shard, and the total at the end.
    firsts: Vec<u64>,
    tokenizer: [u8; 32],
}

impl CorpusReader {
    /// Opens the corpus in `dir`. With `tokenizer` (its content hash, and its path for the
    /// message), every shard must have been written by that tokenizer; without, by the one
    /// `corpus.json` names (a reader with no tokenizer of its own: the coordinator).
    pub fn open(dir: &Path, tokenizer: Option<(&[u8; 32], &Path)>) -> Result<Self, ShardError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err(&path, format!("{e} (an incomplete or missing preprocessing output)")))?;
        let corpus: Corpus = serde_json::from_str(&text).map_err(|e| err(&path, e.to_string()))?;
        if corpus.format != VERSION {
            return Err(err(&path, format!("format version {}, this build reads {VERSION}", corpus.format)));
        }
        let own = hex32(&corpus.tokenizer_sha256).ok_or_else(|| {
            err(&path, format!("tokenizer_sha256 {:?} is not 64 hex digits", corpus.tokenizer_sha256))
        })?;
        let (hash, named) = tokenizer.unwrap_or((&own, &path));
        let (mut shards, mut firsts) = (Vec::new(), vec![0u64]);
        for s in &corpus.shards {
            if s.file.contains(['/', '\\']) || s.file == ".." {
                return Err(err(&path, format!("names the shard {:?}, not a file beside it", s.file)));
            }
            let shard = TokenShard::open(&dir.join(&s.file))?;
            shard.check_tokenizer(hash, named)?;
            let h = shard.header();
            if (h.documents, h.tokens) != (s.documents, s.tokens) {
                return Err(err(
                    shard.path(),
                    format!(
                        "holds {} documents and {} tokens where {MANIFEST} says {} and {}",
                        h.documents, h.tokens, s.documents, s.tokens
                    ),
                ));
            }
            firsts.push(firsts.last().expect("starts at 0") + h.documents);
            shards.push(shard);
        }
        Ok(CorpusReader { shards, firsts, tokenizer: own })
    }

    pub fn documents(&self) -> u64 {
        *self.firsts.last().expect("starts at 0")
    }

    /// The content hash of the tokenizer that wrote the corpus.
    pub fn tokenizer_hash(&self) -> [u8; 32] {
        self.tokenizer
    }

    fn locate(&self, d: u64) -> (&TokenShard, u64) {
        let s = self.firsts.partition_point(|&f| f <= d) - 1;
        (&self.shards[s], d - self.firsts[s])
    }

    /// Document `d`'s length in tokens; `None` past the last document.
    pub fn doc_len(&self, d: u64) -> Option<u64> {
        (d < self.documents()).then(|| {
            let (shard, k) = self.locate(d);
            let r = shard.document(k);
            r.end - r.start
        })
    }

    /// Document `d` (counted over the whole corpus): its ids and word starts.
    pub fn document(&self, d: u64) -> (Vec<u32>, Vec<bool>) {
        self.piece(d, 0..self.doc_len(d).unwrap_or(0))
    }

    /// Tokens `range` of document `d`: their ids and word starts.
    pub fn piece(&self, d: u64, range: Range<u64>) -> (Vec<u32>, Vec<bool>) {
        assert!(d < self.documents(), "document {d} of {}", self.documents());
        let (shard, k) = self.locate(d);
        let doc = shard.document(k);
        assert!(range.end <= doc.end - doc.start, "tokens {range:?} of a document of {}", doc.end - doc.start);
        let r = doc.start + range.start..doc.start + range.end;
        (r.clone().map(|t| shard.id(t)).collect(), r.map(|t| shard.word_start(t)).collect())
    }
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub const MAGIC: [u8; 8] = *b"TANDEMTK";
pub const VERSION: u32 = 1;
const HEADER_BYTES: u64 = 64;

/// An error about one shard file, naming it.
#[derive(Debug, thiserror::Error)]
#[error("token shard {}: {msg}", path.display())]
pub struct ShardError {
    pub path: PathBuf,
    pub msg: String,
}

fn err(path: &Path, msg: impl Into<String>) -> ShardError {
    ShardError { path: path.to_owned(), msg: msg.into() }
}

/// What a shard's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id_bytes: u32,
    pub tokenizer: [u8; 32],
    pub documents: u64,
    pub tokens: u64,
}

impl Header {
    fn ids_bytes(&self) -> u64 {
        (self.tokens * u64::from(self.id_bytes)).next_multiple_of(8)
    }

    /// The whole file's length.
    fn file_bytes(&self) -> Option<u64> {
        let starts = self.documents.checked_add(1)?.checked_mul(8)?;
        HEADER_BYTES.checked_add(self.ids_bytes())?.checked_add(starts)?.checked_add(self.tokens.div_ceil(8))
    }

    fn bytes(&self) -> [u8; HEADER_BYTES as usize] {
        let mut h = [0u8; HEADER_BYTES as usize];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.id_bytes.to_le_bytes());
        h[16..48].copy_from_slice(&self.tokenizer);
        h[48..56].copy_from_slice(&self.documents.to_le_bytes());
        h[56..64].copy_from_slice(&self.tokens.to_le_bytes());
        h
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes one shard, document by document, in constant memory: the ids stream to the file, the
/// document starts and word bits to two side files that [`ShardWriter::finish`] appends. A
/// writer dropped before `finish` (an error) removes its partial files.
pub struct ShardWriter {
    path: PathBuf,
    /// `<name>.partial` and its two side files (`.starts`, `.words`); empty once finished.
    partial: [PathBuf; 3],
    /// None once finished.
    files: Option<[BufWriter<File>; 3]>,
    header: Header,
    /// The word bits of the tokens past the last whole byte.
    pending: u8,
}

const IDS: usize = 0;
const STARTS: usize = 1;
const WORDS: usize = 2;

impl ShardWriter {
    /// Starts `path` (as `<path>.partial`, replacing a leftover one) for ids of `id_bytes` (2 or
    /// 4) from the tokenizer whose content hashes to `tokenizer`.
    pub fn create(path: &Path, tokenizer: [u8; 32], id_bytes: u32) -> Result<Self, ShardError> {
        if id_bytes != 2 && id_bytes != 4 {
            return Err(err(path, format!("ids of {id_bytes} bytes (2 or 4)")));
        }
        let name = path.file_name().ok_or_else(|| err(path, "not a file name"))?.to_string_lossy().into_owned();
        let partial =
            [".partial", ".partial.starts", ".partial.words"].map(|s| path.with_file_name(format!("{name}{s}")));
        let mut files = Vec::new();
        for p in &partial {
            let f = File::options().read(true).write(true).create(true).truncate(true).open(p);
            files.push(BufWriter::with_capacity(1 << 20, f.map_err(|e| err(p, e.to_string()))?));
        }
        let files: [BufWriter<File>; 3] = files.try_into().expect("three files");
        let header = Header { id_bytes, tokenizer, documents: 0, tokens: 0 };
        let mut w = ShardWriter { path: path.to_owned(), partial, files: Some(files), header, pending: 0 };
        w.write(IDS, &header.bytes())?;
        w.write(STARTS, &0u64.to_le_bytes())?;
        Ok(w)
    }

    fn write(&mut self, which: usize, bytes: &[u8]) -> Result<(), ShardError> {
        let file = &mut self.files.as_mut().expect("writing before finish")[which];
        file.write_all(bytes).map_err(|e| err(&self.partial[which], e.to_string()))
    }

    /// The tokens written so far.
    pub fn tokens(&self) -> u64 {
        self.header.tokens
    }

    /// Appends one document: its token ids and, for each, whether it starts a word.
    pub fn push(&mut self, ids: &[u32], word_starts: &[bool]) -> Result<(), ShardError> {
        assert_eq!(ids.len(), word_starts.len(), "one word flag per token");
        if self.header.id_bytes == 2 {
            if let Some(&big) = ids.iter().find(|&&id| id > u32::from(u16::MAX)) {
                return Err(err(&self.partial[IDS], format!("id {big} does not fit the shard's 2-byte ids")));
            }
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| (id as u16).to_le_bytes()).collect();
            self.write(IDS, &bytes)?;
        } else {
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| id.to_le_bytes()).collect();
            self.write(IDS, &bytes)?;
        }
        let mut whole = Vec::new();
        for (k, &w) in word_starts.iter().enumerate() {
            let t = self.header.tokens + k as u64;
            self.pending |= u8::from(w) << (t % 8);
            if t % 8 == 7 {
                whole.push(std::mem::take(&mut self.pending));
            }
        }
        self.write(WORDS, &whole)?;
        self.header.tokens += ids.len() as u64;
        self.header.documents += 1;
        self.write(STARTS, &self.header.tokens.to_le_bytes())?;
        Ok(())
    }

    /// Appends the starts and word bits, writes the final header, syncs, and renames the shard
    /// into place.
    pub fn finish(mut self) -> Result<Header, ShardError> {
        let pad = self.header.ids_bytes() - self.header.tokens * u64::from(self.header.id_bytes);
        self.write(IDS, &vec![0u8; pad as usize])?;
        if !self.header.tokens.is_multiple_of(8) {
            let last = self.pending;
            self.write(WORDS, &[last])?;
        }
        let header = self.header;
        let [ids, starts, words] = self.files.take().expect("finished once");
        fn io(p: &Path) -> impl Fn(std::io::Error) -> ShardError + '_ {
            move |e| err(p, e.to_string())
        }
        let mut file = ids.into_inner().map_err(|e| io(&self.partial[IDS])(e.into_error()))?;
        for (side, which) in [(starts, STARTS), (words, WORDS)] {
            let p = &self.partial[which];
            let mut side = side.into_inner().map_err(|e| io(p)(e.into_error()))?;
            side.seek(SeekFrom::Start(0)).map_err(io(p))?;
            std::io::copy(&mut side, &mut file).map_err(io(&self.partial[IDS]))?;
        }
        let partial = self.partial[IDS].clone();
        file.seek(SeekFrom::Start(0)).map_err(io(&partial))?;
        file.write_all(&header.bytes()).map_err(io(&partial))?;
        file.sync_all().map_err(io(&partial))?;
        std::fs::rename(&partial, &self.path).map_err(io(&partial))?;
        for p in &self.partial[1..] {
            let _ = std::fs::remove_file(p);
        }
        self.partial = Default::default();
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err(dir, e.to_string()))?;
        }
        Ok(header)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        for p in &self.partial {
            if !p.as_os_str().is_empty() {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// A shard, memory-mapped: its pages are read as they are used.
pub struct TokenShard {
    path: PathBuf,
    map: memmap2::Mmap,
    header: Header,
    starts_at: usize,
    words_at: usize,
}

impl TokenShard {
    /// Maps `path` and checks its header, its length and its document starts.
    pub fn open(path: &Path) -> Result<Self, ShardError> {
        let file = File::open(path).map_err(|e| err(path, e.to_string()))?;
        // SAFETY: the mapping is read-only and shards are written under another name and renamed
        // into place, never changed after: nothing writes the file while it is mapped. A file
        // truncated by someone else afterwards would fault this process, as reading it would
        // fail.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(path, e.to_string()))?;
        let b = &map[..];
        if b.len() < HEADER_BYTES as usize || b[..8] != MAGIC {
            return Err(err(path, "not a token shard (no TANDEMTK magic number)"));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(err(path, format!("format version {version}, this build reads {VERSION}")));
        }
        let header = Header {
            id_bytes: u32_at(b, 12),
            tokenizer: b[16..48].try_into().expect("32 bytes"),
            documents: u64_at(b, 48),
            tokens: u64_at(b, 56),
        };
        if header.id_bytes != 2 && header.id_bytes != 4 {
            return Err(err(path, format!("ids of {} bytes (2 or 4)", header.id_bytes)));
        }
        let due = header.file_bytes().ok_or_else(|| err(path, "counts too large for a file"))?;
        if b.len() as u64 != due {
            let what = if (b.len() as u64) < due { "truncated" } else { "longer than its header says" };
            return Err(err(path, format!("{what}: {} bytes where {due} are due", b.len())));
        }
        let starts_at = (HEADER_BYTES + header.ids_bytes()) as usize;
        let words_at = starts_at + (header.documents as usize + 1) * 8;
        let shard = TokenShard { path: path.to_owned(), header, starts_at, words_at, map };
        let mut prev = shard.start(0);
        if prev != 0 {
            return Err(err(path, format!("the first document starts at token {prev}, not 0")));
        }
        for d in 1..=header.documents as usize {
            let s = shard.start(d);
            if s < prev || s > header.tokens {
                return Err(err(path, format!("document {d} starts at token {s}, out of order")));
            }
            prev = s;
        }
        if prev != header.tokens {
            return Err(err(path, format!("the documents end at token {prev}, not {}", header.tokens)));
        }
        Ok(shard)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Refuses a shard made by another tokenizer than the one whose content hashes to `hash`.
    pub fn check_tokenizer(&self, hash: &[u8; 32], tokenizer: &Path) -> Result<(), ShardError> {
        if &self.header.tokenizer == hash {
            return Ok(());
        }
        Err(err(
            &self.path,
            format!(
                "was made with another tokenizer than {} (its vocabulary or normalisation differ)",
                tokenizer.display()
            ),
        ))
    }

    fn start(&self, d: usize) -> u64 {
        u64_at(&self.map, self.starts_at + 8 * d)
    }

    /// The token range of document `d`.
    pub fn document(&self, d: u64) -> Range<u64> {
        assert!(d < self.header.documents, "document {d} of {}", self.header.documents);
        self.start(d as usize)..self.start(d as usize + 1)
    }

    /// Token `t`'s id.
    pub fn id(&self, t: u64) -> u32 {
        assert!(t < self.header.tokens, "token {t} of {}", self.header.tokens);
        let at = (HEADER_BYTES + t * u64::from(self.header.id_bytes)) as usize;
        match self.header.id_bytes {
            2 => u32::from(u16::from_le_bytes([self.map[at], self.map[at + 1]])),
            _ => u32_at(&self.map, at),
        }
    }

    /// Whether token `t` starts a word.
    pub fn word_start(&self, t: u64) -> bool {
        assert!(t < self.header.tokens, "token {t} of {}", self.header.tokens);
        self.map[self.words_at + (t / 8) as usize] >> (t % 8) & 1 == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: [u8; 32] = [7; 32];

    fn docs() -> Vec<(Vec<u32>, Vec<bool>)> {
        vec![
            (vec![101, 7592, 2088, 102], vec![true, true, false, true]),
            (vec![101, 102], vec![true, true]),
            ((0..37).map(|i| 1000 + i * 17).collect(), (0..37).map(|i| i % 3 == 0).collect()),
        ]
    }

    fn write(path: &Path, id_bytes: u32, docs: &[(Vec<u32>, Vec<bool>)]) -> Result<Header, ShardError> {
        let mut w = ShardWriter::create(path, HASH, id_bytes)?;
        for (ids, words) in docs {
            w.push(ids, words)?;
        }
        w.finish()
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-tokens-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn documents_ids_and_word_starts_read_back_as_written() {
        let d = dir("roundtrip");
        for id_bytes in [2, 4] {
            let path = d.join(format!("s{id_bytes}.tok"));
            let header = write(&path, id_bytes, &docs()).unwrap();
            assert!(!d.join(format!("s{id_bytes}.tok.partial")).exists());
            assert!(!d.join(format!("s{id_bytes}.tok.partial.starts")).exists());
            let shard = TokenShard::open(&path).unwrap();
            assert_eq!(shard.header(), &header);
            assert_eq!((header.documents, header.tokens), (3, 43));
            for (k, (ids, words)) in docs().iter().enumerate() {
                let r = shard.document(k as u64);
                assert_eq!(r.clone().map(|t| shard.id(t)).collect::<Vec<_>>(), *ids);
                assert_eq!(r.map(|t| shard.word_start(t)).collect::<Vec<_>>(), *words);
            }
            shard.check_tokenizer(&HASH, Path::new("tokenizer.json")).unwrap();
            let other = shard.check_tokenizer(&[8; 32], Path::new("other/tokenizer.json")).unwrap_err();
            assert!(other.to_string().contains("another tokenizer than other/tokenizer.json"), "{other}");
            // The same documents give the same bytes.
            let again = d.join("again.tok");
            write(&again, id_bytes, &docs()).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
        }
    }

    #[test]
    fn damaged_shards_are_refused_with_their_name() {
        let d = dir("damaged");
        let path = d.join("good.tok");
        write(&path, 2, &docs()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let refused = |name: &str, bytes: &[u8], want: &str| {
            let p = d.join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = TokenShard::open(&p).err().unwrap_or_else(|| panic!("{name} was accepted")).to_string();
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        };
        refused("truncated.tok", &good[..good.len() - 3], "truncated");
        refused("short.tok", &good[..20], "no TANDEMTK magic");
        let mut bad = good.clone();
        bad[0] = b'X';
        refused("magic.tok", &bad, "no TANDEMTK magic");
        let mut bad = good.clone();
        bad[8] = 9;
        refused("version.tok", &bad, "format version 9");
        let mut bad = good.clone();
        bad.push(0);
        refused("long.tok", &bad, "longer than its header says");
        // Document 1's start (after the 43 two-byte ids, padded to 88 bytes) past the end.
        let mut bad = good.clone();
        bad[64 + 88 + 8] = 200;
        refused("starts.tok", &bad, "document 1 starts at token 200");
    }

    #[test]
    fn an_id_too_wide_for_the_shard_is_an_error_and_leaves_nothing() {
        let d = dir("wide");
        let path = d.join("wide.tok");
        let e = write(&path, 2, &[(vec![70_000], vec![true])]).unwrap_err().to_string();
        assert!(e.contains("id 70000 does not fit") && e.contains("wide.tok.partial"), "{e}");
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert!(!path.exists() && left.is_empty(), "a failed shard left files: {left:?}");
    }
}
