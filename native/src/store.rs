//! A partition's RocksDB database, opened from Rust (`Store`), so that the hot path's
//! reads and writes never cross into Python and its writes run without the GIL.
//!
//! RocksDB through the crate rocksdict is built on (10.4.2 here, 9.8.4 in rocksdict
//! 0.3.29: one file format), with the options `streams/store.py` gives rocksdict: either
//! binding opens a store the other wrote (rocksdict stays the fallback when this module
//! is not built, and what the tests inspect stores with).
//!
//! `write_round` hands a committed round's writes to a thread of their own and returns: the
//! worker applies its next round meanwhile (the engine answers from its cache for the
//! values in flight, see `Engine::commit`). Every other method that writes, flushes or
//! closes first waits for that write (`wait`), so writes land in the order they were made.

use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBRawIteratorWithThreadMode, Options, ReadOptions, SliceTransform,
    WriteBatch, WriteBufferManager, WriteOptions, DB, DEFAULT_COLUMN_FAMILY_NAME,
};

use crate::{recycle_writes, Round, Writes};

fn error(e: impl std::fmt::Display) -> PyErr {
    PyOSError::new_err(format!("RocksDB: {e}"))
}

/// One block cache and one memtable budget for every partition database of a process, as
/// `streams.store._shared` makes them for rocksdict.
fn shared(block_cache_mb: usize, write_buffers_mb: usize) -> (Cache, WriteBufferManager) {
    type Shared = Mutex<Vec<((usize, usize), (Cache, WriteBufferManager))>>;
    static SHARED: OnceLock<Shared> = OnceLock::new();
    let mut known = SHARED.get_or_init(Default::default).lock().unwrap();
    if let Some((_, found)) = known.iter().find(|(sizes, _)| *sizes == (block_cache_mb, write_buffers_mb)) {
        return found.clone();
    }
    let made = (
        Cache::new_lru_cache(block_cache_mb << 20),
        WriteBufferManager::new_write_buffer_manager(write_buffers_mb << 20, false),
    );
    known.push(((block_cache_mb, write_buffers_mb), made.clone()));
    made
}

/// Level-0 files before a compaction into the base level (RocksDB's default is 4), as in
/// `streams/store.py`. Every flush overlaps the whole base level (keys of every ledger and
/// random request ids), so each compaction rewrites it all: waiting for 8 files halves
/// that rewriting. Measured (alternated, 600k-request uniform phases): the worker's CPU
/// ~20.0 -> ~17.9 us per request; the probes of 4 more files per read did not show.
const L0_COMPACTION_TRIGGER: i32 = 8;

/// The keys a round reads from the store, all by point lookups that mostly find nothing:
/// claims (request ids, references, idempotency keys: `crate::is_claim`), looked up for
/// every request that has one; volumes and accounts, looked up when an account is first
/// used (or after the engine's cache was cleared). Each such lookup searched the
/// skiplists of both memtables. A memtable Bloom filter over these keys alone answers
/// most of them at once: ~2.1 -> ~0.9 us of the round's thread per absent claim; with
/// volumes and accounts in it too, the engine's round thread ~0.5 us less per request in
/// `bench/engine.py` (first uses of 160k accounts). Not over every key: over all six a
/// request writes it cost the store's writer thread about what it saved. So these kinds
/// are the one "prefix" domain, each key its own prefix, and iterators ignore prefixes
/// (`total_order`): a seek lands where it would without them.
fn point_lookups() -> SliceTransform {
    SliceTransform::create("streamledger.point-lookups", |key| key, Some(looked_up))
}

fn looked_up(key: &[u8]) -> bool {
    crate::is_claim(key) || matches!(key.first(), Some(b'V' | b'A'))
}

/// The memtable's filter in bits per byte of memtable: ~2 filtered keys (a request id,
/// the destination's volumes) per ~600 bytes written, so ~25 bits per key (a false
/// positive costs the search it saves).
const POINT_LOOKUP_FILTER_RATIO: f64 = 0.01;

fn options(block_cache_mb: usize, write_buffer_mb: usize) -> Options {
    let (cache, buffers) = shared(block_cache_mb, 4 * write_buffer_mb);
    let mut options = Options::default();
    options.create_if_missing(true);
    options.set_write_buffer_size(write_buffer_mb << 20);
    options.set_max_write_buffer_number(2);
    options.set_level_zero_file_num_compaction_trigger(L0_COMPACTION_TRIGGER);
    options.set_write_buffer_manager(&buffers);
    options.set_prefix_extractor(point_lookups());
    options.set_memtable_prefix_bloom_ratio(POINT_LOOKUP_FILTER_RATIO);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_bloom_filter(10.0, false);
    options.set_block_based_table_factory(&table);
    options
}

/// Reads that seek by key order whatever the key (see `point_lookups`).
fn total_order() -> ReadOptions {
    let mut options = ReadOptions::default();
    options.set_total_order_seek(true);
    options
}

fn no_wal() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.disable_wal(true); // the log topics are the durable copy (streams/store.py)
    options
}

