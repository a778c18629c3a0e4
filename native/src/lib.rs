//! The worker's native fast path: rounds of simple transfers, byte for byte as the Python
//! state machine (`ledger/machine.py`) applies them.
//!
//! A *simple transfer* is a `CreateTransaction` with postings, and maybe transaction
//! metadata, a reference and an idempotency key: no script, account metadata, explicit
//! timestamp or dry run, every field valid, amounts that fit in 38 digits. `Engine.decode`
//! reads a `RequestBatch` record and keeps it only when every request in it is one;
//! `Engine.apply` applies a partition's round of such records against the store, or answers
//! `None` when anything in it needs the general path (a redelivered request id or
//! idempotency key, an unknown ledger, a back-dated ledger, a volume of 2^126 or more, ...):
//! the caller then applies the same round in Python. Nothing is half done: a round is
//! applied here whole or not at all.
//!
//! Everything this writes — the log entry's Avro, its Formance hash, the rejection, every
//! store key and value — must equal what the Python path writes; `tests/streams/test_native.py`
//! runs both on the same requests and compares the bytes. The Python path stays the
//! definition: change it first, then this, never this alone.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use sha2::{Digest, Sha256};

mod kafka;
mod store;
use kafka::{Kafka, Record};
use store::{Store, StoreBatch, StoreIter};

// A round allocates and frees tens of thousands of small keys, values and strings; glibc's
// malloc/free were ~10% of the worker's CPU under load (perf), mimalloc's a fraction of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const POSTINGS_MAX: usize = 1_000;
const ADDRESS_BYTES_MAX: usize = 1_024;
const REQUEST_ID_MAX: usize = 256;
// `ledger.limits`, in bytes here (Python counts characters: a byte bound is stricter).
const METADATA_ENTRIES_MAX: usize = 1_000;
const METADATA_KEY_BYTES_MAX: usize = 1_024;
const METADATA_VALUE_BYTES_MAX: usize = 64 * 1024;
const REFERENCE_BYTES_MAX: usize = 1_024;
const IDEMPOTENCY_BYTES_MAX: usize = 1_024;
// Amounts of more digits take the Python path (arbitrary precision); 38 digits fit an i128.
const AMOUNT_DIGITS_MAX: usize = 38;
const WORLD: &str = "world";
const EFFECTIVE_VOLUMES_FEATURE: &str = "MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES";
// Python's datetime range (years 1..9999) in microseconds: fastavro refuses a
// timestamp-micros outside it, so such a record is the Python path's to refuse.
const MICROS_MIN: i64 = -62_135_596_800_000_000;
const MICROS_MAX: i64 = 253_402_300_799_999_999;

/// FxHash (rustc's, version 2): the maps here are keyed by store keys the engine built
/// itself, so SipHash's protection against chosen collisions buys nothing for its cost.
type FxMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;
type FxSet<K> = HashSet<K, rustc_hash::FxBuildHasher>;

/// A key of the engine's cache, its bytes in the table's slot when it is short (a store
/// key of the hot kinds is ~30-45 bytes): a lookup compares it where the probe landed
/// instead of following a pointer to the heap, one cache miss fewer in a table of
/// hundreds of thousands of entries.
type CacheKey = smallvec::SmallVec<[u8; 48]>;

// ------------------------------------------------------------------------ requests

struct Posting {
    source: String,
    destination: String,
    amount: i128,
    asset: String,
}

struct Transfer {
    // Shared with the outcomes (`Outcome`): a clone is a count, not a copy.
    request_id: Arc<str>,
    ledger: Arc<str>,
    postings: Vec<Posting>,
    /// Transaction metadata in the record's order (Python's dict order).
    metadata: Vec<(String, String)>,
    reference: Option<String>,
    /// (key, hash of the input) when the request carries an idempotency key.
    idempotency: Option<(String, String)>,
    force: bool,
}

/// One `ledger.requests` record whose requests are all simple transfers.
#[pyclass(frozen, module = "streamledger_native")]
struct Batch {
    transfers: Vec<Transfer>,
    /// The record's key and value, for the Python path when a round falls back to it.
    #[pyo3(get)]
    key: PyObject,
    #[pyo3(get)]
    payload: PyObject,
    #[pyo3(get)]
    postings: usize,
}

#[pymethods]
impl Batch {
    fn __len__(&self) -> usize {
        self.transfers.len()
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn long(&mut self) -> Option<i64> {
        let mut value: u64 = 0;
        let mut shift = 0;
        loop {
            let byte = *self.data.get(self.at)?;
            self.at += 1;
            if shift > 63 {
                return None;
            }
            value |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        Some(((value >> 1) as i64) ^ -((value & 1) as i64))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let length = usize::try_from(self.long()?).ok()?;
        let end = self.at.checked_add(length)?;
        let slice = self.data.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn boolean(&mut self) -> Option<bool> {
        let byte = *self.data.get(self.at)?;
        self.at += 1;
        match byte {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// The item count of the next array/map block (a negative count carries its size).
    fn block(&mut self) -> Option<usize> {
        let count = self.long()?;
        if count < 0 {
            self.long()?;
            return usize::try_from(count.checked_neg()?).ok();
        }
        usize::try_from(count).ok()
    }

    fn empty_map(&mut self) -> Option<()> {
        (self.block()? == 0).then_some(())
    }

    /// Every item of an array or map, block by block: `each` reads one (None stops all).
    fn items(&mut self, mut each: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        loop {
            let count = self.block()?;
            if count == 0 {
                return Some(());
            }
            for _ in 0..count {
                each(self)?;
            }
        }
    }
}

fn is_segment_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
}

/// `ledger.model.ADDRESS_PATTERN`, matched whole: `[a-zA-Z0-9_-]+(:[a-zA-Z0-9_-]+)*`, at most
/// 1024 bytes.
fn valid_address(text: &str) -> bool {
    text.len() <= ADDRESS_BYTES_MAX && !text.is_empty() && text.split(':').all(|segment| {
        !segment.is_empty() && segment.bytes().all(is_segment_byte)
    })
}

/// `ledger.model.ASSET_PATTERN`, matched whole: `[A-Z][A-Z0-9]{0,16}(_[A-Z]{1,16})?(/[0-9]{1,6})?`.
fn valid_asset(text: &str) -> bool {
    // How many bytes from `at` on are `accepted`.
    fn span(bytes: &[u8], at: usize, accepted: fn(&u8) -> bool) -> usize {
        bytes[at..].iter().take_while(|b| accepted(b)).count()
    }
    let bytes = text.as_bytes();
    if !bytes.first().is_some_and(u8::is_ascii_uppercase) {
        return false;
    }
    let mut at = 1;
    let name = span(bytes, at, |b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if name > 16 {
        return false;
    }
    at += name;
    for (separator, accepted, most) in [(b'_', u8::is_ascii_uppercase as fn(&u8) -> bool, 16), (b'/', u8::is_ascii_digit, 6)] {
        if bytes.get(at) == Some(&separator) {
            let run = span(bytes, at + 1, accepted);
            if !(1..=most).contains(&run) {
                return false;
            }
            at += 1 + run;
        }
    }
    at == bytes.len()
}

/// `ledger.model.LEDGER_NAME_PATTERN`, matched whole: `[0-9a-zA-Z_-]{1,63}`, not reserved.
fn valid_ledger(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text.bytes().all(is_segment_byte)
        && !matches!(text, "_" | "_info" | "_healthcheck")
}

/// Printable ASCII without `"` and `\`: written verbatim in every encoding used here.
fn plain_text(text: &str) -> bool {
    text.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

fn parse_amount(text: &str) -> Option<i128> {
    if text.is_empty() || text.len() > AMOUNT_DIGITS_MAX || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Kafka's `Utils.murmur2`, as `streams.topics.murmur2`.
fn murmur2(data: &[u8]) -> i32 {
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let rest = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m) ^ k;
    }
    if rest.len() == 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    h as i32
}

fn partition_for(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

fn read_transfer(reader: &mut Reader, partition: i32, partitions: i32) -> Option<Transfer> {
    let request_id = reader.text()?;
    let ledger = reader.text()?;
    if request_id.is_empty() || request_id.len() > REQUEST_ID_MAX || !plain_text(request_id) {
        return None;
    }
    if !valid_ledger(ledger) || partition_for(ledger.as_bytes(), partitions) != partition {
        return None;
    }
    if reader.long()? != 1 {
        return None; // not a CreateTransaction
    }
    if reader.long()? != 1 {
        return None; // no postings (a script)
    }
    let mut postings = Vec::new();
    reader.items(|reader| {
        let source = reader.text()?;
        let destination = reader.text()?;
        let amount = parse_amount(reader.text()?)?;
        let asset = reader.text()?;
        if !valid_address(source) || !valid_address(destination) || !valid_asset(asset) {
            return None;
        }
        postings.push(Posting {
            source: source.to_owned(),
            destination: destination.to_owned(),
            amount,
            asset: asset.to_owned(),
        });
        (postings.len() <= POSTINGS_MAX).then_some(())
    })?;
    if postings.is_empty() {
        return None;
    }
    if reader.long()? != 0 {
        return None; // a script
    }
    let reference = match reader.long()? {
        0 => None,
        1 => {
            let text = reader.text()?;
            // "" is no reference to the Python path; a long one is its to refuse.
            if text.is_empty() || text.len() > REFERENCE_BYTES_MAX {
                return None;
            }
            Some(text.to_owned())
        }
        _ => return None,
    };
    let mut metadata: Vec<(String, String)> = Vec::new();
    reader.items(|reader| {
        let key = reader.text()?;
        let value = reader.text()?;
        if key.len() > METADATA_KEY_BYTES_MAX || value.len() > METADATA_VALUE_BYTES_MAX
            || metadata.len() >= METADATA_ENTRIES_MAX || metadata.iter().any(|(k, _)| k == key)
        {
            return None; // too large, or a key twice (the last one wins in Python)
        }
        metadata.push((key.to_owned(), value.to_owned()));
        Some(())
    })?;
    reader.empty_map()?; // account_metadata
    if reader.long()? != 0 {
        return None; // an explicit timestamp
    }
    let force = reader.boolean()?;
    let (idempotency_key, idempotency_hash) = (reader.text()?, reader.text()?);
    let idempotency = if idempotency_key.is_empty() {
        if !idempotency_hash.is_empty() {
            return None; // a hash without a key: the Python path's
        }
        None
    } else {
        if idempotency_key.len() > IDEMPOTENCY_BYTES_MAX || idempotency_hash.len() > IDEMPOTENCY_BYTES_MAX {
            return None;
        }
        Some((idempotency_key.to_owned(), idempotency_hash.to_owned()))
    };
    if reader.boolean()? {
        return None; // a dry run
    }
    let received_at = reader.long()?;
    if !(MICROS_MIN..=MICROS_MAX).contains(&received_at) {
        return None;
    }
    reader.text()?; // reply_to
    Some(Transfer {
        request_id: request_id.into(), ledger: ledger.into(), postings, metadata, reference, idempotency, force,
    })
}

// ------------------------------------------------------------------------- encoding

fn push_long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn push_avro_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    push_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

fn push_quoted(out: &mut Vec<u8>, text: &str) {
    // Every string reaching here passed `plain_text`, `valid_*` or is ours: no escapes.
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// A JSON string as orjson (and Python's json with ensure_ascii=False) writes it: UTF-8 kept,
/// `"` `\\` and control characters escaped (`\\b \\t \\n \\f \\r` short, others `\\u00xx`).
fn push_json(out: &mut Vec<u8>, text: &str) {
    push_escaped(out, text, false)
}

/// The same as Go's encoding/json writes it (`ledger.gojson`): also `<` `>` `&` and
/// U+2028/U+2029 as `\\u` escapes.
fn push_go_json(out: &mut Vec<u8>, text: &str) {
    push_escaped(out, text, true)
}

fn push_escaped(out: &mut Vec<u8>, text: &str, go: bool) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{08}' => out.extend_from_slice(b"\\b"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\u{0c}' => out.extend_from_slice(b"\\f"),
            '\r' => out.extend_from_slice(b"\\r"),
            c if (c as u32) < 0x20 || (go && matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}')) => {
                let n = c as u32;
                out.extend_from_slice(b"\\u");
                for shift in [12, 8, 4, 0] {
                    out.push(HEX[(n >> shift & 15) as usize]);
                }
            }
            c => {
                let mut buffer = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// A `dict[str, str]` as JSON, in the given order (Go: sorted by key, as its maps are).
fn push_map(out: &mut Vec<u8>, map: &[(String, String)], go: bool) {
    out.push(b'{');
    let mut entries: Vec<&(String, String)> = map.iter().collect();
    if go {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
    }
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_escaped(out, key, go);
        out.push(b':');
        push_escaped(out, value, go);
    }
    out.push(b'}');
}

/// Postings as the log's JSON has them (objects) or as the stored transaction (lists).
fn push_postings(out: &mut Vec<u8>, postings: &[Posting], objects: bool) {
    out.push(b'[');
    for (i, p) in postings.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(if objects { b"{\"source\":" } else { b"[" });
        push_quoted(out, &p.source);
        out.extend_from_slice(if objects { b",\"destination\":" } else { b"," });
        push_quoted(out, &p.destination);
        out.extend_from_slice(if objects { b",\"amount\":" } else { b"," });
        push_int(out, p.amount);
        out.extend_from_slice(if objects { b",\"asset\":" } else { b"," });
        push_quoted(out, &p.asset);
        out.push(if objects { b'}' } else { b']' });
    }
    out.push(b']');
}

/// {account: {asset: volumes}}: `volumes_json` (input, output, balance) for the log, or
/// the stored transaction's [input, output]. `post` is grouped by account.
fn push_volumes(out: &mut Vec<u8>, post: &[(&str, &str, i128, i128)], objects: bool) {
    out.push(b'{');
    for (i, &(account, asset, input, output)) in post.iter().enumerate() {
        let same_account = i > 0 && post[i - 1].0 == account;
        if same_account {
            out.push(b',');
        } else {
            if i > 0 {
                out.extend_from_slice(b"},");
            }
            push_quoted(out, account);
            out.extend_from_slice(b":{");
        }
        push_quoted(out, asset);
        out.extend_from_slice(if objects { b":{\"input\":" } else { b":[" });
        push_int(out, input);
        out.extend_from_slice(if objects { b",\"output\":" } else { b"," });
        push_int(out, output);
        if objects {
            out.extend_from_slice(b",\"balance\":");
            push_int(out, input - output);
        }
        out.push(if objects { b'}' } else { b']' });
    }
    if !post.is_empty() {
        out.push(b'}');
    }
    out.push(b'}');
}

/// Stored volumes: `input,output`.
fn push_volumes_value(out: &mut Vec<u8>, input: i128, output: i128) {
    push_int(out, input);
    out.push(b',');
    push_int(out, output);
}

fn push_int(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(data: &[u8]) -> String {
    let mut out = vec![0u8; data.len().div_ceil(3) * 4];
    base64_into(&mut out, data);
    String::from_utf8(out).expect("base64 is ASCII")
}

/// Standard base64 with padding into `out`, exactly `data.len().div_ceil(3) * 4` bytes.
fn base64_into(out: &mut [u8], data: &[u8]) {
    for (chunk, quad) in data.chunks(3).zip(out.chunks_mut(4)) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for (i, slot) in quad.iter_mut().enumerate() {
            *slot = if i <= chunk.len() { BASE64[(n >> (18 - 6 * i) & 63) as usize] } else { b'=' };
        }
    }
}

fn unbase64(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let mut n: u32 = 0;
        let mut pad = 0;
        for &b in chunk {
            let v = match b {
                b'=' => {
                    pad += 1;
                    0
                }
                _ if pad > 0 => return None,
                _ => BASE64.iter().position(|&c| c == b)? as u32,
            };
            n = n << 6 | v;
        }
        if pad > 2 {
            return None;
        }
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

/// Go's `time.RFC3339Nano` of a UTC time in microseconds (`ledger.timeutil.format_rfc3339`).
fn rfc3339(micros: i64) -> String {
    let seconds = micros.div_euclid(1_000_000);
    let fraction = micros.rem_euclid(1_000_000);
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    );
    if fraction != 0 {
        let digits = format!("{fraction:06}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    key_into(&mut out, parts);
    out
}

/// `key` into a reused buffer: the key to look something up with, allocated only when kept.
fn key_into<'k>(out: &'k mut Vec<u8>, parts: &[&[u8]]) -> &'k [u8] {
    out.clear();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(part);
    }
    out
}

fn moment(timestamp: i64, transaction_id: i64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&((timestamp as i128 + (1i128 << 63)) as u64).to_be_bytes());
    out[8..].copy_from_slice(&(transaction_id as u64).to_be_bytes());
    out
}

// ---------------------------------------------------------------------------- state

#[derive(Clone, Copy)]
struct Head {
    last_log_id: i64,
    last_hash: Option<[u8; 32]>,
    last_transaction_id: i64,
    last_date: i64,
    max_timestamp: Option<i64>,
}

impl Head {
    const NONE: Head = Head { last_log_id: 0, last_hash: None, last_transaction_id: 0, last_date: 0, max_timestamp: None };

    fn parse(raw: &[u8]) -> Option<Head> {
        let value: serde_json::Value = serde_json::from_slice(raw).ok()?;
        let v = value.as_array()?;
        let no_hash = v.get(4)?.as_bool()?;
        Some(Head {
            last_log_id: v.first()?.as_i64()?,
            last_hash: if no_hash { None } else { Some(unbase64(v.get(1)?.as_str()?)?.try_into().ok()?) },
            last_transaction_id: v.get(2)?.as_i64()?,
            last_date: v.get(3)?.as_i64()?,
            max_timestamp: match v.get(5) {
                None | Some(serde_json::Value::Null) => None,
                Some(other) => Some(other.as_i64()?),
            },
        })
    }

    fn encode(&self) -> Vec<u8> {
        // [last_log_id, base64(hash or b""), last_transaction_id, last_date, hash is None, max_timestamp]
        let mut out = Vec::with_capacity(96);
        out.push(b'[');
        push_int(&mut out, self.last_log_id);
        out.push(b',');
        push_quoted(&mut out, &base64(self.last_hash.as_ref().map_or(&[][..], |h| &h[..])));
        out.push(b',');
        push_int(&mut out, self.last_transaction_id);
        out.push(b',');
        push_int(&mut out, self.last_date);
        out.extend_from_slice(if self.last_hash.is_none() { b",true," } else { b",false," });
        match self.max_timestamp {
            Some(timestamp) => push_int(&mut out, timestamp),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b']');
        out
    }
}

/// Decoded values of the hot kinds (what the store holds, or Absent). A head is boxed:
/// there is one per ledger, while the cache holds up to `cache_max` volumes and accounts,
/// each entry as large as the largest variant (48 bytes instead of 96).
#[derive(Clone)]
enum Value {
    Ledger { effective_volumes: bool },
    Head(Box<Head>),
    Volumes(i128, i128),
    Account { first_usage: i64 },
    Absent,
}

fn parse_volumes(raw: &[u8]) -> Option<(i128, i128)> {
    let text = std::str::from_utf8(raw).ok()?;
    let (input, output) = text.split_once(',')?;
    let input = parse_amount(input)?;
    let output = parse_amount(output)?;
    (input < i128::MAX / 2 && output < i128::MAX / 2).then_some((input, output))
}

fn parse_ledger(raw: &[u8]) -> Option<Value> {
    let value: serde_json::Value = serde_json::from_slice(raw).ok()?;
    let features = value.as_array()?.get(4)?.as_object()?;
    let disabled = features.get(EFFECTIVE_VOLUMES_FEATURE).and_then(|v| v.as_str()) == Some("DISABLED");
    Some(Value::Ledger { effective_volumes: !disabled })
}

fn parse_account(raw: &[u8]) -> Option<Value> {
    let value: serde_json::Value = serde_json::from_slice(raw).ok()?;
    Some(Value::Account { first_usage: value.as_array()?.get(2)?.as_i64()? })
}

/// A stored value of a hot kind, by its key's kind letter.
fn parse_stored(key: &[u8], raw: &[u8]) -> Option<Value> {
    match key.first()? {
        b'L' => parse_ledger(raw),
        b'H' => Head::parse(raw).map(|head| Value::Head(Box::new(head))),
        b'V' => parse_volumes(raw).map(|(input, output)| Value::Volumes(input, output)),
        b'A' => parse_account(raw),
        _ => None,
    }
}

// ---------------------------------------------------------------------------- rounds

/// A request's outcome: a log entry (to the committed topic) or a rejection.
struct Outcome {
    rejected: bool,
    ledger: Arc<str>,
    request_id: Arc<str>,
    value: Vec<u8>,
}

/// The topics a partition's outcomes go to, as Python strings and as C strings.
struct Topics {
    committed: PyObject,
    rejected: PyObject,
    names: [CString; 2],
}

/// One partition's round, applied: what to publish, and the store writes to make once the
/// round's Kafka transaction committed.
#[pyclass(module = "streamledger_native")]
struct Round {
    outcomes: Vec<Outcome>,
    topics: Arc<Topics>,
    partition: i32,
    emission: PyObject,
    #[pyo3(get)]
    committed: usize,
    #[pyo3(get)]
    rejected: usize,
    #[pyo3(get)]
    per_ledger: Py<PyDict>,
    /// Its store writes (taken by the store's writer thread: `Store.write_round`).
    writes: Writes,
    /// The request ids, references and idempotency keys among them.
    claims: Vec<Vec<u8>>,
    number: u64,
}

/// Emptied lists of a round's writes, for the next rounds: a round does not ask the
/// allocator for a fresh multi-megabyte block, and the kernel for fresh pages, every time.
/// The store's writer thread gives them back once it wrote them (`Store.write_round`).
static SPARE_WRITES: std::sync::Mutex<Vec<Writes>> = std::sync::Mutex::new(Vec::new());

/// A round's store writes, every key and value in one buffer. A round makes ~6 per
/// request; as a `Vec` of `(Vec<u8>, Vec<u8>)` each was two allocations on the round's
/// thread and two frees on the store's writer thread (mimalloc hands a block freed by
/// another thread back to its owner through an atomic list it collects later).
#[derive(Default)]
pub(crate) struct Writes {
    bytes: Vec<u8>,
    /// Where each write is in `bytes`: (start, key length, value length).
    entries: Vec<(usize, u32, u32)>,
}

impl Writes {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.put_with(key, |out| out.extend_from_slice(value));
    }

    /// A write of `key` whose value `value` appends to the buffer it is given.
    fn put_with(&mut self, key: &[u8], value: impl FnOnce(&mut Vec<u8>)) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        value(&mut self.bytes);
        let value_length = self.bytes.len() - start - key.len();
        self.entries.push((start, key.len() as u32, value_length as u32));
    }


    /// Every (key, value), in the order they were made (or sorted: `sort`).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries.iter().map(|&(start, key_length, value_length)| {
            let value_start = start + key_length as usize;
            (&self.bytes[start..value_start], &self.bytes[value_start..value_start + value_length as usize])
        })
    }

    /// The bytes of every key and value.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// In key order; stable, so a key written twice would still end with its last value.
    fn sort(&mut self) {
        let bytes = &self.bytes;
        let key = |&(start, key_length, _): &(usize, u32, u32)| &bytes[start..start + key_length as usize];
        self.entries.sort_by(|a, b| key(a).cmp(key(b)));
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
    }

    fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