/// The store's writer thread, which writes the rounds `write_round` hands it, one at a
/// time (a thread started per round cost ~0.4 ms of the round's thread): it builds each
/// round's batch, writes it, and frees the round's writes, all off the round's thread.
struct Writer {
    rounds: Sender<(Writes, Vec<(Vec<u8>, Vec<u8>)>)>,
    results: Mutex<Receiver<Result<(), rocksdb::Error>>>,
    thread: JoinHandle<()>,
}

impl Writer {
    fn start(db: Arc<DB>) -> PyResult<Writer> {
        let (rounds, todo) = channel::<(Writes, Vec<(Vec<u8>, Vec<u8>)>)>();
        let (done, results) = channel();
        let thread = std::thread::Builder::new()
            .name("store-write".into())
            .spawn(move || {
                for (writes, extra) in todo {
                    let written = db.write_opt(round_batch(&writes, &extra), &no_wal());
                    recycle_writes(writes);
                    if done.send(written).is_err() {
                        break;
                    }
                }
            })
            .map_err(error)?;
        Ok(Writer { rounds, results: Mutex::new(results), thread })
    }
}

#[pyclass(module = "streamledger_native")]
pub struct Store {
    db: Option<Arc<DB>>,
    writer: Option<Writer>,
    /// A round was handed to the writer and nobody waited for it yet.
    writing: bool,
}

impl Store {
    pub(crate) fn db(&self) -> PyResult<&Arc<DB>> {
        self.db.as_ref().ok_or_else(|| error("the store is closed"))
    }

    fn finish(&mut self, py: Python) -> PyResult<()> {
        if std::mem::take(&mut self.writing) {
            let writer = self.writer.as_ref().expect("a writer while writing");
            py.allow_threads(|| writer.results.lock().unwrap().recv())
                .map_err(|_| error("the store's writer thread ended"))?
                .map_err(error)?;
        }
        Ok(())
    }

    fn write_now(&mut self, py: Python, batch: WriteBatch) -> PyResult<()> {
        self.finish(py)?;
        let db = self.db()?.clone();
        py.allow_threads(move || db.write_opt(batch, &no_wal())).map_err(error)
    }
}

#[pymethods]
impl Store {
    #[new]
    fn new(py: Python, path: &str, block_cache_mb: usize, write_buffer_mb: usize) -> PyResult<Self> {
        let options = options(block_cache_mb, write_buffer_mb);
        let path = Path::new(path).to_owned();
        // The default column family by name (for the batched multi-get), with the same
        // options as the database: opened by name alone it would take the defaults.
        let family = vec![ColumnFamilyDescriptor::new(DEFAULT_COLUMN_FAMILY_NAME, options.clone())];
        let db = py.allow_threads(|| DB::open_cf_descriptors(&options, &path, family)).map_err(error)?;
        Ok(Store { db: Some(Arc::new(db)), writer: None, writing: false })
    }

    /// The value of a key, or of each key of a list (rocksdict's `Rdict.get`).
    fn get(&self, py: Python, key: &Bound<PyAny>) -> PyResult<PyObject> {
        if let Ok(keys) = key.downcast::<PyList>() {
            let keys: Vec<Vec<u8>> = keys.extract()?;
            return Ok(self.get_many(py, keys)?.into_any().unbind());
        }
        let key: &[u8] = key.extract()?;
        Ok(match self.db()?.get_pinned(key).map_err(error)? {
            Some(value) => PyBytes::new_bound(py, &value).into_any().unbind(),
            None => py.None(),
        })
    }

    /// The values of `keys` (None where absent), in one batched multi-get.
    fn get_many<'py>(&self, py: Python<'py>, keys: Vec<Vec<u8>>) -> PyResult<Bound<'py, PyList>> {
        let db = self.db()?;
        let values = multi_get(db, &keys)?;
        let list = PyList::empty_bound(py);
        for value in values {
            match value {
                Some(value) => list.append(PyBytes::new_bound(py, &value))?,
                None => list.append(py.None())?,
            }
        }
        Ok(list)
    }

    fn put(&mut self, py: Python, key: &[u8], value: &[u8]) -> PyResult<()> {
        let mut batch = WriteBatch::default();
        batch.put(key, value);
        self.write_now(py, batch)
    }

    fn delete(&mut self, py: Python, key: &[u8]) -> PyResult<()> {
        let mut batch = WriteBatch::default();
        batch.delete(key);
        self.write_now(py, batch)
    }

    /// Write a `StoreBatch` atomically (rocksdict's `Rdict.write` of a `WriteBatch`).
    fn write(&mut self, py: Python, mut batch: PyRefMut<StoreBatch>) -> PyResult<()> {
        let batch = batch.batch.take().ok_or_else(|| error("a batch is written once"))?;
        self.write_now(py, batch)
    }

    /// Write a committed native round's writes (taken from it) and `extra` (its log
    /// positions) atomically, on the store's writer thread: this returns at once. `wait`
    /// (or any other write, a flush, a close) waits for it and raises what it failed with.
    fn write_round(&mut self, py: Python, mut round: PyRefMut<Round>, extra: Vec<(Vec<u8>, Vec<u8>)>) -> PyResult<()> {
        self.finish(py)?;
        if self.writer.is_none() {
            self.writer = Some(Writer::start(self.db()?.clone())?);
        }
        let writes = std::mem::take(&mut round.writes);
        self.writer.as_ref().unwrap().rounds.send((writes, extra)).map_err(|_| error("the store's writer thread ended"))?;
        self.writing = true;
        Ok(())
    }

    /// Wait for the write `write_round` started, if any.
    fn wait(&mut self, py: Python) -> PyResult<()> {
        self.finish(py)
    }

    /// Persist the memtables.
    fn flush(&mut self, py: Python) -> PyResult<()> {
        self.finish(py)?;
        let db = self.db()?.clone();
        py.allow_threads(move || db.flush()).map_err(error)
    }

    /// An iterator over the store (rocksdict's `Rdict.iter()`: seek, seek_for_prev, valid,
    /// key, value, next, prev).
    fn iter(&self) -> PyResult<StoreIter> {
        let db = self.db()?.clone();
        // The iterator borrows the database, which the Arc keeps alive and in place for as
        // long as the iterator lives (it is dropped first: see StoreIter).
        let iter: DBRawIteratorWithThreadMode<'static, DB> =
            unsafe { std::mem::transmute(db.raw_iterator_opt(total_order())) };
        Ok(StoreIter { iter, _db: db })
    }

    /// Every (key, value), in key order (for tests).
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty_bound(py);
        let mut iter = self.db()?.raw_iterator_opt(total_order());
        iter.seek_to_first();
        while iter.valid() {
            list.append((PyBytes::new_bound(py, iter.key().unwrap()), PyBytes::new_bound(py, iter.value().unwrap())))?;
            iter.next();
        }
        iter.status().map_err(error)?;
        Ok(list)
    }

    fn close(&mut self, py: Python) -> PyResult<()> {
        let finished = self.finish(py);
        if let Some(Writer { rounds, thread, .. }) = self.writer.take() {
            drop(rounds); // the thread ends
            py.allow_threads(|| thread.join()).map_err(|_| error("the store's writer thread panicked"))?;
        }
        self.db = None; // closed once the last iterator over it is gone too
        finished
    }
}

/// A round's writes and `extra` in one batch, sized at once (grown by doubling, its buffer
/// was copied again and again and its new pages faulted in each round).
fn round_batch(writes: &Writes, extra: &[(Vec<u8>, Vec<u8>)]) -> WriteBatch {
    let sizes = writes.bytes() + 11 * writes.len() + extra.iter().map(|(k, v)| k.len() + v.len() + 11).sum::<usize>();
    let mut batch = WriteBatch::with_capacity_bytes(12 + sizes);
    for (key, value) in writes.iter().chain(extra.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))) {
        batch.put(key, value);
    }
    batch
}

/// The values of `keys` in one batched multi-get (RocksDB sorts them itself).
pub(crate) fn multi_get(db: &DB, keys: &[Vec<u8>]) -> PyResult<Vec<Option<Vec<u8>>>> {
    let cf = db.cf_handle(DEFAULT_COLUMN_FAMILY_NAME).expect("the default column family is opened");
    db.batched_multi_get_cf(cf, keys, false)
        .into_iter()
        .map(|value| value.map(|v| v.map(|slice| slice.to_vec())).map_err(error))
        .collect()
}

/// Writes to make at once (rocksdict's `WriteBatch`): each put copies its key and value
/// at once, so a Python caller's objects go as it makes them (a list of a replay's
/// ~60,000 pairs held at once took a rebuild's peak RSS from ~670 MB to ~2.4 GB).
#[pyclass(module = "streamledger_native")]
pub struct StoreBatch {
    batch: Option<WriteBatch>,
}

#[pymethods]
impl StoreBatch {
    #[new]
    fn new() -> Self {
        StoreBatch { batch: Some(WriteBatch::default()) }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> PyResult<()> {
        self.batch.as_mut().ok_or_else(|| error("the batch was written"))?.put(key, value);
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> PyResult<()> {
        self.batch.as_mut().ok_or_else(|| error("the batch was written"))?.delete(key);
        Ok(())
    }
}

#[pyclass(module = "streamledger_native")]
pub struct StoreIter {
    iter: DBRawIteratorWithThreadMode<'static, DB>, // before `_db`: dropped first
    _db: Arc<DB>,
}

// The iterator is used under the GIL only, one call at a time, whichever thread holds it.
unsafe impl Send for StoreIter {}

#[pymethods]
impl StoreIter {
    fn seek(&mut self, key: &[u8]) {
        self.iter.seek(key)
    }

    fn seek_for_prev(&mut self, key: &[u8]) {
        self.iter.seek_for_prev(key)
    }

    fn valid(&self) -> PyResult<bool> {
        if self.iter.valid() {
            return Ok(true);
        }
        self.iter.status().map_err(error)?;
        Ok(false)
    }

    fn key<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.iter.key().map(|key| PyBytes::new_bound(py, key))
    }

    fn value<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.iter.value().map(|value| PyBytes::new_bound(py, value))
    }

    fn next(&mut self) {
        self.iter.next()
    }

    fn prev(&mut self) {
        self.iter.prev()
    }
}