fn spare_writes() -> Writes {
    SPARE_WRITES.lock().unwrap().pop().unwrap_or_default()
}

/// Empty `writes` and keep it for a next round, unless it holds no memory to reuse (what a
/// round leaves behind once the store's writer thread took its writes: a pool of those
/// would hand the next rounds lists grown from nothing).
pub(crate) fn recycle_writes(mut writes: Writes) {
    if writes.capacity() == 0 {
        return;
    }
    writes.clear();
    let mut spare = SPARE_WRITES.lock().unwrap();
    if spare.len() < 4 {
        spare.push(writes);
    }
}

impl Round {
    fn emission(&self, py: Python, outcome: &Outcome) -> PyResult<PyObject> {
        let topic = if outcome.rejected { &self.topics.rejected } else { &self.topics.committed };
        self.emission.call1(py, (
            topic, self.partition, PyBytes::new_bound(py, outcome.ledger.as_bytes()),
            PyBytes::new_bound(py, &outcome.value), &*outcome.request_id,
        ))
    }

    /// The index of the last outcome of each topic.
    fn lasts(&self) -> [Option<usize>; 2] {
        let last = |rejected: bool| self.outcomes.iter().rposition(|outcome| outcome.rejected == rejected);
        [last(false), last(true)]
    }
}

#[pymethods]
impl Round {
    /// Put every write of the round into a rocksdict `WriteBatch`.
    fn write_into(&self, batch: &Bound<PyAny>) -> PyResult<()> {
        let py = batch.py();
        let put = batch.getattr("put")?;
        for (key, value) in self.writes.iter() {
            put.call1((PyBytes::new_bound(py, key), PyBytes::new_bound(py, value)))?;
        }
        Ok(())
    }

    /// Every outcome as an `Emission` (the worker produces them with `produce` instead).
    #[getter]
    fn emissions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty_bound(py);
        for outcome in &self.outcomes {
            list.append(self.emission(py, outcome)?)?;
        }
        Ok(list)
    }

    /// Produce the outcomes from index `start` on into `producer` (a confluent-kafka
    /// `Producer` in a transaction), all but the last of each topic: those are
    /// `last_emissions`, for `Producer.produce` with a delivery callback. -> where it
    /// stopped (the number of outcomes when done), and librdkafka's error code and text
    /// when it stopped early (`_QUEUE_FULL`: poll, then go on from there).
    fn produce(&self, kafka: PyRef<Kafka>, producer: &Bound<PyAny>, start: usize) -> PyResult<(usize, Option<(i32, String)>)> {
        let lasts = self.lasts();
        let topics = &self.topics;
        kafka.produce(producer, self.partition, start.min(self.outcomes.len())..self.outcomes.len(), |at| {
            if lasts.contains(&Some(at)) {
                return None;
            }
            let outcome = &self.outcomes[at];
            Some(Record {
                topic: &topics.names[outcome.rejected as usize], key: outcome.ledger.as_bytes(), value: &outcome.value,
                request_id: outcome.request_id.as_bytes(),
            })
        })
    }

    /// The last outcome of each topic as an `Emission`, in order.
    fn last_emissions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let mut lasts: Vec<usize> = self.lasts().into_iter().flatten().collect();
        lasts.sort_unstable();
        let list = PyList::empty_bound(py);
        for at in lasts {
            list.append(self.emission(py, &self.outcomes[at])?)?;
        }
        Ok(list)
    }
}

struct Fallback;

/// A request id, reference or idempotency key: a key whose presence is what counts
/// (taken or not), never read for its value.
pub(crate) fn is_claim(key: &[u8]) -> bool {
    matches!(key.first(), Some(b'Q' | b'R' | b'I'))
}

/// Where (account, asset) is in a transfer's list of the pairs it moves.
fn pair_of(pairs: &[(&str, &str, (i128, i128))], account: &str, asset: &str) -> usize {
    pairs.iter().position(|(a, s, _)| *a == account && *s == asset).expect("every pair listed")
}

/// Buffers a round's transfers reuse, one after the other (each cleared before use): the
/// keys they look things up with and the JSON they build only to copy or hash.
#[derive(Default)]
struct Scratch {
    key: Vec<u8>,
    postings: Vec<u8>,
    memento: Vec<u8>,
    transaction: Vec<u8>,
    line: Vec<u8>,
    volumes: Vec<u8>,
    data: Vec<u8>,
}

/// A round in progress. It changes the engine's cache in place, remembering what each
/// key held before (`undo`), so a round that is never committed is rolled back.
struct Work<'e, 'b> {
    cache: &'e mut FxMap<CacheKey, (Value, u64)>,
    number: u64,
    undo: Vec<(Vec<u8>, Option<(Value, u64)>)>,
    /// Request ids and idempotency keys answered: in the store (fetched) or by this round.
    answered: FxSet<Vec<u8>>,
    /// Reference keys taken: in the store (fetched) or by this round.
    references: FxSet<Vec<u8>>,
    seen: FxSet<&'b str>,
    writes: Writes,
    log_header: &'e [u8],
    rejection_header: &'e [u8],
    /// The last date written out (a round's transfers mostly share one).
    date_text: (i64, String),
}

impl<'b> Work<'_, 'b> {
    fn value(&self, key: &[u8]) -> Result<&Value, Fallback> {
        // Every key a round reads was fetched into the cache before it started.
        self.cache.get(key).map(|(value, _)| value).ok_or(Fallback)
    }

    /// The key's value is now `value`; its previous one goes to the undo log the first
    /// time this round changes it (the key is copied only then, or when it is new).
    fn set(&mut self, key: &[u8], value: Value) {
        match self.cache.get_mut(key) {
            Some(slot) => {
                let first_change = slot.1 != self.number;
                let previous = std::mem::replace(slot, (value, self.number));
                if first_change {
                    self.undo.push((key.to_vec(), Some(previous)));
                }
            }
            None => {
                self.undo.push((key.to_vec(), None));
                self.cache.insert(CacheKey::from_slice(key), (value, self.number));
            }
        }
    }

    fn volumes(&self, key: &[u8]) -> Result<(i128, i128), Fallback> {
        match self.value(key)? {
            Value::Volumes(input, output) => Ok((*input, *output)),
            Value::Absent => Ok((0, 0)),
            _ => Err(Fallback),
        }
    }

    fn head(&self, key: &[u8]) -> Result<Head, Fallback> {
        match self.value(key)? {
            Value::Head(head) => Ok(**head),
            Value::Absent => Ok(Head::NONE),
            _ => Err(Fallback),
        }
    }

    /// `s`: the round's scratch buffers (a field of `Work` could not be borrowed beside it).
    fn transfer(&mut self, t: &'b Transfer, now: i64, s: &mut Scratch) -> Result<Outcome, Fallback> {
        let ledger = t.ledger.as_bytes();
        // A request id already answered is replayed by the Python path.
        if !self.seen.insert(&*t.request_id)
            || (!self.answered.is_empty() && self.answered.contains(key_into(&mut s.key, &[b"Q", t.request_id.as_bytes()])))
        {
            return Err(Fallback);
        }
        // An idempotency key used before (in the store or this round) is a replay, or a
        // refusal of a different input: the Python path's.
        if let Some((idempotency_key, _)) = &t.idempotency {
            if self.answered.contains(key_into(&mut s.key, &[b"I", ledger, idempotency_key.as_bytes()])) {
                return Err(Fallback);
            }
        }
        let effective_volumes = match self.value(key_into(&mut s.key, &[b"L", ledger]))? {
            Value::Ledger { effective_volumes } => *effective_volumes,
            _ => return Err(Fallback), // LEDGER_NOT_FOUND: the Python path rejects it
        };
        if let Some(reference) = &t.reference {
            if self.references.contains(key_into(&mut s.key, &[b"R", ledger, reference.as_bytes()])) {
                return Ok(self.conflict(t, reference, now));
            }
        }
        // Every (account, asset) the postings move, in order of first appearance, with its
        // volumes before the transfer.
        let mut pairs: Vec<(&str, &str, (i128, i128))> = Vec::with_capacity(2 * t.postings.len());
        for p in &t.postings {
            for account in [p.source.as_str(), p.destination.as_str()] {
                if !pairs.iter().any(|(a, s, _)| *a == account && *s == p.asset) {
                    let volumes = self.volumes(key_into(&mut s.key, &[b"V", ledger, account.as_bytes(), p.asset.as_bytes()]))?;
                    pairs.push((account, p.asset.as_str(), volumes));
                }
            }
        }
        if !t.force {
            // `_check_funds`: postings in order, balances tracked across them.
            let mut balances: Vec<i128> = pairs.iter().map(|(.., (input, output))| input - output).collect();
            for p in &t.postings {
                let source = pair_of(&pairs, &p.source, &p.asset);
                let available = balances[source];
                if p.source != WORLD && available < p.amount {
                    return Ok(self.insufficient(t, p, available.max(0), now));
                }
                balances[source] = balances[source].checked_sub(p.amount).ok_or(Fallback)?;
                let destination = pair_of(&pairs, &p.destination, &p.asset);
                balances[destination] = balances[destination].checked_add(p.amount).ok_or(Fallback)?;
            }
        }
        let head = self.head(key_into(&mut s.key, &[b"H", ledger]))?;
        let date = now.max(head.last_date);
        let timestamp = date;
        if head.max_timestamp.is_some_and(|latest| timestamp < latest) {
            return Err(Fallback); // back-dated: effective volumes move later entries
        }
        let transaction_id = head.last_transaction_id + 1;
        let log_id = head.last_log_id + 1;
        // Post-commit volumes: (account, asset, input, output), grouped by account in
        // order of first appearance, assets in order of first appearance within each.
        let mut post: Vec<(&str, &str, i128, i128)> = Vec::with_capacity(pairs.len());
        for p in &t.postings {
            for (account, is_source) in [(p.source.as_str(), true), (p.destination.as_str(), false)] {
                let asset = p.asset.as_str();
                let held = post.iter().position(|(a, s, ..)| *a == account && *s == asset);
                let (input, output) = match held {
                    Some(i) => (post[i].2, post[i].3),
                    None => pairs[pair_of(&pairs, account, asset)].2,
                };
                let updated = if is_source {
                    (input, output.checked_add(p.amount).ok_or(Fallback)?)
                } else {
                    (input.checked_add(p.amount).ok_or(Fallback)?, output)
                };
                if updated.0 >= i128::MAX / 2 || updated.1 >= i128::MAX / 2 {
                    return Err(Fallback);
                }
                match held {
                    Some(i) => post[i] = (account, asset, updated.0, updated.1),
                    None => {
                        // After the account's last asset, or last when the account is new.
                        let at = post.iter().rposition(|(a, ..)| *a == account).map_or(post.len(), |i| i + 1);
                        post.insert(at, (account, asset, updated.0, updated.1));
                    }
                }
            }
        }
        // Accounts: created on first use; one used before at a later date takes the
        // Python path (its first usage moves back, its metadata is rewritten).
        let mut new_accounts: Vec<&str> = Vec::new();
        for (i, &(account, ..)) in post.iter().enumerate() {
            if i > 0 && post[i - 1].0 == account {
                continue; // (the same account, another asset)
            }
            match self.value(key_into(&mut s.key, &[b"A", ledger, account.as_bytes()]))? {
                Value::Absent => new_accounts.push(account),
                Value::Account { first_usage } if *first_usage <= timestamp => {}
                _ => return Err(Fallback),
            }
        }
        if self.date_text.0 != date {
            self.date_text = (date, rfc3339(date));
        }
        let date_text = self.date_text.1.as_str();

        // The hash: Go's JSON of the log's memento (`ledger.hashchain`).
        let postings_json = &mut s.postings;
        postings_json.clear();
        push_postings(postings_json, &t.postings, true);
        // `_transaction_memento`: metadata sorted, the reference before the id.
        let memento = &mut s.memento;
        memento.clear();
        memento.extend_from_slice(b"{\"postings\":");
        memento.extend_from_slice(postings_json);
        memento.extend_from_slice(b",\"metadata\":");
        push_map(memento, &t.metadata, true);
        memento.extend_from_slice(b",\"timestamp\":");
        push_quoted(memento, date_text);
        if let Some(reference) = &t.reference {
            memento.extend_from_slice(b",\"reference\":");
            push_go_json(memento, reference);
        }
        memento.extend_from_slice(b",\"id\":");
        push_int(memento, transaction_id);
        memento.extend_from_slice(b",\"reverted\":false}");
        // `_transaction_payload`: metadata as given, the reference last.
        let transaction = &mut s.transaction;
        transaction.clear();
        transaction.extend_from_slice(b"{\"postings\":");
        transaction.extend_from_slice(postings_json);
        transaction.extend_from_slice(b",\"metadata\":");
        push_map(transaction, &t.metadata, false);
        transaction.extend_from_slice(b",\"timestamp\":");
        push_quoted(transaction, date_text);
        transaction.extend_from_slice(b",\"id\":");
        push_int(transaction, transaction_id);
        transaction.extend_from_slice(b",\"reverted\":false");
        if let Some(reference) = &t.reference {
            transaction.extend_from_slice(b",\"reference\":");
            push_json(transaction, reference);
        }
        let line = &mut s.line;
        line.clear();
        line.extend_from_slice(b"{\"type\":\"NEW_TRANSACTION\",\"data\":{\"transaction\":");
        line.extend_from_slice(memento);
        line.extend_from_slice(b",\"accountMetadata\":{}},\"date\":");
        push_quoted(line, date_text);
        line.extend_from_slice(b",\"idempotencyKey\":");
        push_go_json(line, t.idempotency.as_ref().map_or("", |(k, _)| k.as_str()));
        line.extend_from_slice(b",\"id\":0,\"hash\":null}\n");
        let mut digest = Sha256::new();
        if let Some(previous) = &head.last_hash {
            // The previous hash as Go's JSON encoder writes a []byte: "base64"\n.
            let mut quoted = [0u8; 47];
            quoted[0] = b'"';
            base64_into(&mut quoted[1..45], previous);
            quoted[45] = b'"';
            quoted[46] = b'\n';
            digest.update(quoted);
        }
        digest.update(&line[..]);
        let hash: [u8; 32] = digest.finalize().into();

        // The log's data: the transaction as projected (`_project_transaction`).
        let volumes_json = &mut s.volumes;
        volumes_json.clear();
        push_volumes(volumes_json, &post, true);
        let data = &mut s.data;
        data.clear();
        data.extend_from_slice(b"{\"transaction\":");
        data.extend_from_slice(transaction);
        data.extend_from_slice(b",\"postCommitVolumes\":");
        data.extend_from_slice(volumes_json);
        data.extend_from_slice(b",\"insertedAt\":");
        push_quoted(data, date_text);
        if effective_volumes {
            data.extend_from_slice(b",\"postCommitEffectiveVolumes\":");
            data.extend_from_slice(volumes_json);
        }
        data.extend_from_slice(b"},\"accountMetadata\":{}}");

        // The store, as `project_entry` leaves it.
        let request_id = &*t.request_id;
        self.writes.put_with(key_into(&mut s.key, &[b"Q", request_id.as_bytes()]), |record| {
            record.push(b'[');
            push_quoted(record, &t.ledger);
            record.push(b',');
            push_int(record, log_id);
            record.extend_from_slice(b",null,null,null,");
            push_int(record, date);
            record.push(b']');
        });
        let the_moment = moment(timestamp, transaction_id);
        for &(account, asset, input, output) in &post {
            self.set(key_into(&mut s.key, &[b"V", ledger, account.as_bytes(), asset.as_bytes()]), Value::Volumes(input, output));
            if effective_volumes {
                let effective_key = key_into(&mut s.key, &[b"E", ledger, account.as_bytes(), asset.as_bytes(), &the_moment]);
                self.writes.put_with(effective_key, |value| push_volumes_value(value, input, output));
            }
        }
        for account in new_accounts {
            self.set(key_into(&mut s.key, &[b"A", ledger, account.as_bytes()]), Value::Account { first_usage: timestamp });
        }
        self.writes.put_with(key_into(&mut s.key, &[b"T", ledger, &(transaction_id as u64).to_be_bytes()]), |stored| {
            stored.push(b'[');
            push_int(stored, transaction_id);
            stored.push(b',');
            push_postings(stored, &t.postings, false);
            stored.push(b',');
            push_map(stored, &t.metadata, false);
            stored.push(b',');
            push_int(stored, timestamp);
            stored.push(b',');
            push_int(stored, date);
            stored.push(b',');
            match &t.reference {
                Some(reference) => push_json(stored, reference),
                None => stored.extend_from_slice(b"null"),
            }
            stored.extend_from_slice(b",null,");
            push_int(stored, date);
            stored.push(b',');
            push_volumes(stored, &post, false);
            stored.push(b']');
        });
        if let Some(reference) = &t.reference {
            let reference_key = key(&[b"R", ledger, reference.as_bytes()]);
            self.writes.put_with(&reference_key, |value| push_int(value, transaction_id));
            self.references.insert(reference_key);
        }
        self.set(key_into(&mut s.key, &[b"H", ledger]), Value::Head(Box::new(Head {
            last_log_id: log_id,
            last_hash: Some(hash),
            last_transaction_id: transaction_id,
            last_date: date.max(head.last_date),
            max_timestamp: Some(head.max_timestamp.map_or(timestamp, |latest| latest.max(timestamp))),
        })));
        let (idempotency_key, idempotency_hash) = t.idempotency.as_ref().map_or(("", ""), |(k, h)| (k.as_str(), h.as_str()));
        self.writes.put_with(key_into(&mut s.key, &[b"G", ledger, &(log_id as u64).to_be_bytes()]), |entry| {
            entry.push(b'[');
            push_quoted(entry, &t.ledger);
            entry.push(b',');
            push_int(entry, log_id);
            // The data by reference to the transaction record written above: its id and
            // its metadata as logged (the record's may change later); see
            // `store.stored_log_fields`.
            entry.extend_from_slice(b",\"NEW_TRANSACTION\",[");
            push_int(entry, transaction_id);
            entry.push(b',');
            push_map(entry, &t.metadata, false);
            entry.extend_from_slice(b"],");
            push_int(entry, date);
            entry.push(b',');
            push_json(entry, idempotency_key);
            entry.push(b',');
            push_json(entry, idempotency_hash);
            entry.extend_from_slice(b",\"");
            let mut hash_text = [0u8; 44];
            base64_into(&mut hash_text, &hash);
            entry.extend_from_slice(&hash_text);
            entry.extend_from_slice(b"\",");
            push_quoted(entry, request_id);
            // 2: with the effective volumes (equal to the post-commit ones), 3: without.
            entry.extend_from_slice(if effective_volumes { b",2]" } else { b",3]" });
        });
        if !idempotency_key.is_empty() {
            // `IdempotencyRecord(input_hash, request_id)`; a refusal records none.
            let idempotency = key(&[b"I", ledger, idempotency_key.as_bytes()]);
            self.writes.put_with(&idempotency, |record| {
                record.push(b'[');
                push_json(record, idempotency_hash);
                record.push(b',');
                push_quoted(record, request_id);
                record.push(b']');
            });
            self.answered.insert(idempotency);
        }

        // What ledger.committed carries (`codecs.encode_log_entry`).
        let mut value = Vec::with_capacity(data.len() + 128);
        value.extend_from_slice(self.log_header);
        push_avro_bytes(&mut value, ledger);
        push_long(&mut value, log_id);
        push_avro_bytes(&mut value, b"NEW_TRANSACTION");
        push_avro_bytes(&mut value, data);
        push_long(&mut value, date);
        push_avro_bytes(&mut value, idempotency_key.as_bytes());
        push_avro_bytes(&mut value, idempotency_hash.as_bytes());
        push_avro_bytes(&mut value, &hash);
        push_avro_bytes(&mut value, request_id.as_bytes());
        Ok(Outcome { rejected: false, ledger: t.ledger.clone(), request_id: t.request_id.clone(), value })
    }

    /// `Conflict` (the reference is taken) as `execute` records and publishes it.
    fn conflict(&mut self, t: &Transfer, reference: &str, now: i64) -> Outcome {
        let message = format!("transaction reference '{reference}' already exists");
        self.rejection(t, "CONFLICT", &message, b"{}", now)
    }

    /// `InsufficientFunds` as `execute` records and publishes it.
    fn insufficient(&mut self, t: &Transfer, p: &Posting, available: i128, now: i64) -> Outcome {
        let message = format!(
            "account '{}' has insufficient funds of {}: needed {}, available {}",
            p.source, p.asset, p.amount, available
        );
        let details = format!(
            "{{\"account\":\"{}\",\"asset\":\"{}\",\"needed\":{},\"available\":{}}}",
            p.source, p.asset, p.amount, available
        );
        self.rejection(t, "INSUFFICIENT_FUND", &message, details.as_bytes(), now)
    }

    /// A refusal: its request record, and the record for ledger.rejected. `details` is
    /// JSON of plain ASCII, the same in the store (orjson) and on the topic (json.dumps).
    fn rejection(&mut self, t: &Transfer, code: &str, message: &str, details: &[u8], now: i64) -> Outcome {
        let mut record = Vec::with_capacity(message.len() + details.len() + 64);
        record.push(b'[');
        push_quoted(&mut record, &t.ledger);
        record.extend_from_slice(b",null,");
        push_quoted(&mut record, code);
        record.push(b',');
        push_json(&mut record, message);
        record.push(b',');
        record.extend_from_slice(details);
        record.push(b',');
        push_int(&mut record, now);
        record.push(b']');
        self.writes.put(&key(&[b"Q", t.request_id.as_bytes()]), &record);
        let mut value = Vec::with_capacity(message.len() + details.len() + 64);
        value.extend_from_slice(self.rejection_header);
        push_avro_bytes(&mut value, t.request_id.as_bytes());
        push_avro_bytes(&mut value, t.ledger.as_bytes());
        push_avro_bytes(&mut value, code.as_bytes());
        push_avro_bytes(&mut value, message.as_bytes());
        push_avro_bytes(&mut value, details);
        push_long(&mut value, now);
        Outcome { rejected: true, ledger: t.ledger.clone(), request_id: t.request_id.clone(), value }
    }
}

// ---------------------------------------------------------------------------- engine

/// One partition's fast path: its decoder, and a cache of the hot values (ledgers, heads,
/// volumes, accounts). A round changes the cache in place and keeps an undo log until it is
/// committed; a round never committed (its transaction failed) is rolled back before the
/// next one. The caller clears the cache whenever anything else writes the partition's
/// store (a Python round, a recovery).
#[pyclass(module = "streamledger_native")]
struct Engine {
    partition: i32,
    partitions: i32,
    requests_header: Vec<u8>,
    log_header: Vec<u8>,
    rejection_header: Vec<u8>,
    emission: PyObject,
    topics: Arc<Topics>,
    /// Values, each with the number of the round that last changed it.
    cache: FxMap<CacheKey, (Value, u64)>,
    cache_max: usize,
    rounds: u64,
    /// The round applied and not committed yet: its number, and what it replaced.
    pending: Option<(u64, Vec<(Vec<u8>, Option<(Value, u64)>)>)>,
    /// The request ids, references and idempotency keys of committed rounds whose writes
    /// are not in the store yet (see `commit`); every such round has some (a request id
    /// per outcome), so it is empty exactly when every committed round is stored.
    unstored: FxSet<Vec<u8>>,
}

impl Engine {
    fn rollback(&mut self) {
        if let Some((_, undo)) = self.pending.take() {
            for (k, previous) in undo.into_iter().rev() {
                match previous {
                    Some(value) => self.cache.insert(CacheKey::from_vec(k), value),
                    None => self.cache.remove(&k[..]),
                };
            }
        }
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python, partition: i32, partitions: i32, requests_header: Vec<u8>, log_header: Vec<u8>,
        rejection_header: Vec<u8>, emission: PyObject, committed_topic: PyObject,
        rejected_topic: PyObject, cache_max: usize,
    ) -> PyResult<Self> {
        if partitions <= 0 || !(0..partitions).contains(&partition) {
            return Err(PyValueError::new_err("partition out of range"));
        }
        let name = |topic: &PyObject| -> PyResult<CString> {
            CString::new(topic.extract::<String>(py)?).map_err(|_| PyValueError::new_err("a topic name with a NUL"))
        };
        let names = [name(&committed_topic)?, name(&rejected_topic)?];
        let topics = Arc::new(Topics { committed: committed_topic, rejected: rejected_topic, names });
        Ok(Engine {
            partition, partitions, requests_header, log_header, rejection_header, emission,
            topics, cache: FxMap::default(), cache_max, rounds: 0, pending: None,
            unstored: FxSet::default(),
        })
    }

    /// The record as a `Batch` of simple transfers, or None for the Python path.
    fn decode(&self, key: PyObject, payload: &Bound<PyAny>) -> Option<Batch> {
        let bytes = payload.downcast::<PyBytes>().ok()?.as_bytes();
        let body = bytes.strip_prefix(self.requests_header.as_slice())?;
        let mut reader = Reader { data: body, at: 0 };
        let mut transfers = Vec::new();
        reader.items(|reader| {
            transfers.push(read_transfer(reader, self.partition, self.partitions)?);
            Some(())
        })?;
        if reader.at != body.len() || transfers.is_empty() {
            return None;
        }
        let postings = transfers.iter().map(|t| t.postings.len()).sum();
        Some(Batch { transfers, key, payload: payload.clone().unbind(), postings })
    }

    /// Apply a round of batches; None when any of it needs the Python path. `get` is the
    /// partition's `Store`, read directly, or a multi-get (a rocksdict `Rdict.get` of a
    /// list of keys).
    fn apply(&mut self, py: Python, batches: Vec<PyRef<Batch>>, now: i64, get: &Bound<PyAny>) -> PyResult<Option<Round>> {
        self.rollback();
        if self.cache.len() > self.cache_max && self.unstored.is_empty() {
            self.cache.clear(); // (not while it holds values the store lacks)
        }
        // Every key the round may read and the cache lacks, fetched at once; what the
        // store holds (or lacks) goes into the cache as it is.
        let transfers: usize = batches.iter().map(|b| b.transfers.len()).sum();
        let mut asked: FxSet<Vec<u8>> = FxSet::with_capacity_and_hasher(4 * transfers, Default::default());
        let mut last_ledger: Option<&str> = None;
        let mut scratch = Vec::with_capacity(128);
        let cache = &self.cache;
        // A key the round reads: built in `scratch`, copied only when it is to be fetched.
        let mut want = |parts: &[&[u8]], always: bool| {
            let k = key_into(&mut scratch, parts);
            if always || !cache.contains_key(k) {
                asked.insert(k.to_vec());
            }
        };
        for batch in &batches {
            for t in &batch.transfers {
                let ledger = t.ledger.as_bytes();
                want(&[b"Q", t.request_id.as_bytes()], true);
                if let Some(reference) = &t.reference {
                    want(&[b"R", ledger, reference.as_bytes()], true);
                }
                if let Some((idempotency_key, _)) = &t.idempotency {
                    want(&[b"I", ledger, idempotency_key.as_bytes()], true);
                }
                if last_ledger != Some(&*t.ledger) {  // a batch is mostly one ledger
                    want(&[b"L", ledger], false);
                    want(&[b"H", ledger], false);
                }
                for p in &t.postings {
                    for account in [&p.source, &p.destination] {
                        want(&[b"V", ledger, account.as_bytes(), p.asset.as_bytes()], false);
                        want(&[b"A", ledger, account.as_bytes()], false);
                    }
                }
                last_ledger = Some(&*t.ledger);
            }
        }
        let wanted: Vec<Vec<u8>> = asked.into_iter().collect();
        let mut answered = FxSet::default();
        let mut references = FxSet::default();
        if !wanted.is_empty() {
            let values: Vec<Option<Vec<u8>>> = match get.downcast::<Store>() {
                Ok(store) => store::multi_get(store.borrow().db()?, &wanted)?,
                Err(_) => {
                    let keys = PyList::new_bound(py, wanted.iter().map(|k| PyBytes::new_bound(py, k)));
                    get.call1((keys,))?.iter()?.map(|value| {
                        let value = value?;
                        Ok(if value.is_none() { None } else { Some(value.downcast::<PyBytes>()?.as_bytes().to_vec()) })
                    }).collect::<PyResult<_>>()?
                }
            };
            for (k, value) in wanted.into_iter().zip(values) {
                if is_claim(&k) {
                    // Request ids, references and idempotency keys: only whether taken.
                    if value.is_some() || self.unstored.contains(&k) {
                        if k[0] == b'R' { references.insert(k) } else { answered.insert(k) };
                    }
                } else {
                    match value {
                        None => self.cache.insert(CacheKey::from_vec(k), (Value::Absent, 0)),
                        Some(raw) => match parse_stored(&k, &raw) {
                            Some(parsed) => self.cache.insert(CacheKey::from_vec(k), (parsed, 0)),
                            None => return Ok(None), // not a value this path reads: Python's
                        },
                    };
                }
            }
        }
        self.rounds += 1;
        let mut scratch = Scratch::default();
        let mut work = Work {
            cache: &mut self.cache, number: self.rounds, undo: Vec::new(), answered, references,
            seen: FxSet::with_capacity_and_hasher(transfers, Default::default()), writes: spare_writes(),
            log_header: &self.log_header, rejection_header: &self.rejection_header,
            date_text: (i64::MIN, String::new()),
        };
        let mut outcomes = Vec::new();
        for batch in &batches {
            for t in &batch.transfers {
                match work.transfer(t, now, &mut scratch) {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(Fallback) => {
                        let undo = std::mem::take(&mut work.undo);
                        self.pending = Some((self.rounds, undo));
                        self.rollback();
                        return Ok(None);
                    }
                }
            }
        }
        let Work { mut writes, undo, .. } = work;
        // The hot values the round changed, as they stand after it.
        for (k, _) in &undo {
            match &self.cache[&k[..]].0 {
                Value::Volumes(input, output) => writes.put_with(k, |value| push_volumes_value(value, *input, *output)),
                Value::Head(head) => writes.put(k, &head.encode()),
                Value::Account { first_usage } => {
                    // A new account: `AccountRecord(address, {}, timestamp, date, date)`,
                    // its timestamp being its date here (no explicit timestamps).
                    let address = std::str::from_utf8(&k[k.iter().rposition(|&b| b == 0).unwrap() + 1..]).unwrap();
                    writes.put(k, format!("[\"{address}\",{{}},{first_usage},{first_usage},{first_usage}]").as_bytes());
                }
                _ => unreachable!("a round changes only volumes, heads and accounts"),
            }
        }
        // In key order: RocksDB's memtable inserts each key from where the previous one
        // went (its skiplist's splice), so sorted keys are found next door instead of by a
        // walk down from the top of a ~100k-entry list (the store write ~6 -> ~4 us per
        // request). Stable, so a key written twice would still end with its last value.
        writes.sort();
        let claims = writes.iter().filter(|(k, _)| is_claim(k)).map(|(k, _)| k.to_vec()).collect();
        self.pending = Some((self.rounds, undo));
        let mut counts: FxMap<&str, (usize, usize)> = FxMap::default();
        for outcome in &outcomes {
            let count = counts.entry(&*outcome.ledger).or_default();
            if outcome.rejected { count.1 += 1 } else { count.0 += 1 }
        }
        let rejected = outcomes.iter().filter(|outcome| outcome.rejected).count();
        let committed = outcomes.len() - rejected;
        let per_ledger = PyDict::new_bound(py);
        for (ledger, (applied, refused)) in counts {
            per_ledger.set_item(ledger, vec![applied, refused])?;
        }
        Ok(Some(Round {
            outcomes, topics: self.topics.clone(), partition: self.partition, emission: self.emission.clone_ref(py),
            committed, rejected, per_ledger: per_ledger.unbind(), claims, writes, number: self.rounds,
        }))
    }

    /// The round's transaction committed: its values stay. Its writes may reach the store
    /// later (`stored`); until then the cache holds its values, and its request ids,
    /// references and idempotency keys count as taken whatever the store says.
    /// -> false when the round is not the one last applied: nothing cached is trusted then,
    /// and its writes must go to the store before anything else is applied.
    fn commit(&mut self, round: PyRef<Round>) -> bool {
        match &self.pending {
            Some((number, _)) if *number == round.number => self.pending = None,
            _ => {
                self.clear();
                return false;
            }
        }
        self.unstored.extend(round.claims.iter().cloned());
        true
    }

    /// The committed round's writes are in the store.
    fn stored(&mut self, mut round: PyRefMut<Round>) {
        for k in &round.claims {
            self.unstored.remove(k); // (a claim is never in two rounds: a second one is refused)
        }
        // Taken by the store's writer thread (which recycles them), unless written through
        // rocksdict: then recycled here.
        recycle_writes(std::mem::take(&mut round.writes));
    }

    /// Something else wrote the store (after every committed round's writes): forget
    /// every value.
    fn clear(&mut self) {
        self.cache.clear();
        self.pending = None;
        self.unstored.clear();
    }

    fn __len__(&self) -> usize {
        self.cache.len()
    }
}

#[pyfunction]
#[pyo3(name = "rfc3339")]
fn rfc3339_py(micros: i64) -> String {
    rfc3339(micros)
}

#[pyfunction]
#[pyo3(name = "murmur2")]
fn murmur2_py(data: &[u8]) -> i32 {
    murmur2(data)
}

#[pymodule]
fn streamledger_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Batch>()?;
    m.add_class::<Round>()?;
    m.add_class::<Kafka>()?;
    m.add_class::<Store>()?;
    m.add_class::<StoreIter>()?;
    m.add_class::<StoreBatch>()?;
    m.add_function(wrap_pyfunction!(rfc3339_py, m)?)?;
    m.add_function(wrap_pyfunction!(murmur2_py, m)?)?;
    Ok(())
}
